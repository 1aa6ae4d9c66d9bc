// Test harness: a throw-away Exim (Debian's exim4-daemon-light) on loopback, delivering every
// accepted recipient of a test domain into one Maildir.
//
// Facts about Exim 4.96 on Debian 12 that this module relies on, found the hard way:
// - exim4-daemon-light cannot be installed with apt next to postfix (both provide
//   mail-transport-agent): scripts/pretest.sh unpacks it with `dpkg-deb -x` into
//   /opt/mudmail-test/exim4-daemon-light/ and creates the `Debian-exim` user, whose name is
//   compiled into the binary ("failed to find uid for user name "Debian-exim"" otherwise). The
//   light daemon links libidn12, which Debian 12 images lack: pretest installs it.
// - `exim4 -C FILE -bdf` runs a daemon in the foreground with our config; as root, -C keeps
//   root for the daemon. Exim re-executes itself for each delivery (exim_path must name the
//   unpacked binary, the compiled-in /usr/sbin/exim4 does not exist here) from a process that
//   already runs as Debian-exim, and a -C file that is not in the trusted list then gives up
//   root for good ("exim user lost privilege for using -C option"): deliveries run as
//   Debian-exim, so the spool, the log dir and the Maildir's parent must be writable by it and
//   every dir above them searchable (mkdtemp's 0700 is chmod'ed 0755).
// - Every path in the config is fixed text: Exim 4.96 refuses tainted data ($local_part from
//   the SMTP command) in file names, so all recipients share one Maildir.
// - The first delivery failure of a message with no retry data is final at once ("retry
//   timeout exceeded") and bounces: a permission mistake shows as a bounce in the log, not a wait.
// - smtp_accept_queue_per_connection (default 10) queues, without delivering, every message
//   past the 10th of a connection: set to 0. rfc1413_hosts (ident) and host_lookup are emptied
//   so nothing waits on the network; keep_environment is set to silence a warning.
// - The ACL answer "message = 550 5.1.1 ..." sets the code and the enhanced code of a deny.
// - Exim advertises SIZE 8BITMIME PIPELINING PIPECONNECT CHUNKING SMTPUTF8 (and STARTTLS with a
//   certificate); its Received: says "with esmtps (TLS1.3) tls TLS_..." over TLS.

import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Test } from "tap";
import { freePort } from "./postfix.js";
import {
  lookupId, listMaildir, needFile, needRoot, needUser, readTail, removeAtExit, requireAll, spawnDaemon, waitForFiles,
  waitForGreeting, type Daemon,
} from "./daemon.js";

export const EXIM = "/opt/mudmail-test/exim4-daemon-light/usr/sbin/exim4";
export const EXIM_USER = "Debian-exim";

/** Call first in a test: true when Exim can run here (missing → fail under CI, else skip). */
export function requireExim(t: Test): boolean {
  return requireAll(t, [needFile(EXIM), needUser(EXIM_USER), needRoot("the Exim daemon starts as root")]);
}

export interface EximOptions {
  host?: string;
  /** The domain accepted (default "test.example"). */
  domain?: string;
  /** Local parts refused at RCPT with 550 5.1.1 (default ["nobody"]). */
  refuse?: string[];
  /** Offer STARTTLS with this certificate and key (PEM files). */
  tls?: { certFile: string; keyFile: string };
}

export interface EximInstance {
  host: string;
  port: number;
  domain: string;
  /** The Maildir every accepted recipient is delivered to. */
  maildir: string;
  dir: string;
  /** Raw bytes of every delivered message, sorted by file name. */
  readMessages(): Promise<Buffer[]>;
  waitForMessages(n: number, timeoutMs: number): Promise<Buffer[]>;
  /** mainlog, rejectlog and paniclog, and the daemon's stderr. */
  log(): Promise<string>;
  stop(): Promise<void>;
}

function config(o: { dir: string; host: string; port: number; domain: string; refuse: string[]; tls: boolean }): string {
  const { dir } = o;
  const lines = [
    "# throw-away Exim for mudmail's interop tests",
    "primary_hostname = exim.mudmail.invalid",
    `exim_path = ${EXIM}`,
    `spool_directory = ${dir}/spool`,
    `log_file_path = ${dir}/log/%slog`,
    `pid_file_path = ${dir}/exim.pid`,
    `daemon_smtp_ports = ${o.port}`,
    `local_interfaces = ${o.host.includes(":") ? `<; ${o.host}` : o.host}`,
    `domainlist local_domains = ${o.domain}`,
    "acl_smtp_rcpt = acl_check_rcpt",
    "message_size_limit = 200M",
    "rfc1413_hosts =",
    "host_lookup =",
    "keep_environment =",
    "smtp_accept_queue_per_connection = 0",
    "smtp_accept_max = 100",
    ...(o.tls
      ? [`tls_certificate = ${dir}/server.crt`, `tls_privatekey = ${dir}/server.key`, "tls_advertise_hosts = *"]
      : ["tls_advertise_hosts ="]),
    "",
    "begin acl",
    "acl_check_rcpt:",
    ...(o.refuse.length > 0
      ? [`  deny local_parts = ${o.refuse.join(" : ")}`, "       message = 550 5.1.1 <$local_part@$domain>: Recipient address rejected: User unknown"]
      : []),
    "  accept domains = +local_domains",
    "  deny message = 550 5.7.1 relay not permitted",
    "",
    "begin routers",
    "local_user:",
    "  driver = accept",
    "  domains = +local_domains",
    "  transport = local_maildir",
    "",
    "begin transports",
    "local_maildir:",
    "  driver = appendfile",
    `  directory = ${dir}/mail/Maildir`,
    "  maildir_format",
    "  create_directory",
    `  user = ${EXIM_USER}`,
    `  group = ${EXIM_USER}`,
    "  mode = 0644",
    "  envelope_to_add",
    "  return_path_add",
    "",
  ];
  return lines.join("\n");
}

export async function startExim(opts: EximOptions = {}): Promise<EximInstance> {
  const host = opts.host ?? "127.0.0.1";
  const domain = opts.domain ?? "test.example";
  const refuse = opts.refuse ?? ["nobody"];
  if (!existsSync(EXIM)) throw new Error(`startExim: ${EXIM} is missing; run scripts/pretest.sh as root`);
  const uid = lookupId("/etc/passwd", EXIM_USER);
  const gid = lookupId("/etc/group", EXIM_USER);
  if (uid === undefined || gid === undefined) throw new Error(`startExim: no ${EXIM_USER} user; run scripts/pretest.sh as root`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-exim-"));
  const remove = removeAtExit(dir);
  await fs.chmod(dir, 0o755);
  for (const sub of ["spool", "log", "mail"]) {
    await fs.mkdir(path.join(dir, sub), { mode: 0o750 });
    await fs.chown(path.join(dir, sub), uid, gid);
  }
  if (opts.tls) {
    // Read by the daemon as root and by its receiving processes as Debian-exim.
    await fs.copyFile(opts.tls.certFile, path.join(dir, "server.crt"));
    await fs.copyFile(opts.tls.keyFile, path.join(dir, "server.key"));
    await fs.chmod(path.join(dir, "server.key"), 0o600);
    for (const f of ["server.crt", "server.key"]) await fs.chown(path.join(dir, f), uid, gid);
  }
  const conf = path.join(dir, "exim.conf");
  const maildir = path.join(dir, "mail", "Maildir");
  const logs = async () => {
    const parts: string[] = [];
    for (const f of ["mainlog", "rejectlog", "paniclog"]) {
      const file = path.join(dir, "log", f);
      if (existsSync(file)) parts.push(`--- ${f} ---\n${await readTail(file, 1e7)}`);
    }
    for (const f of ["exim.stderr", "exim.stdout"]) {
      const text = existsSync(path.join(dir, f)) ? (await readTail(path.join(dir, f), 20000)).trim() : "";
      if (text) parts.push(`--- ${f} ---\n${text}`);
    }
    return parts.join("\n");
  };

  let daemon: Daemon | undefined;
  let port = 0;
  let lastWhy = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    port = await freePort(host);
    // The config must belong to root and not be writable by others, or -C is refused.
    await fs.writeFile(conf, config({ dir, host, port, domain, refuse, tls: !!opts.tls }), { mode: 0o644 });
    const check = spawnDaemon(EXIM, ["-C", conf, "-bV"], dir, "exim-bV");
    const checked = await new Promise<number | null>((resolve) => check.child.once("exit", (code) => resolve(code)));
    await check.stop();
    if (checked !== 0) {
      const why = `\`exim4 -C ${conf} -bV\` exited ${checked}: ${await readTail(path.join(dir, "exim-bV.stderr"))}`;
      await remove();
      throw new Error(`startExim failed: ${why}`);
    }
    daemon = spawnDaemon(EXIM, ["-C", conf, "-bdf"], dir, "exim");
    const d = daemon;
    const ready = await waitForGreeting(host, port, 10_000, () => d.exited());
    if (ready.ok) break;
    await d.stop();
    daemon = undefined;
    lastWhy = ready.why;
    const log = await logs();
    if (!/in use/i.test(log)) break;
  }
  if (!daemon) {
    const log = await logs();
    await remove();
    throw new Error(`startExim failed: ${lastWhy}\n${log}`);
  }
  const running = daemon;
  let stopped = false;
  const inst: EximInstance = {
    host,
    port,
    domain,
    maildir,
    dir,
    readMessages: async () => Promise.all((await listMaildir(maildir)).map((f) => fs.readFile(f))),
    waitForMessages: (n, timeoutMs) => waitForFiles(() => listMaildir(maildir), n, timeoutMs, async () => `--- exim logs ---\n${await logs()}`),
    log: logs,
    async stop() {
      if (stopped) return;
      stopped = true;
      await running.stop();
      await remove();
    },
  };
  return inst;
}
