// Test harness: a throw-away OpenSMTPD (Debian 12's opensmtpd 6.8.0p2) on loopback, delivering
// the listed users of a test domain into one Maildir and refusing everyone else.
//
// Facts about OpenSMTPD 6.8.0p2 on Debian 12 that this module relies on, found the hard way:
// - opensmtpd cannot be installed with apt next to postfix (both provide mail-transport-agent):
//   scripts/pretest.sh unpacks it into /opt/mudmail-test/opensmtpd/, creates the opensmtpd and
//   opensmtpq users, /var/lib/opensmtpd/empty (the chroot of its unprivileged processes) and
//   the symlink /usr/libexec/opensmtpd, the compiled-in home of its delivery helpers
//   (mail.maildir, ...).
// - The queue /var/spool/smtpd and the control socket /var/run/smtpd.sock are compiled in: ONE
//   instance per machine. A second smtpd refuses to start while the socket answers. Envelopes
//   left in the queue by a killed instance would be delivered (or bounced into our Maildir) by
//   the next one, so the queue is emptied before each start, when no instance runs.
// - `smtpd -d -f FILE` stays in the foreground and logs to stderr; SIGTERM to it ends all its
//   processes. `smtpd -n -f FILE` only checks the config.
// - A recipient of `action ... virtual <table>` that is not in the table is refused at RCPT with
//   "524 5.2.4 Mailing list expansion problem" (a 5xx all the same). The table maps each
//   address to the system user that delivers (here nobody, who owns the Maildir).
// - It does NOT advertise PIPELINING (and answers a client that pipelines anyway with
//   "500 5.5.1 Pipelining not supported"); it offers 8BITMIME, SIZE (35 MB), DSN and
//   ENHANCEDSTATUSCODES.
// - STARTTLS is offered with `listen on ... tls pki NAME`, but every handshake fails with
//   Debian 12's OpenSSL 3: smtpd's privilege-separated key engine loses the key ("rsa
//   routines::missing private key", "SSL routines::EVP lib" in the log, the client sees alert
//   80 internal error; RSA and ECDSA keys alike, TLS 1.2 with RSA key exchange too). Upstream
//   issues OpenSMTPD#1171 and #1239, fixed after 6.8. So `tls` here is for testing a client's
//   behaviour against a server whose TLS is broken, not for encrypted delivery.

import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import type { Test } from "tap";
import { freePort } from "./postfix.js";
import {
  lookupId, listMaildir, needFile, needRoot, needUser, readTail, removeAtExit, requireAll, spawnDaemon, waitForFiles,
  waitForGreeting, type Daemon,
} from "./daemon.js";

export const SMTPD = "/opt/mudmail-test/opensmtpd/usr/sbin/smtpd";
export const SMTPD_HELPERS = "/usr/libexec/opensmtpd";
export const SMTPD_SOCKET = "/var/run/smtpd.sock";
export const SMTPD_QUEUE = "/var/spool/smtpd";

export function requireOpenSmtpd(t: Test): boolean {
  return requireAll(t, [
    needFile(SMTPD),
    needFile(path.join(SMTPD_HELPERS, "mail.maildir")),
    needFile("/var/lib/opensmtpd/empty"),
    needUser("opensmtpd"),
    needUser("opensmtpq"),
    needRoot("smtpd starts as root"),
  ]);
}

export interface OpenSmtpdOptions {
  host?: string;
  domain?: string;
  /** Addresses accepted (everyone else of the domain is refused with 524 5.2.4). */
  users: string[];
  /** Offer STARTTLS with this certificate and key (broken on Debian 12: see above). */
  tls?: { certFile: string; keyFile: string };
}

export interface OpenSmtpdInstance {
  host: string;
  port: number;
  domain: string;
  maildir: string;
  dir: string;
  readMessages(): Promise<Buffer[]>;
  waitForMessages(n: number, timeoutMs: number): Promise<Buffer[]>;
  /** smtpd's own log (its stderr in -d mode). */
  log(): Promise<string>;
  stop(): Promise<void>;
}

/** True when something answers on the control socket: another smtpd runs on this machine. */
function socketAnswers(): Promise<boolean> {
  return new Promise((resolve) => {
    if (!existsSync(SMTPD_SOCKET)) return resolve(false);
    const s = net.connect(SMTPD_SOCKET);
    const done = (ok: boolean) => {
      s.destroy();
      resolve(ok);
    };
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
    setTimeout(() => done(false), 1000).unref();
  });
}

async function emptyQueue(): Promise<void> {
  for (const sub of ["queue", "incoming", "temporary", "purge", "offline", "corrupt"]) {
    const d = path.join(SMTPD_QUEUE, sub);
    let names: string[] = [];
    try {
      names = await fs.readdir(d);
    } catch {
      continue;
    }
    for (const n of names) await fs.rm(path.join(d, n), { recursive: true, force: true });
  }
}

export async function startOpenSmtpd(opts: OpenSmtpdOptions): Promise<OpenSmtpdInstance> {
  const host = opts.host ?? "127.0.0.1";
  const domain = opts.domain ?? "test.example";
  if (!existsSync(SMTPD)) throw new Error(`startOpenSmtpd: ${SMTPD} is missing; run scripts/pretest.sh as root`);
  if (await socketAnswers()) throw new Error(`startOpenSmtpd: another smtpd answers on ${SMTPD_SOCKET} (one instance per machine)`);
  await fs.rm(SMTPD_SOCKET, { force: true });
  await emptyQueue();
  const uid = lookupId("/etc/passwd", "nobody") ?? 65534;
  const gid = lookupId("/etc/group", "nogroup") ?? 65534;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-opensmtpd-"));
  const remove = removeAtExit(dir);
  await fs.chmod(dir, 0o755);
  const maildir = path.join(dir, "Maildir");
  await fs.mkdir(maildir, { mode: 0o755 });
  await fs.chown(maildir, uid, gid);
  const q = (s: string) => `"${s.replace(/["\\]/g, "\\$&")}"`;
  await fs.writeFile(path.join(dir, "vusers"), opts.users.map((u) => `${u} nobody\n`).join(""), { mode: 0o644 });
  if (opts.tls) {
    await fs.copyFile(opts.tls.certFile, path.join(dir, "server.crt"));
    await fs.copyFile(opts.tls.keyFile, path.join(dir, "server.key"));
    await fs.chmod(path.join(dir, "server.key"), 0o600);
  }
  const conf = path.join(dir, "smtpd.conf");
  const logFile = path.join(dir, "smtpd.stderr");
  const log = async () => (await readTail(logFile, 1e7)) + (await readTail(path.join(dir, "smtpd.stdout"), 20000));

  let daemon: Daemon | undefined;
  let port = 0;
  let lastWhy = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    port = await freePort(host);
    const lines = [
      ...(opts.tls ? [`pki mudmail cert ${q(path.join(dir, "server.crt"))}`, `pki mudmail key ${q(path.join(dir, "server.key"))}`] : []),
      `table vusers file:${path.join(dir, "vusers")}`,
      `listen on ${host} port ${port}${opts.tls ? " tls pki mudmail" : ""} hostname opensmtpd.mudmail.invalid`,
      `action "local" maildir ${q(maildir)} virtual <vusers>`,
      `match from any for domain ${q(domain)} action "local"`,
      "",
    ];
    await fs.writeFile(conf, lines.join("\n"), { mode: 0o644 });
    daemon = spawnDaemon(SMTPD, ["-d", "-f", conf], dir, "smtpd");
    const d = daemon;
    const ready = await waitForGreeting(host, port, 10_000, () => d.exited());
    if (ready.ok) break;
    await d.stop();
    daemon = undefined;
    lastWhy = ready.why;
    if (!/in use/i.test(await log())) break;
  }
  if (!daemon) {
    const text = await log();
    await remove();
    throw new Error(`startOpenSmtpd failed: ${lastWhy}\n--- smtpd log ---\n${text}`);
  }
  const running = daemon;
  let stopped = false;
  return {
    host,
    port,
    domain,
    maildir,
    dir,
    readMessages: async () => Promise.all((await listMaildir(maildir)).map((f) => fs.readFile(f))),
    waitForMessages: (n, timeoutMs) => waitForFiles(() => listMaildir(maildir), n, timeoutMs, async () => `--- smtpd log ---\n${await log()}`),
    log,
    async stop() {
      if (stopped) return;
      stopped = true;
      await running.stop(5000);
      await fs.rm(SMTPD_SOCKET, { force: true });
      await remove();
    },
  };
}
