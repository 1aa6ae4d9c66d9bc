"""A throw-away aiosmtpd server for mudmail's interop tests (see aiosmtpd.ts).

Run with Debian's /usr/bin/python3 (python3-aiosmtpd 1.4):
  aiosmtpd-server.py --host 127.0.0.1 --port N --dir DIR --domain test.example
                     [--refuse nobody@test.example ...] [--cert FILE --key FILE]

Accepts the domain's recipients except the refused ones (550 5.1.1), STARTTLS when a
certificate is given. Each message is stored once per accepted recipient as DIR/NNNNNN.K.eml,
exactly the bytes received after un-dot-stuffing (CRLF line ends), with DIR/NNNNNN.K.json
beside it: envelope, MAIL/RCPT parameters, whether the session ran over TLS and its version.
Both files are written under another name and renamed, the .json last. Prints "READY" on
standard output once listening; stops on SIGTERM.
"""

import argparse
import json
import os
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, directory, domain, refuse):
        self.directory = directory
        self.domain = domain.lower()
        self.refuse = {r.lower() for r in refuse}
        self.count = 0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.refuse:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if address.rpartition("@")[2].lower() != self.domain:
            return "550 5.7.1 <%s>: Relay access denied" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            n = self.count
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        meta = {
            "from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_options": envelope.rcpt_options,
            "tls": ssl_object is not None,
            "tls_version": ssl_object.version() if ssl_object is not None else None,
            "helo": session.host_name,
            "size": len(envelope.original_content),
        }
        for k, rcpt in enumerate(envelope.rcpt_tos):
            base = os.path.join(self.directory, "%06d.%d" % (n, k))
            with open(base + ".eml.tmp", "wb") as f:
                f.write(envelope.original_content)
            os.rename(base + ".eml.tmp", base + ".eml")
            with open(base + ".json.tmp", "w") as f:
                json.dump(dict(meta, rcpt=rcpt), f)
            os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 Ok: queued as %06d" % n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--domain", default="test.example")
    p.add_argument("--refuse", action="append", default=[])
    p.add_argument("--cert")
    p.add_argument("--key")
    a = p.parse_args()
    kwargs = {}
    if a.cert and a.key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(a.cert, a.key)
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = False
    controller = Controller(
        Store(a.dir, a.domain, a.refuse),
        hostname=a.host,
        port=a.port,
        server_hostname="aiosmtpd.mudmail.invalid",
        data_size_limit=64 * 1024 * 1024,
        **kwargs,
    )
    controller.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("READY", flush=True)
    done.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
