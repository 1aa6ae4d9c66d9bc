// bench/lib/postfix.mjs - Postfix delivering from its own queue, the system a user would
// otherwise run beside the talker: a private, throw-away instance on loopback (its own
// main.cf, master.cf, queue and data directories, as tests/helpers/postfix.ts runs them)
// that relays everything to one smtp-sink with destination concurrency N.
//
//   const pf = await startPostfix(dir, { sinkPort, concurrency: 10 });
//   await pf.fill(n, size);          // smtp-source into its smtpd: every message is held
//   const cpu0 = pf.cpuSeconds();
//   await pf.release();              // postsuper -H ALL, then postqueue -f
//   ... wait for the sink to count n ...
//   await pf.stop();
//
// What it takes on Debian 12 (Postfix 3.7), found the hard way (see also NOTES.md):
// - maillog_file (+ maillog_file_prefixes, + a postlog service): without them every error
//   goes to syslog, which is not there, and `postfix start` fails without a word.
// - Config files written less than a second before start are re-read every 300 ms:
//   backdated here.
// - data_directory must be owned by postfix (the master opens master.lock in it as postfix).
// - smtp-sink run as root needs -u nobody (lib/sink.mjs does that).
// - The master is a process-group leader: its processes (smtpd, cleanup, qmgr, smtp, ...)
//   are its children, and one kill of the group stops them all. Their CPU time is read from
//   /proc: the children's own, and what the master has reaped from those that have exited.
// - Slow start: initial_destination_concurrency = N, or Postfix begins at 5 connections.
// - Mail is held as it arrives (smtpd_client_restrictions = check_client_access static:HOLD),
//   so the queue fills without a delivery; `postsuper -H ALL` moves it to the deferred queue
//   and `postqueue -f` asks the queue manager to deliver it all now.

import * as fs from "node:fs";
import * as path from "node:path";
import { HOST, SMTP_SOURCE, freePort, waitForGreeting } from "./sink.mjs";
import { FROM } from "./spool.mjs";
import { run, sleep } from "./util.mjs";

export const POSTFIX = "/usr/sbin/postfix";
const POSTSUPER = "/usr/sbin/postsuper";
const POSTQUEUE = "/usr/sbin/postqueue";

function mainCf(dir, sinkPort, concurrency) {
  const refuse = "error:5.1.2 this bench instance relays only to the sink";
  const settings = {
    compatibility_level: "3.6",
    queue_directory: path.join(dir, "queue"),
    data_directory: path.join(dir, "data"),
    mail_owner: "postfix",
    setgid_group: "postdrop",
    syslog_name: `mudmail-bench-${process.pid}`,
    maillog_file: path.join(dir, "maillog"),
    maillog_file_prefixes: dir,
    myhostname: "postfix.bench.invalid",
    mydomain: "bench.invalid",
    myorigin: "$myhostname",
    mydestination: "",
    inet_interfaces: HOST,
    inet_protocols: "ipv4",
    mynetworks: "127.0.0.0/8",
    // Everything goes to the sink; nothing is delivered locally, nothing leaves loopback.
    relayhost: `[${HOST}]:${sinkPort}`,
    relay_domains: "",
    local_transport: refuse,
    local_recipient_maps: "",
    alias_maps: "",
    alias_database: "",
    smtp_dns_support_level: "disabled",
    smtp_host_lookup: "native",
    smtpd_peername_lookup: "no",
    smtp_tls_security_level: "none",
    smtpd_tls_security_level: "none",
    // Held as it arrives: the queue fills without a delivery.
    smtpd_client_restrictions: "check_client_access static:HOLD",
    smtpd_relay_restrictions: "permit_mynetworks, reject",
    smtpd_recipient_restrictions: "permit_mynetworks, reject",
    smtpd_client_connection_count_limit: "1000",
    smtpd_client_connection_rate_limit: "0",
    smtpd_client_message_rate_limit: "0",
    smtpd_error_sleep_time: "0",
    smtpd_junk_command_limit: "100000",
    in_flow_delay: "0",
    // N connections to the sink from the first message on.
    default_destination_concurrency_limit: String(concurrency),
    smtp_destination_concurrency_limit: String(concurrency),
    relay_destination_concurrency_limit: String(concurrency),
    initial_destination_concurrency: String(concurrency),
    default_process_limit: "100",
    qmgr_message_active_limit: "200000",
    qmgr_message_recipient_limit: "200000",
    message_size_limit: String(200 * 1024 * 1024),
    queue_minfree: "0",
    biff: "no",
    append_dot_mydomain: "no",
  };
  return Object.entries(settings).map(([k, v]) => `${k} = ${v}\n`).join("");
}

function masterCf(port) {
  // chroot = n everywhere (column 5): no jail to populate.
  return `${HOST}:${port} inet n - n - - smtpd
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
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`;
}

function idOf(file, name) {
  const line = fs.readFileSync(file, "utf8").split("\n").find((l) => l.startsWith(`${name}:`));
  if (!line) throw new Error(`no ${name} in ${file}: apt-get install postfix`);
  return Number(line.split(":")[2]);
}

/** user + system CPU seconds of a process from /proc/PID/stat, with its reaped children's when asked. */
function procCpu(pid, withReaped) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, "latin1");
  } catch {
    return null;
  }
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // After "pid (comm) ": f[0] is the state; utime, stime, cutime, cstime are fields 14-17 (1-based).
  const ppid = Number(f[1]);
  const ticks = Number(f[11]) + Number(f[12]) + (withReaped ? Number(f[13]) + Number(f[14]) : 0);
  return { ppid, ticks };
}

const TICK = 100; // USER_HZ on Linux

/** The tail of a file, for error messages. */
function tail(file, n = 3000) {
  try {
    const text = fs.readFileSync(file, "utf8");
    return text.slice(-n);
  } catch {
    return "(none)";
  }
}

/**
 * Starts a private Postfix in `dir` relaying to the sink at sinkPort with `concurrency`
 * connections. Rejects with its log when it does not start.
 */
export async function startPostfix(dir, { sinkPort, concurrency }) {
  if (process.getuid?.() !== 0) throw new Error("a private Postfix needs root (its master starts as root)");
  const conf = path.join(dir, "conf");
  const queue = path.join(dir, "queue");
  const data = path.join(dir, "data");
  const maillog = path.join(dir, "maillog");
  // Postfix's own user must reach its data and queue directories through `dir`.
  fs.chmodSync(dir, 0o755);
  for (const d of [conf, queue, data]) fs.mkdirSync(d, { recursive: true, mode: 0o755 });
  fs.chownSync(data, idOf("/etc/passwd", "postfix"), idOf("/etc/group", "postfix"));
  fs.writeFileSync(maillog, "");
  const port = await freePort();
  fs.writeFileSync(path.join(conf, "main.cf"), mainCf(dir, sinkPort, concurrency));
  fs.writeFileSync(path.join(conf, "master.cf"), masterCf(port));
  const past = new Date(Date.now() - 60_000);
  for (const f of ["main.cf", "master.cf"]) fs.utimesSync(path.join(conf, f), past, past);

  let masterPid = null;
  const stop = async () => {
    if (!masterPid) return;
    try { process.kill(-masterPid, "SIGKILL"); } catch { /* gone */ }
    const deadline = Date.now() + 5000;
    while (procCpu(masterPid, false) && Date.now() < deadline) {
      // A zombie (reaped late by pid 1) counts as gone.
      if (/\) Z /.test(fs.readFileSync(`/proc/${masterPid}/stat`, "latin1"))) break;
      await sleep(10);
    }
    masterPid = null;
  };
  const started = await run(POSTFIX, ["-c", conf, "start"], { timeoutMs: 30_000, stderrFile: path.join(dir, "start.err") });
  try {
    masterPid = Number(fs.readFileSync(path.join(queue, "pid", "master.pid"), "utf8").trim()) || null;
  } catch { /* none */ }
  if (started.code !== 0 || !masterPid) {
    await stop();
    throw new Error(`postfix -c ${conf} start: exit ${started.code}${started.timedOut ? " (timed out)" : ""}; log:\n${tail(maillog)}`);
  }
  const ready = await waitForGreeting(port, 10_000, () => (procCpu(masterPid, false) ? null : "the master died"));
  if (!ready.ok) {
    await stop();
    throw new Error(`Postfix's smtpd on ${HOST}:${port}: ${ready.why}; log:\n${tail(maillog)}`);
  }

  const tool = async (cmd, args) => {
    const err = path.join(dir, `${path.basename(cmd)}.err`);
    const r = await run(cmd, args, { timeoutMs: 60_000, stderrFile: err });
    if (r.code !== 0) throw new Error(`${path.basename(cmd)} ${args.join(" ")}: exit ${r.code ?? r.signal}${r.timedOut ? " (timed out)" : ""}: ${tail(err, 500)}\nlog:\n${tail(maillog)}`);
  };
  const countFiles = (folder) => {
    let n = 0;
    const walk = (d) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        if (e.isDirectory()) walk(path.join(d, e.name));
        else n++;
      }
    };
    try { walk(path.join(queue, folder)); } catch { /* not made yet */ }
    return n;
  };

  return {
    port,
    command: `postfix -c ${conf} start`,
    /**
     * Fills the queue through its smtpd with smtp-source (10 sessions, each kept for many
     * messages); every message is held. Resolves { seconds } once all n are in hold/.
     */
    async fill(n, size, timeoutMs) {
      const t0 = performance.now();
      const err = path.join(dir, "fill.err");
      const r = await run(SMTP_SOURCE, ["-d", "-s", "10", "-m", String(n), "-l", String(size), "-f", FROM, "-t", "user@example.test", `${HOST}:${port}`], { timeoutMs, stderrFile: err });
      if (r.code !== 0) throw new Error(`smtp-source into Postfix: exit ${r.code ?? r.signal}${r.timedOut ? " (timed out)" : ""}: ${tail(err, 500)}\nlog:\n${tail(maillog)}`);
      const deadline = Date.now() + timeoutMs;
      let held = countFiles("hold");
      while (held < n && Date.now() < deadline) {
        await sleep(100);
        held = countFiles("hold");
      }
      if (held !== n) throw new Error(`Postfix holds ${held} messages, expected ${n}; log:\n${tail(maillog)}`);
      return { seconds: (performance.now() - t0) / 1000 };
    },
    /** postsuper -H ALL (hold -> deferred), then postqueue -f (deliver everything now). */
    async release() {
      await tool(POSTSUPER, ["-c", conf, "-H", "ALL"]);
      await tool(POSTQUEUE, ["-c", conf, "-f"]);
    },
    /** Messages still in the queue (incoming, active, deferred, hold, maildrop). */
    queued: () => ["incoming", "active", "deferred", "hold", "maildrop"].reduce((sum, f) => sum + countFiles(f), 0),
    /** CPU seconds used by the master and every process it started (running or reaped). */
    cpuSeconds() {
      if (!masterPid) return null;
      let ticks = procCpu(masterPid, true)?.ticks ?? 0;
      for (const name of fs.readdirSync("/proc")) {
        if (!/^\d+$/.test(name) || Number(name) === masterPid) continue;
        const p = procCpu(name, false);
        if (p && p.ppid === masterPid) ticks += p.ticks;
      }
      return ticks / TICK;
    },
    /** Delivery errors in its log (a deferral or bounce means the sink refused). */
    problems: () => (fs.readFileSync(maillog, "utf8").match(/status=(deferred|bounced).*/g) ?? []).slice(0, 3),
    stop,
  };
}
