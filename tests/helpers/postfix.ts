// Test harness: Postfix's smtp-sink and private, throw-away Postfix instances on loopback.
//
// Facts about Postfix on Debian 12 (3.7.x) that this module relies on, found the hard way:
// - Binaries: /usr/sbin/{postfix,postconf,smtp-sink,smtp-source}; daemons live in
//   /usr/lib/postfix/sbin/ (smtpd, virtual, master, postfix-script, ...). They come from the
//   `postfix` package; scripts/pretest.sh installs it (with "No configuration", so
//   /etc/postfix/main.cf does NOT exist and a bare `postconf` dies: always pass `-c DIR`).
// - Docker-style images already ship /usr/sbin/policy-rc.d (exit 101), so installing postfix
//   does not start a system daemon there; pretest.sh creates one only when it is missing.
// - `smtp-sink` as root needs `-u USER` (it drops to that user after bind(), so a dump dir must
//   be writable by USER). Pipelining is ON by default (`-p` turns it off); `-c` prints counters
//   to stdout, which grows huge under load: stdout/stderr go to files, never to a pipe.
// - A private Postfix is just `postfix -c CONFDIR start` with its own main.cf/master.cf,
//   queue_directory and data_directory (master.lock lives in data_directory and master.pid in
//   queue_directory/pid, so two instances with different dirs coexist). No entry in
//   alternate_config_directories is needed as long as we are root and only run
//   `postfix`/`postconf` (only the set-gid postdrop/postqueue check it).
// - Without `maillog_file` (+ `maillog_file_prefixes` allowing its dir, + a `postlog` service in
//   master.cf) every error goes to syslog, which does not exist here: `postfix start` then
//   fails or misbehaves without a word.
// - Postfix's master must start as root; it needs the `postfix` user and `postdrop` group that
//   the Debian package creates. Services here run with chroot = n (Debian's own master.cf uses
//   chroot y, which would need a populated /var/spool/postfix-like jail).
// - The `virtual` agent delivers as virtual_uid_maps (here `nobody`): every directory above the
//   mailbox must be searchable by it and the mailbox base writable by it. mkdtemp() makes 0700
//   dirs, so the temp dir is chmod'ed 0755.
// - Postfix defaults that would distort tests: in_flow_delay = 1s (throttles fast clients),
//   smtpd_error_sleep_time = 1s (every 4xx/5xx reply is delayed), smtpd_junk_command_limit = 100
//   (RSET/NOOP count as junk: a pooled client sending RSET between messages gets cut off),
//   virtual_mailbox_limit = 51200000 (< a 50 MB message + headers). All are overridden below.
// - Postfix's command-line tools (postfix, postconf, ...) write errors to stderr only when
//   stderr is a terminal; run from node they fail with exit 1 and NO message (e.g. a bad
//   mail_owner). On failure, startPostfix re-runs `postfix check` under script(1) to get it.
// - Any Postfix program that dies with "fatal:" sleeps 1 s first (smtp-sink too), so a failed
//   start takes >= 1 s.
// - Postfix re-reads main.cf every 300 ms for as long as its mtime is "hot" (within ~1 s of
//   now): `postfix start` right after writing main.cf took 2.1-2.8 s instead of 0.6 s. The
//   config files are backdated with utimes().
// - The master is a process-group leader (setsid; pid file has leading spaces), so kill(-pid)
//   reaches it and all its children. On SIGTERM (what `postfix stop` sends) it needs 1.2-1.8 s
//   to exit, and `postfix stop` polls with `sleep 1`; stop() SIGKILLs the group instead (~ms).

import { existsSync, readFileSync, rmSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { randomBytes } from "node:crypto";
import type { Test } from "tap";
import {
  atExit, listMaildir, lookupId, readTail, requireAll, run, sleep, spawnDaemon, waitForFiles, waitForGreeting,
} from "./daemon.js";

export const SMTP_SINK = "/usr/sbin/smtp-sink";
export const SMTP_SOURCE = "/usr/sbin/smtp-source";
export const POSTFIX = "/usr/sbin/postfix";
export const POSTCONF = "/usr/sbin/postconf";
export const POSTFIX_SMTPD = "/usr/lib/postfix/sbin/smtpd";
export const POSTFIX_VIRTUAL = "/usr/lib/postfix/sbin/virtual";

const PRETEST = "scripts/pretest.sh";

// ---------------------------------------------------------------------------------------------
// Tools present?

/**
 * Call at the start of a test, before any assertion. Returns true when `toolPath` exists.
 * When it is missing: under CI (process.env.CI set) the test FAILS (never skips in CI),
 * otherwise the test is skipped (plan 0) with the reason. Return right away on false.
 */
export function requireTool(t: Test, toolPath: string | string[]): boolean {
  const paths = Array.isArray(toolPath) ? toolPath : [toolPath];
  return requireAll(t, paths.map((p) => () => (existsSync(p) ? null : `missing ${p}: ${PRETEST} (run by \`npm test\` as pretest) should install it`)));
}

/** requireTool for a private Postfix instance: the tools, and root (Postfix's master needs it). */
export function requirePostfix(t: Test): boolean {
  return requireTool(t, [POSTFIX, POSTCONF, POSTFIX_SMTPD, POSTFIX_VIRTUAL]) &&
    requireAll(t, [() => (process.getuid?.() === 0 ? null : "a private Postfix instance needs root (its master starts as root)")]);
}

// ---------------------------------------------------------------------------------------------
// Small utilities


/** A TCP port that was free a moment ago on `host` (bind to port 0, read it, close). */
export async function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const addr = srv.address();
      if (!addr || typeof addr === "string") {
        srv.close();
        reject(new Error("freePort: no address"));
        return;
      }
      const port = addr.port;
      srv.close((err) => (err ? reject(err) : resolve(port)));
    });
  });
}

function hostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** True while `pid` runs. A zombie counts as gone: Postfix's master is reparented to pid 1
 * once `postfix start` exits, and pid 1 (here not a real init) may reap it a second late. */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    // "pid (comm) S ...": the state follows the last ')'.
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

// ---------------------------------------------------------------------------------------------
// smtp-sink

export interface SmtpSinkOptions {
  host?: string;
  /** Announce PIPELINING (default true; false adds `-p`). */
  pipelining?: boolean;
  /** Dump each transaction into a file under dumpDir (`-d`). Slows the sink down a lot. */
  dump?: boolean;
  /** More smtp-sink flags, placed before the address (e.g. ["-c"], ["-r", "RCPT"]). */
  extraArgs?: string[];
}

export interface SmtpSink {
  host: string;
  port: number;
  dumpDir?: string;
  /** smtp-sink's stdout (e.g. the `-c` counters), read from its file. */
  output(): Promise<string>;
  stop(): Promise<void>;
}

export async function startSmtpSink(opts: SmtpSinkOptions = {}): Promise<SmtpSink> {
  const host = opts.host ?? "127.0.0.1";
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-sink-"));
  await fs.chmod(dir, 0o755);
  const isRoot = process.getuid?.() === 0;
  let dumpDir: string | undefined;
  if (opts.dump) {
    dumpDir = path.join(dir, "dump");
    await fs.mkdir(dumpDir, { mode: 0o755 });
    if (isRoot) await fs.chown(dumpDir, (lookupId("/etc/passwd", "nobody") ?? 65534), (lookupId("/etc/group", "nogroup") ?? 65534));
  }
  let lastErr = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    const port = await freePort(host);
    const args: string[] = [];
    if (isRoot) args.push("-u", "nobody");
    args.push(host.includes(":") ? "-6" : "-4");
    if (opts.pipelining === false) args.push("-p");
    if (dumpDir) args.push("-d", path.join(dumpDir, "%Y%m%d%H%M%S."));
    args.push(...(opts.extraArgs ?? []));
    args.push(hostPort(host, port), "256");
    const sink = spawnDaemon(SMTP_SINK, args, dir, `smtp-sink-${attempt}`);
    const forget = atExit(() => rmSync(dir, { recursive: true, force: true }));
    const ready = await waitForGreeting(host, port, 5000, () => sink.exited());
    if (ready.ok) {
      let stopped = false;
      return {
        host,
        port,
        dumpDir,
        output: () => fs.readFile(sink.stdoutFile, "utf8").catch(() => ""),
        async stop() {
          if (stopped) return;
          stopped = true;
          await sink.stop();
          forget();
          await fs.rm(dir, { recursive: true, force: true });
        },
      };
    }
    // failed: clean up this attempt
    await sink.kill("SIGKILL");
    forget();
    const stderr = await readTail(sink.stderrFile, 4000);
    lastErr = `${ready.why}; command: ${SMTP_SINK} ${args.join(" ")}; stderr: ${stderr.trim() || "(empty)"}`;
    // Retry only when another process grabbed the port between freePort() and bind().
    if (!/in use/i.test(stderr)) break;
  }
  await fs.rm(dir, { recursive: true, force: true });
  throw new Error(`startSmtpSink failed: ${lastErr}`);
}

// ---------------------------------------------------------------------------------------------
// Private Postfix instance

export interface PostfixOptions {
  host?: string;
  /** The port to listen on (several instances on 127.0.0.x with one port, as MX hosts); a free one when not given. */
  port?: number;
  /** Every recipient of this domain goes into one Maildir (default "test.example"). */
  domain?: string;
  /** Extra/overriding main.cf settings, e.g. { smtpd_forbid_bare_newline: "yes" }. */
  mainCf?: Record<string, string>;
}

export interface PostfixInstance {
  host: string;
  port: number;
  domain: string;
  /** The Maildir (with trailing slash) that every recipient of `domain` is delivered to. */
  maildir: string;
  /** The instance's temp dir (conf/, queue/, data/, vmail/, maillog). */
  dir: string;
  stop(): Promise<void>;
  /** Raw bytes of every delivered message (Maildir new/ and cur/), sorted by file name. */
  readMessages(): Promise<Buffer[]>;
  /** Poll (every 50 ms) until at least n messages are delivered; reject after timeoutMs. */
  waitForMessages(n: number, timeoutMs: number): Promise<Buffer[]>;
  /** The instance's Postfix log. */
  log(): Promise<string>;
  /** How long startPostfix took, in ms. */
  startMs: number;
}

/** daemon.ts's run(), its output in one string; a command that cannot run or ends late is an exit code null. */
async function runTool(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number | null; out: string }> {
  try {
    const r = await run(cmd, args, { timeoutMs });
    return { code: r.code, out: `${r.stdout}${r.stderr}`.trim() };
  } catch (e) {
    return { code: null, out: (e as Error).message };
  }
}

function mainCf(o: {
  dir: string;
  host: string;
  domain: string;
  uid: number;
  gid: number;
  name: string;
  extra: Record<string, string>;
}): string {
  const { dir, host, domain } = o;
  const v4 = !host.includes(":");
  const refuse = `error:5.1.2 this mudmail test instance delivers only to ${domain}`;
  const settings: Record<string, string> = {
    compatibility_level: "3.6",
    queue_directory: path.join(dir, "queue"),
    data_directory: path.join(dir, "data"),
    mail_owner: "postfix",
    setgid_group: "postdrop",
    syslog_name: o.name,
    maillog_file: path.join(dir, "maillog"),
    maillog_file_prefixes: dir,
    myhostname: "postfix.mudmail.invalid",
    mydomain: "mudmail.invalid",
    myorigin: "$myhostname",
    mydestination: "",
    inet_interfaces: host,
    inet_protocols: v4 ? "ipv4" : "ipv6",
    mynetworks: v4 ? "127.0.0.0/8" : "[::1]/128",
    // Nothing ever leaves this machine: only the test domain is delivered, the rest bounces.
    relayhost: "",
    relay_domains: "",
    default_transport: refuse,
    relay_transport: refuse,
    local_transport: refuse,
    local_recipient_maps: "",
    alias_maps: "",
    alias_database: "",
    // Every recipient of the domain -> one Maildir, owned by nobody.
    virtual_mailbox_domains: domain,
    virtual_mailbox_base: path.join(dir, "vmail"),
    virtual_mailbox_maps: "static:Maildir/",
    virtual_uid_maps: `static:${o.uid}`,
    virtual_gid_maps: `static:${o.gid}`,
    virtual_minimum_uid: "100",
    virtual_mailbox_limit: "0",
    mailbox_size_limit: "0",
    message_size_limit: String(200 * 1024 * 1024),
    queue_minfree: "0",
    // No DNS at all.
    smtp_host_lookup: "native",
    lmtp_host_lookup: "native",
    smtp_dns_support_level: "disabled",
    smtpd_peername_lookup: "no",
    // Permissive for loopback, fast, and no throttling.
    smtpd_relay_restrictions: "permit_mynetworks, reject_unauth_destination",
    smtpd_recipient_restrictions: "permit_mynetworks, reject_unauth_destination",
    smtpd_helo_required: "no",
    smtpd_recipient_limit: "1000",
    smtpd_client_connection_count_limit: "1000",
    smtpd_client_connection_rate_limit: "0",
    smtpd_client_message_rate_limit: "0",
    smtpd_client_recipient_rate_limit: "0",
    smtpd_client_new_tls_session_rate_limit: "0",
    smtpd_junk_command_limit: "100000",
    smtpd_error_sleep_time: "0",
    smtpd_banner: "$myhostname ESMTP mudmail-test",
    in_flow_delay: "0",
    default_process_limit: "100",
    smtpd_tls_security_level: "none",
    smtp_tls_security_level: "none",
    biff: "no",
    append_dot_mydomain: "no",
    ...o.extra,
  };
  return Object.entries(settings)
    .map(([k, v]) => `${k} = ${v}`)
    .join("\n") + "\n";
}

function masterCf(host: string, port: number): string {
  // chroot = n everywhere (column 5).
  return `# service type  private unpriv  chroot  wakeup  maxproc command
${hostPort(host, port)} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`;
}

async function readMasterPid(queueDir: string): Promise<number | undefined> {
  try {
    const n = Number((await fs.readFile(path.join(queueDir, "pid", "master.pid"), "utf8")).trim());
    return Number.isInteger(n) && n > 1 ? n : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Kill a master's whole process group (master, smtpd, qmgr, postlogd, ...) and wait (bounded)
 * until the master is gone. SIGKILL, not SIGTERM: on SIGTERM the master takes 1.2-1.8 s to exit
 * (its "terminating" log line goes to the already-dead postlogd), and a throw-away instance
 * needs no orderly shutdown.
 */
async function killMaster(pid: number): Promise<void> {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      /* gone */
    }
  }
  const deadline = Date.now() + 5000;
  while (isAlive(pid) && Date.now() < deadline) await sleep(5);
  if (isAlive(pid)) throw new Error(`Postfix master ${pid} still alive 5 s after SIGKILL`);
}

/**
 * Postfix's command-line tools print errors on stderr only when it is a terminal (otherwise
 * only to syslog/maillog, which is not up yet when `postfix start` dies early, e.g. on a bad
 * main.cf value). `postfix check` run under script(1)'s pseudo-terminal shows them.
 */
async function diagnose(conf: string): Promise<string> {
  if (!existsSync("/usr/bin/script")) return "";
  const r = await runTool("/usr/bin/script", ["-qec", `${POSTFIX} -c '${conf}' check`, "/dev/null"], 10000);
  return r.out ? `\n--- \`postfix -c ${conf} check\` on a pty ---\n${r.out}` : "";
}

export async function startPostfix(opts: PostfixOptions = {}): Promise<PostfixInstance> {
  const host = opts.host ?? "127.0.0.1";
  const domain = opts.domain ?? "test.example";
  if (process.getuid?.() !== 0) {
    throw new Error("startPostfix: needs root (Postfix's master starts as root); see requirePostfix()");
  }
  for (const p of [POSTFIX, POSTCONF, POSTFIX_SMTPD, POSTFIX_VIRTUAL]) {
    if (!existsSync(p)) throw new Error(`startPostfix: ${p} is missing; run ${PRETEST} (as root)`);
  }
  const uid = (lookupId("/etc/passwd", "nobody") ?? 65534);
  const gid = (lookupId("/etc/group", "nogroup") ?? 65534);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-postfix-"));
  await fs.chmod(dir, 0o755);
  const conf = path.join(dir, "conf");
  const queue = path.join(dir, "queue");
  const vmail = path.join(dir, "vmail");
  const logFile = path.join(dir, "maillog");
  const maildir = path.join(vmail, "Maildir") + "/";
  const name = `mudmail-pf-${randomBytes(4).toString("hex")}`;
  await fs.mkdir(conf, { mode: 0o755 });
  await fs.mkdir(queue, { mode: 0o755 });
  // data_directory: NOT created here; `postfix start` creates it owned by postfix (master opens
  // master.lock in it with the postfix user's privileges, so a root-owned one fails).
  await fs.mkdir(vmail, { mode: 0o755 });
  await fs.chown(vmail, uid, gid);
  await fs.writeFile(logFile, "");

  let masterPid: number | undefined;
  const forget = atExit(() => {
    if (masterPid) {
      try {
        process.kill(-masterPid, "SIGKILL");
      } catch {
        /* gone */
      }
    }
    rmSync(dir, { recursive: true, force: true });
  });
  const fail = async (why: string): Promise<never> => {
    const pid = masterPid ?? (await readMasterPid(queue));
    if (pid) await killMaster(pid);
    const log = await readTail(logFile);
    forget();
    await fs.rm(dir, { recursive: true, force: true });
    throw new Error(`startPostfix failed: ${why}\n--- postfix log (${logFile}) ---\n${log}`);
  };

  const started = Date.now();
  let port = 0;
  for (let attempt = 1; ; attempt++) {
    port = opts.port ?? (await freePort(host));
    await fs.writeFile(
      path.join(conf, "main.cf"),
      mainCf({ dir, host, domain, uid, gid, name, extra: opts.mainCf ?? {} }),
    );
    await fs.writeFile(path.join(conf, "master.cf"), masterCf(host, port));
    // Postfix re-reads a config file every 300 ms while its mtime is within the last second or
    // so ("let it cool down"): freshly written, that adds ~2 s to `postfix start`. Backdate them.
    const past = new Date(Date.now() - 60_000);
    await fs.utimes(path.join(conf, "main.cf"), past, past);
    await fs.utimes(path.join(conf, "master.cf"), past, past);
    const r = await runTool(POSTFIX, ["-c", conf, "start"], 20000);
    if (r.code !== 0) {
      const log = await readTail(logFile, 4000);
      // Someone took the port between freePort() and master's bind(): try another one.
      if (attempt < 3 && opts.port === undefined && /address already in use/i.test(log + r.out)) {
        await fs.writeFile(logFile, "");
        continue;
      }
      return fail(
        `\`${POSTFIX} -c ${conf} start\` exited ${r.code}: ${r.out}` +
          (await diagnose(conf)),
      );
    }
    break;
  }
  masterPid = await readMasterPid(queue);
  if (!masterPid) return fail(`no master pid in ${queue}/pid/master.pid after \`postfix start\``);
  const ready = await waitForGreeting(host, port, 10000, () =>
    masterPid && !isAlive(masterPid) ? `master (pid ${masterPid}) died` : undefined,
  );
  if (!ready.ok) return fail(ready.why);
  const startMs = Date.now() - started;

  let stopped = false;
  const inst: PostfixInstance = {
    host,
    port,
    domain,
    maildir,
    dir,
    async stop() {
      if (stopped) return;
      stopped = true;
      if (masterPid) await killMaster(masterPid);
      forget();
      await fs.rm(dir, { recursive: true, force: true });
    },
    async readMessages() {
      const files = await listMaildir(maildir);
      return Promise.all(files.map((f) => fs.readFile(f)));
    },
    waitForMessages: (n: number, timeoutMs: number) =>
      waitForFiles(() => listMaildir(maildir), n, timeoutMs, async () => `--- postfix log ---\n${await readTail(logFile, 8000)}`),
    log: () => readTail(logFile, 1e9),
    startMs,
  };
  return inst;
}

/**
 * smtpd's TLS needs the tlsmgr service (its PRNG seed: without it "no entropy for TLS key
 * generation: disabling TLS support" and STARTTLS answers 454), which the instance's master.cf
 * lacks: add it and reload. smtpd processes started before (the readiness probe's) ran without
 * TLS; a reload makes the master replace them.
 */
export async function addTlsmgr(pf: PostfixInstance): Promise<void> {
  const conf = path.join(pf.dir, "conf");
  const masterCf = path.join(conf, "master.cf");
  await fs.appendFile(masterCf, "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n");
  const past = new Date(Date.now() - 60_000);
  await fs.utimes(masterCf, past, past);
  const r = await runTool(POSTFIX, ["-c", conf, "reload"], 20_000);
  if (r.code !== 0) throw new Error(`postfix reload failed (exit ${r.code}): ${r.out}`);
  const socket = path.join(pf.dir, "queue", "private", "tlsmgr");
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (Date.now() > deadline) throw new Error(`no ${socket} 10 s after postfix reload\n${await pf.log()}`);
    await sleep(50);
  }
  // The reload is done once the master logs it; smtpd processes of the old configuration exit.
  await sleep(300);
}
