// bench/run.mjs - mudmail against Nodemailer, Postfix and Postfix's smtp-source, side by side,
// in one run.
//
//   node build.mjs && node bench/run.mjs [--quick] [--repeat N] [--only REGEX] [--cpu-prof DIR] [--dir DIR]
//                                        [--fresh-spools] [--library FILE] [--out FILE]
//   node bench/run.mjs --chart RESULTS.json | --markdown RESULTS.json
//
// Every figure comes from this one run on this machine, everything on loopback, with
// Postfix's smtp-sink (PIPELINING announced) as the server, on the same CPUs. mudmail runs
// with the engine's default options (fsync on): its queue files are on disk before the timed
// flush, as send() leaves them (or another program that drops fsynced files in outgoing/).
//
//   1. throughput   20,000 queued 1 KB messages through 1, 5, 10, 20 slots: mudmail (queue
//                   files dropped in outgoing/ beforehand, not timed: copies of a stock written
//                   once per run, then the file system synced, see lib/spool.mjs), Nodemailer
//                   (pooled SMTP, the same bytes as raw messages, every sendMail at once),
//                   smtp-source one message per session and with -d; Postfix delivering the
//                   same number from its own queue (a private instance, filled while its mail
//                   is held, then released: postsuper -H ALL, postqueue -f; destination
//                   concurrency 10, lib/postfix.mjs); the same 20,000 through send() then one
//                   flush(); and, labelled, the old method (hard-linked stock, fsync off);
//                   200 messages of 1 MB
//   2. host         the event-loop delay while mudmail / Nodemailer send
//   3. large        2,000 messages of 100 KB through send() then one flush(), 10 slots,
//                   unsigned and DKIM-signed (RSA-2048, the engine's --dkim-* options, the key
//                   made by --dkim-keygen), msgs/s and MB/s; Nodemailer's pool on the same body,
//                   unsigned and with its own DKIM signing
//   4. receiver     the receiver (--serve), 20 smtp-source sessions into one mailbox
//   5. scale        spools of 1,000, 10,000 and 100,000 messages, 5 slots: cost per message
//   6. big          one 50 MB message: RSS growth over the idle (warmed) engine, 20 ms samples
//   7. latency      send() to the sink's 250 on a started engine, default options, 1,000 in a row
//
// Each measurement runs in its own process (bench/worker.mjs) with a time limit, against
// its own smtp-sink; temp dirs and processes go away in finally blocks. Prints a table with
// the targets of issues 13 and 7 marked met or missed, writes bench/results.json and draws
// the throughput table as bench/throughput.svg (with --quick or --only: results-partial.json
// and throughput-partial.svg). Nodemailer is a dependency of bench/ only (bench/package.json),
// installed here on first use. Exit status 1 when a measurement failed (a message not
// delivered, a worker that crashed or timed out); a missed target is a result, not a failure.
//
//   --quick         a tenth of every count, one round: a smoke test of the script, not a result
//   --repeat N      rounds of the throughput and scale cases (default 3): each figure is the
//                   fastest round, since other work on a shared machine only ever slows a run
//   --only REGEX    only the cases whose name matches (names: throughput/mudmail/10,
//                   throughput/postfix/10, large/mudmail-dkim/10, receiver/20, scale/100000, ...)
//   --dir DIR       where the spools go (default: the OS temp dir, a disk; /dev/shm shows the
//                   engine without the file system's cost)
//   --fresh-spools  write every case's queue files afresh (then sync) instead of copying them
//                   from a stock written once per run (slow where creating files is slow)
//   --library FILE  the engine to measure (default dist/index.js, which npm run bench builds)
//   --cpu-prof DIR  run the matching workers under node --cpu-prof, profiles into DIR/<case>/,
//                   one per thread, and the timed flush's window (summarise with:
//                   node bench/profile-summary.mjs DIR/<case>/*.cpuprofile)
//   --chart FILE    draw the SVG chart from a results file written before, and do nothing else
//   --markdown FILE print a results file as the README's Performance tables, and do nothing else

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { HOST, SMTP_SINK, SMTP_SOURCE, startSink } from "./lib/sink.mjs";
import { DKIM_DOMAIN, DKIM_FROM, DKIM_SELECTOR, FROM, Stock, queueId, syncFs, unlinkCost, writeBigMessage, writeSpool } from "./lib/spool.mjs";
import { startPostfix, POSTFIX } from "./lib/postfix.mjs";
import { throughputChart } from "./lib/chart.mjs";
import { markdown } from "./lib/markdown.mjs";
import { fmt, fmtInt, killAllChildren, margin, round, run, sleep, table } from "./lib/util.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.join(here, "..");
const WORKER = path.join(here, "worker.mjs");
// Every case runs once first (issue 13's rows first), then the repeat rounds; a repeat that
// would start past BUDGET_S is left out (its first round stands), a first round past
// HARD_BUDGET_S is skipped and counted as a failure. A default run takes about 20 minutes.
const BUDGET_S = 1500;
const HARD_BUDGET_S = 2400;

/* ---------------------------------------------------------------------------------- */
/* Arguments                                                                           */

function usage(message) {
  if (message) console.error(`run.mjs: ${message}`);
  console.error("usage: node bench/run.mjs [--quick] [--repeat N] [--only REGEX] [--cpu-prof DIR] [--dir DIR] [--fresh-spools] [--library FILE] [--out FILE] [--chart RESULTS.json] [--markdown RESULTS.json]");
  process.exit(message ? 2 : 0);
}

const opts = { quick: false, only: null, cpuProf: null, out: null, repeat: null, dir: null, library: null, freshSpools: false, chart: null, markdown: null };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === "--quick") opts.quick = true;
  else if (a === "--only") opts.only = new RegExp(process.argv[++i] ?? usage("--only needs a REGEX"));
  else if (a === "--cpu-prof") opts.cpuProf = path.resolve(process.argv[++i] ?? usage("--cpu-prof needs a DIR"));
  else if (a === "--library") opts.library = path.resolve(process.argv[++i] ?? usage("--library needs a FILE"));
  else if (a === "--fresh-spools") opts.freshSpools = true;
  else if (a === "--dir") opts.dir = path.resolve(process.argv[++i] ?? usage("--dir needs a DIR"));
  else if (a === "--out") opts.out = path.resolve(process.argv[++i] ?? usage("--out needs a FILE"));
  else if (a === "--chart") opts.chart = path.resolve(process.argv[++i] ?? usage("--chart needs a RESULTS.json"));
  else if (a === "--markdown") opts.markdown = path.resolve(process.argv[++i] ?? usage("--markdown needs a RESULTS.json"));
  else if (a === "--repeat") {
    opts.repeat = Number(process.argv[++i]);
    if (!Number.isInteger(opts.repeat) || opts.repeat < 1 || opts.repeat > 10) usage("--repeat: expected 1..10");
  } else if (a === "--help" || a === "-h") usage();
  else usage(`unknown argument ${JSON.stringify(a)}`);
}
const partial = opts.quick || opts.only !== null;
const outFile = opts.out ?? path.join(here, partial ? "results-partial.json" : "results.json");
const svgFile = path.join(here, partial ? "throughput-partial.svg" : "throughput.svg");
const q = (n) => (opts.quick ? Math.max(1, Math.round(n / 10)) : n);
const REPEAT = opts.repeat ?? (opts.quick ? 1 : 3);

const N = q(20_000);
const SIZE = 1024;
const SLOTS = [1, 5, 10, 20];
const ONE_MB = { n: q(200), size: 1024 * 1024, slots: 5 };
const SCALE = [q(1_000), q(10_000), q(100_000)];
const SCALE_SLOTS = 5;
const BIG = q(50) * 1024 * 1024;
const LATENCY = { n: q(1_000), warmup: 10 };
const POSTFIX_CONCURRENCY = 10;
const LARGE = { n: q(2_000), size: 100 * 1024, slots: 10 };
const RECEIVER = { n: q(10_000), sessions: 20, size: SIZE };

/* ---------------------------------------------------------------------------------- */
/* Bookkeeping                                                                         */

const started = performance.now();
const elapsed = () => (performance.now() - started) / 1000;
const failures = [];
let interrupted = false;
let tmpRoot = null;
let library = null; // this run's copy of dist/index.js
let dkimKey = null; // { domain, selector, key }: the run's RSA-2048 DKIM key, made by the CLI's --dkim-keygen
const stocks = new Map(); // body size -> Stock: queue files written once, linked into each case

let currentRep = 1; // which round of the repeated cases is running
const progress = (text) => process.stderr.write(`[${fmt(elapsed(), 1).padStart(5)} s] ${text}${REPEAT > 1 && currentRep > 1 ? ` (round ${currentRep})` : ""}\n`);
const slug = (name) => name.replace(/[^A-Za-z0-9]+/g, "-");

/** The fastest successful run of a repeated measurement, with every run's msgs/s beside it. */
function fastest(results) {
  const all = (results ?? []).filter(Boolean);
  if (all.length === 0) return null;
  const ok = all.filter((r) => r.ok);
  const best = (ok.length ? ok : all).reduce((a, b) => ((b.msgsPerSec ?? 0) > (a.msgsPerSec ?? 0) ? b : a));
  return { ...best, runs: all.map((r) => r.msgsPerSec) };
}

function wanted(name) {
  return opts.only === null || opts.only.test(name);
}

/** Runs a case when it is wanted and time is left; a throw is recorded as a failure. */
async function runCase(name, fn) {
  if (!wanted(name)) return null;
  if (interrupted) throw new Error("interrupted");
  if (currentRep > 1 && elapsed() > BUDGET_S) return null; // a repeat: the first run stands
  if (elapsed() > HARD_BUDGET_S) {
    failures.push(`${name}: skipped, the run is past its ${HARD_BUDGET_S} s budget`);
    progress(`${name}: SKIPPED (time budget)`);
    return null;
  }
  const dir = await fs.promises.mkdtemp(path.join(tmpRoot, slug(name) + "-"));
  try {
    const result = await fn(dir);
    result.loadAverage = round(os.loadavg()[0], 2);
    if (!result.ok) {
      failures.push(`${name}: ${result.problems.join("; ")}`);
      progress(`${name}: FAILED: ${result.problems.join("; ")}`);
    }
    return result;
  } catch (err) {
    if (interrupted) throw err;
    failures.push(`${name}: ${err.message}`);
    progress(`${name}: FAILED: ${err.message}`);
    return null;
  } finally {
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}

/** One smtp-sink for the duration of fn. */
async function withSink(dir, fn) {
  const sink = await startSink(dir);
  try {
    return await fn(sink);
  } finally {
    await sink.stop();
  }
}

/** Runs bench/worker.mjs with a time limit; resolves its JSON result. */
async function worker(name, dir, args, timeoutS, nodeFlags = []) {
  const out = path.join(dir, "result.json");
  const flags = [...nodeFlags];
  let into = null;
  if (opts.cpuProf) {
    // A folder per case, Node's own file names: the host's thread and the spool's worker
    // thread each write their profile (CPU.<date>.<time>.<pid>.<thread>.<n>.cpuprofile).
    into = path.join(opts.cpuProf, `${slug(name)}${REPEAT > 1 ? `-run${currentRep}` : ""}`);
    fs.mkdirSync(into, { recursive: true });
    flags.push("--cpu-prof", `--cpu-prof-dir=${into}`);
  }
  const stderrFile = path.join(dir, "worker.err");
  const r = await run(process.execPath, [...flags, WORKER, JSON.stringify({ ...args, library, out })], {
    timeoutMs: timeoutS * 1000, stdoutFile: path.join(dir, "worker.out"), stderrFile,
  });
  const stderr = fs.existsSync(stderrFile) ? fs.readFileSync(stderrFile, "utf8").trim().slice(0, 2000) : "";
  if (r.timedOut) throw new Error(`worker took longer than ${timeoutS} s and was killed`);
  if (r.error) throw new Error(`cannot start the worker: ${r.error}`);
  if (!fs.existsSync(out)) throw new Error(`worker exited (code ${r.code}, signal ${r.signal}) without a result; stderr: ${stderr || "(empty)"}`);
  const result = JSON.parse(fs.readFileSync(out, "utf8"));
  // The timed part's window (monotonic µs), so profile-summary.mjs can leave out the setup.
  if (into && result.window) fs.writeFileSync(path.join(into, "window.json"), JSON.stringify(result.window) + "\n");
  return result;
}

/** smtp-sink must have seen exactly n messages. */
async function checkSink(sink, n, result) {
  const c = await sink.waitForMessages(n);
  result.sinkMessages = c.mesg;
  result.sinkSessions = c.sess;
  if (c.mesg !== n) {
    result.ok = false;
    result.problems = [...(result.problems ?? []), `smtp-sink counted ${c.mesg} messages, expected ${n}`];
  }
  return result;
}

/* ---------------------------------------------------------------------------------- */
/* The cases                                                                           */

/**
 * mudmail: n queue files dropped in outgoing/ (not timed), then one timed flush in a worker,
 * with the engine's default options. The files are copies of a stock, synced to disk
 * (lib/spool.mjs); with { linked: true } hard links to it and fsync off instead: the old,
 * cheap method, for one labelled row.
 */
function mudmailCase(name, n, size, slots, { linked = false } = {}) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const maildir = path.join(dir, "maildir");
    const concurrency = size > 65536 ? 4 : 16;
    let spool;
    if (opts.freshSpools && !linked) {
      const seconds = await writeSpool(maildir, n, size, { concurrency });
      const t0 = performance.now();
      syncFs(maildir);
      spool = { seconds, syncSeconds: (performance.now() - t0) / 1000 };
    } else {
      if (!stocks.has(size)) stocks.set(size, new Stock(path.join(tmpRoot, `stock-${size}`), size, { concurrency }));
      spool = linked ? { seconds: await stocks.get(size).linkInto(maildir, n), syncSeconds: 0 } : await stocks.get(size).copyInto(maildir, n);
    }
    const timeout = 60 + Math.ceil(n / 200) + Math.ceil((n * size) / (10 * 1024 * 1024));
    const r = await worker(name, dir, {
      case: "mudmail-flush", maildir, port: sink.port, slots, expect: n, size, logFile: path.join(dir, "mudmail.log"),
      ...(linked ? { fsync: false } : {}),
    }, timeout);
    r.spool = linked ? "hard links to a stock, fsync off" : `${opts.freshSpools ? "written" : "copied"} and synced`;
    r.spoolSeconds = round(spool.seconds, 2);
    r.syncSeconds = round(spool.syncSeconds, 2);
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s, ${fmt(r.usPerMsg)} µs/msg (CPU ${fmt(r.cpuUsPerMsg)}), loop p99 ${r.loop?.p99} max ${r.loop?.max} ms, ` +
      `peak RSS ${r.rssPeakMB} MB (spool ${r.spool} in ${fmt(spool.seconds, 2)} + ${fmt(spool.syncSeconds, 2)} s)`);
    return r;
  }));
}

/** mudmail as a new user runs it: n messages through send() (defaults: fsync on), then one timed flush(). */
function sendCase(name, n, size, slots, { dkim = false } = {}) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const maildir = path.join(dir, "maildir");
    const timeout = 60 + Math.ceil(n / 50) + Math.ceil((n * size) / (5 * 1024 * 1024));
    const r = await worker(name, dir, {
      case: "mudmail-send", maildir, port: sink.port, slots, n, size, logFile: path.join(dir, "mudmail.log"),
      ...(dkim ? { dkim: dkimKey, from: DKIM_FROM } : {}),
    }, timeout);
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s${size > 65536 ? ` (${fmt(r.mbPerSec)} MB/s)` : ""}, CPU ${fmt(r.cpuUsPerMsg)} µs/msg, loop p99 ${r.loop?.p99} max ${r.loop?.max} ms, ` +
      `peak RSS ${r.rssPeakMB} MB; send() ${fmtInt(r.sendsPerSec)}/s before it`);
    return r;
  }));
}

function nodemailerCase(name, n, size, slots, { composed = false, dkim = false } = {}) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const timeout = 30 + Math.ceil(n / 300) + Math.ceil((n * size) / (5 * 1024 * 1024));
    const r = await worker(name, dir, { case: "nodemailer", port: sink.port, slots, n, size, composed, ...(dkim ? { dkim: dkimKey, from: DKIM_FROM } : {}) }, timeout);
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s${size > 65536 ? ` (${fmt(r.mbPerSec)} MB/s)` : ""}, loop p99 ${r.loop?.p99} ms, peak RSS ${r.rssPeakMB} MB`);
    return r;
  }));
}

/**
 * Postfix delivering n messages from its own queue into the sink: a private instance
 * (lib/postfix.mjs) filled through its smtpd while its mail is held (not timed), then timed
 * from `postsuper -H ALL` + `postqueue -f` until the sink has counted n and the queue is empty.
 */
function postfixCase(name, n, size, concurrency) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const timeout = 60_000 + Math.ceil(n / 100) * 1000;
    const pf = await startPostfix(dir, { sinkPort: sink.port, concurrency });
    try {
      const fill = await pf.fill(n, size, timeout);
      const cpu0 = pf.cpuSeconds();
      const t0 = performance.now();
      await pf.release();
      const c = await sink.waitForMessages(n, timeout);
      const deadline = Date.now() + 10_000;
      while (pf.queued() > 0 && Date.now() < deadline) await sleep(20);
      const seconds = (performance.now() - t0) / 1000;
      const cpu = pf.cpuSeconds() - cpu0;
      const problems = pf.problems().map((l) => `postfix: ${l}`);
      if (pf.queued() > 0) problems.push(`${pf.queued()} messages still in Postfix's queue`);
      const r = {
        ok: problems.length === 0, problems, command: `${pf.command}; postsuper -H ALL; postqueue -f`, concurrency,
        messages: n, seconds: round(seconds, 3), msgsPerSec: Math.round(n / seconds),
        cpuSeconds: round(cpu, 2), cpuUsPerMsg: round((cpu * 1e6) / n, 0),
        fillSeconds: round(fill.seconds, 2), fillMsgsPerSec: Math.round(n / fill.seconds),
      };
      if (c.mesg !== n) {
        r.ok = false;
        r.problems.push(`smtp-sink counted ${c.mesg} messages, expected ${n}`);
      }
      r.sinkMessages = c.mesg;
      progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s, Postfix's CPU ${fmt(r.cpuUsPerMsg, 0)} µs/msg (filled at ${fmtInt(r.fillMsgsPerSec)} msgs/s, held)`);
      return r;
    } finally {
      await pf.stop();
    }
  }));
}

/** The receiver: smtp-source's sessions into one mailbox, timed by the worker. */
function receiverCase(name, { n, sessions, size }) {
  return runCase(name, async (dir) => {
    const timeoutMs = (60 + Math.ceil(n / 50)) * 1000;
    const r = await worker(name, dir, {
      case: "receiver", maildir: path.join(dir, "maildir"), n, sessions, size, timeoutMs, stderrFile: path.join(dir, "smtp-source.err"),
    }, timeoutMs / 1000 + 30);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s stored, ${r.messagesPerSync ?? "-"} messages per fsync, CPU ${fmt(r.cpuUsPerMsg)} µs/msg, loop p99 ${r.loop?.p99} ms`);
    return r;
  });
}

/** Postfix's C load generator, timed from spawn to exit; its max RSS from /usr/bin/time. */
function smtpSourceCase(name, n, size, slots, keepSession) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const args = ["-s", String(slots), "-m", String(n), "-l", String(size), "-f", FROM, "-t", "user@example.test"];
    if (keepSession) args.unshift("-d");
    args.push(`${HOST}:${sink.port}`);
    const timeFile = path.join(dir, "time.out");
    const haveTime = fs.existsSync("/usr/bin/time");
    const cmd = haveTime ? "/usr/bin/time" : SMTP_SOURCE;
    const argv = haveTime ? ["-o", timeFile, "-f", "%M", SMTP_SOURCE, ...args] : args;
    const stderrFile = path.join(dir, "smtp-source.err");
    const timeout = 30 + Math.ceil(n / 500) + Math.ceil((n * size) / (20 * 1024 * 1024));
    const p = await run(cmd, argv, { timeoutMs: timeout * 1000, stderrFile });
    const seconds = p.ms / 1000;
    const problems = [];
    if (p.timedOut) problems.push(`timed out after ${timeout} s`);
    if (p.code !== 0) problems.push(`smtp-source exited ${p.code ?? p.signal}: ${fs.readFileSync(stderrFile, "utf8").trim().slice(0, 500)}`);
    const maxRssKB = haveTime ? Number(fs.readFileSync(timeFile, "utf8").trim().split("\n").pop()) : NaN;
    const r = {
      ok: problems.length === 0, problems, command: `smtp-source ${args.join(" ")}`,
      messages: n, seconds: round(seconds, 3), msgsPerSec: Math.round(n / seconds),
      rssPeakMB: Number.isFinite(maxRssKB) ? round(maxRssKB / 1024, 1) : null,
    };
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s, ${r.sinkSessions} sessions`);
    return r;
  }));
}

function scaleCase(n) {
  return mudmailCase(`scale/${n}`, n, SIZE, SCALE_SLOTS);
}

function bigCase() {
  const name = `big/${BIG / 1048576}mb`;
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const maildir = path.join(dir, "maildir");
    await writeSpool(maildir, 1, SIZE, { tag: "warmup" }); // the warm-up message
    const stage = path.join(dir, "stage");
    fs.mkdirSync(stage);
    const id = queueId(Math.floor(Date.now() / 1000), 999_999);
    const staged = path.join(stage, id);
    await writeBigMessage(staged, BIG);
    const bytes = fs.statSync(staged).size;
    const r = await worker(name, dir, { case: "big", maildir, port: sink.port, staged, id, bytes, logFile: path.join(dir, "mudmail.log") }, 120, ["--expose-gc"]);
    await checkSink(sink, 2, r);
    progress(`${name}: RSS ${r.rssIdleMB} MB idle, ${r.rssPeakMB} MB peak, growth ${r.rssGrowthMB} MB, ${r.mbPerSec} MB/s`);
    return r;
  }));
}

function latencyCase() {
  return runCase("latency", (dir) => withSink(dir, async (sink) => {
    const maildir = path.join(dir, "maildir");
    const r = await worker("latency", dir, { case: "latency", maildir, port: sink.port, n: LATENCY.n, warmup: LATENCY.warmup, logFile: path.join(dir, "mudmail.log") }, 30 + Math.ceil(LATENCY.n / 20));
    await checkSink(sink, LATENCY.n + LATENCY.warmup, r);
    progress(`latency: p50 ${r.ms?.p50} ms, p99 ${r.ms?.p99} ms (send() itself p50 ${r.sendCallMs?.p50} ms)`);
    return r;
  }));
}

/* ---------------------------------------------------------------------------------- */
/* Setup                                                                               */

async function ensureNodemailer() {
  if (fs.existsSync(path.join(here, "node_modules", "nodemailer", "package.json"))) return;
  progress("installing nodemailer into bench/node_modules (bench/package.json) ...");
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const errFile = path.join(tmpRoot, "npm.err");
  const r = await run(npm, ["install", "--prefix", here, "--no-audit", "--no-fund"], { timeoutMs: 180_000, stderrFile: errFile });
  if (r.code !== 0) throw new Error(`npm install --prefix bench failed (${r.timedOut ? "timed out" : `exit ${r.code}`}): ${fs.readFileSync(errFile, "utf8").slice(-1000)}`);
}

/**
 * The run's DKIM key: RSA-2048, made by the command line's --dkim-keygen (dist/mail.js
 * beside the library measured), as a user makes one.
 */
async function makeDkimKey() {
  const key = path.join(tmpRoot, "dkim-rsa.pem");
  const cli = path.join(path.dirname(opts.library ?? path.join(root, "dist", "index.js")), "mail.js");
  const errFile = path.join(tmpRoot, "dkim-keygen.err");
  const r = await run(process.execPath, [cli, "--dkim-keygen", "--dkim-algorithm", "rsa", "--dkim-domain", DKIM_DOMAIN, "--dkim-selector", DKIM_SELECTOR, "--dkim-key", key],
    { timeoutMs: 60_000, stderrFile: errFile });
  if (r.code !== 0 || !fs.existsSync(key)) throw new Error(`${cli} --dkim-keygen failed (exit ${r.code}): ${fs.readFileSync(errFile, "utf8").slice(-500)}`);
  return { domain: DKIM_DOMAIN, selector: DKIM_SELECTOR, key, made: `node dist/mail.js --dkim-keygen --dkim-algorithm rsa` };
}

/** The commit the working tree is at, and whether the engine's sources differ from it. */
function gitState() {
  try {
    const commit = execFileSync("git", ["-C", root, "rev-parse", "--short", "HEAD"], { encoding: "utf8", timeout: 5000 }).trim();
    const dirty = execFileSync("git", ["-C", root, "status", "--porcelain", "--", "*.ts", "build.mjs"], { encoding: "utf8", timeout: 5000 })
      .split("\n").filter((l) => l && !l.includes("tests/")).map((l) => l.slice(3));
    return { commit, uncommitted: dirty };
  } catch {
    return null;
  }
}

function machine() {
  const require = createRequire(import.meta.url);
  let nodemailer = null;
  try { nodemailer = require("nodemailer/package.json").version; } catch { /* not installed */ }
  let postfix = null;
  try { postfix = execFileSync("dpkg-query", ["-W", "-f=${Version}", "postfix"], { encoding: "utf8", timeout: 5000 }).trim(); } catch { /* not Debian */ }
  const cpus = os.cpus();
  const spoolDir = opts.dir ?? os.tmpdir();
  let spoolFs = null;
  try { spoolFs = execFileSync("stat", ["-f", "-c", "%T", spoolDir], { encoding: "utf8", timeout: 5000 }).trim(); } catch { /* no stat(1) */ }
  return {
    cpus: cpus.length, cpuModel: cpus[0]?.model ?? null, node: process.version,
    os: `${os.type()} ${os.release()} ${os.arch()}`, memoryMB: Math.round(os.totalmem() / 1048576),
    nodemailer, postfix, spoolDir, spoolFs,
  };
}

/* ---------------------------------------------------------------------------------- */
/* Targets                                                                             */

/**
 * Issue 13's targets (2 CPUs, one run, default options, 20,000 × 1 KB, 10 slots) and the
 * ones of issue 7 that still stand, each with what was measured; met is null when not measured.
 */
function targets(R) {
  const list = [];
  const t10 = R.throughput.find((row) => row.slots === 10) ?? {};
  const add = (issue, name, target, value, ratio, met) => list.push({ issue, name, target, value, ratio: round(ratio, 2), met: met == null ? null : Boolean(met) });
  const mud = t10.mudmail?.msgsPerSec;
  {
    const nm = t10.nodemailer?.msgsPerSec;
    const ratio = mud && nm ? mud / nm : null;
    add(13, "mudmail vs Nodemailer's pool, 10 slots", "≥ 3×", ratio == null ? null : `${fmtInt(mud)} vs ${fmtInt(nm)} msgs/s: ${fmt(ratio, 2)}×`, ratio == null ? null : ratio / 3, ratio == null ? null : ratio >= 3);
  }
  add(13, "mudmail msgs/s, 10 slots", "≥ 10,000", mud ? `${fmtInt(mud)} msgs/s` : null, mud ? mud / 10_000 : null, mud ? mud >= 10_000 : null);
  {
    const loop = t10.mudmail?.loop;
    add(13, "host's event loop while flushing, 10 slots", "p99 < 2 ms, max < 10 ms",
      loop ? `p99 ${fmt(loop.p99, 2)} ms, max ${fmt(loop.max, 2)} ms` : null,
      loop ? Math.max(loop.p99 / 2, loop.max / 10) : null, loop ? loop.p99 < 2 && loop.max < 10 : null);
  }
  {
    const pf = R.postfix?.msgsPerSec;
    const ratio = mud && pf ? mud / pf : null;
    add(13, `mudmail vs Postfix from its own queue, 10 slots / concurrency ${POSTFIX_CONCURRENCY}`, "≥ 5×",
      ratio == null ? null : `${fmtInt(mud)} vs ${fmtInt(pf)} msgs/s: ${fmt(ratio, 2)}×`, ratio == null ? null : ratio / 5, ratio == null ? null : ratio >= 5);
  }
  {
    const signed = R.large?.mudmailDkim;
    const v = signed?.msgsPerSec;
    add(13, "100 KB + RSA-2048 DKIM, send() then flush(), 10 slots", "≥ 1,500 msgs/s",
      v ? `${fmtInt(v)} msgs/s (${fmt(signed.mbPerSec)} MB/s)` : null, v ? v / 1500 : null, v ? v >= 1500 : null);
    const nm = R.large?.nodemailerDkim?.msgsPerSec;
    const ratio = v && nm ? v / nm : null;
    add(13, "100 KB + DKIM vs Nodemailer's pool signing the same mail", "≥ 3×",
      ratio == null ? null : `${fmtInt(v)} vs ${fmtInt(nm)} msgs/s: ${fmt(ratio, 2)}×`, ratio == null ? null : ratio / 3, ratio == null ? null : ratio >= 3);
  }
  {
    const v = R.receiver?.msgsPerSec;
    add(13, `receiver, ${RECEIVER.sessions} smtp-source sessions into one mailbox`, "≥ 2,000 msgs/s",
      v ? `${fmtInt(v)} msgs/s (${R.receiver.messagesPerSync ?? "-"} messages per fsync)` : null, v ? v / 2000 : null, v ? v >= 2000 : null);
  }
  {
    const rss = t10.mudmail?.rssPeakMB;
    add(13, `peak RSS flushing ${fmtInt(N)} queued, 10 slots`, "< 80 MB", rss ? `${fmt(rss, 0)} MB` : null, rss ? rss / 80 : null, rss ? rss < 80 : null);
  }
  for (const row of R.throughput) {
    const src = row.smtpSourceD?.msgsPerSec;
    const m = row.mudmail?.msgsPerSec;
    const ratio = m && src ? src / m : null;
    add(7, `vs smtp-source -d, ${row.slots} slot${row.slots === 1 ? "" : "s"}`, "smtp-source -d ≤ 1.5× mudmail",
      ratio == null ? null : `${fmtInt(m)} vs ${fmtInt(src)} msgs/s: smtp-source -d is ${fmt(ratio, 2)}× mudmail`, ratio == null ? null : ratio / 1.5, ratio == null ? null : ratio <= 1.5);
  }
  {
    const ratio = R.scaleRatio;
    add(7, `flat cost per message to ${fmtInt(SCALE[2])}`, `cost ${fmtInt(SCALE[2])} / ${fmtInt(SCALE[0])} ≤ 1.3`,
      ratio == null ? null : `${fmt(ratio, 2)}×`, ratio == null ? null : ratio / 1.3, ratio == null ? null : ratio <= 1.3);
  }
  {
    const g = R.big?.rssGrowthMB;
    add(7, `RSS growth for one ${BIG / 1048576} MB message`, "< 16 MB", g == null ? null : `${g} MB`, g == null ? null : g / 16, g == null ? null : g < 16);
  }
  {
    const p50 = R.latency?.ms?.p50;
    add(7, "latency send() → 250, p50", "< 20 ms", p50 == null ? null : `${p50} ms`, p50 == null ? null : p50 / 20, p50 == null ? null : p50 < 20);
  }
  return list;
}

/* ---------------------------------------------------------------------------------- */
/* Report                                                                              */

function report(R) {
  const m = R.machine;
  const out = [];
  const loopCell = (l) => (l ? `${fmt(l.p50, 2)} / ${fmt(l.p99, 2)} / ${fmt(l.max, 2)}` : "-");
  const cell = (r) => (r ? `${fmtInt(r.msgsPerSec)} (${fmt(r.rssPeakMB, 0)} MB)` : "-");
  out.push(`mudmail bench, ${R.date}: ${m.cpus} CPUs (${m.cpuModel}), ${fmtInt(m.memoryMB)} MB, ${m.os}, Node ${m.node}, ` +
    `Nodemailer ${m.nodemailer ?? "-"}, Postfix ${m.postfix ?? "-"}; everything on loopback, smtp-sink on the same CPUs; ` +
    `spools in ${m.spoolDir} (${m.spoolFs ?? "?"})` +
    `\nlibrary: ${R.library.file} built ${R.library.built} (sha256 ${R.library.sha256}` +
    (R.library.git ? `; tree at ${R.library.git.commit}${R.library.git.uncommitted.length ? ` with uncommitted ${R.library.git.uncommitted.join(", ")}` : ""}` : "") +
    `); load average at start ${R.loadAverage.start.join(" ")}, at end ${R.loadAverage.end.join(" ")}` +
    (opts.quick ? "\n(--quick: a tenth of every count, a smoke test, not a result)" : ""));
  out.push("");
  out.push(`1. Throughput: ${fmtInt(N)} messages of 1 KB to smtp-sink (PIPELINING), msgs/s (peak RSS)` +
    (REPEAT > 1 ? `, the fastest of ${REPEAT} interleaved rounds` : ""));
  out.push(table([
    ["slots", "mudmail (defaults)", "Nodemailer pooled", "smtp-source 1/session", "smtp-source -d", "mudmail ÷ Nodemailer", "smtp-source -d ÷ mudmail"],
    ...R.throughput.map((row) => [
      row.slots, cell(row.mudmail), cell(row.nodemailer), cell(row.smtpSource), cell(row.smtpSourceD),
      row.mudmail && row.nodemailer ? `${fmt(row.mudmail.msgsPerSec / row.nodemailer.msgsPerSec, 2)}×` : "-",
      row.mudmail && row.smtpSourceD ? `${fmt(row.smtpSourceD.msgsPerSec / row.mudmail.msgsPerSec, 2)}×` : "-",
    ]),
  ]));
  out.push("mudmail: the engine's default options (fsync on); the queue files are on disk before the timed flush, dropped in outgoing/ " +
    "as another program would (copies of a stock, then the file system synced: blocks allocated, as after an fsync)" +
    (R.unlinkUs ? `; unlinking such a 1 KB file costs ${R.unlinkUs.syncedUs} µs here, a never-synced one ${R.unlinkUs.unsyncedUs} µs, a hard link ${R.unlinkUs.notLastUs} µs` : ""));
  out.push("Nodemailer: pool, maxMessages Infinity, every sendMail at once with the same header+body bytes (raw); smtp-source: -l 1024 (its own headers), no pipelining (it has none)");
  if (REPEAT > 1) {
    const runs = (r) => (r?.runs ? r.runs.map((x) => fmtInt(x)).join("/") : "-");
    out.push("every round, msgs/s: " + R.throughput.map((row) =>
      `${row.slots} slot${row.slots === 1 ? "" : "s"}: mudmail ${runs(row.mudmail)}, Nodemailer ${runs(row.nodemailer)}, smtp-source ${runs(row.smtpSource)}, -d ${runs(row.smtpSourceD)}`).join("\n                      ") +
      (R.postfix ? `\n                      Postfix: ${runs(R.postfix)}` : ""));
  }
  const pf = R.postfix;
  out.push(`Postfix ${m.postfix ?? ""} from its own queue, destination concurrency ${POSTFIX_CONCURRENCY} (private instance; filled through its smtpd while held, ` +
    `then postsuper -H ALL + postqueue -f, timed until the sink has all and the queue is empty): ` +
    (pf ? `${fmtInt(pf.msgsPerSec)} msgs/s, Postfix's own CPU ${fmtInt(pf.cpuUsPerMsg)} µs a message (it took them in at ${fmtInt(pf.fillMsgsPerSec)} msgs/s)` +
      (R.throughput.find((r) => r.slots === 10)?.mudmail ? `; mudmail at 10 slots ÷ Postfix: ${fmt(R.throughput.find((r) => r.slots === 10).mudmail.msgsPerSec / pf.msgsPerSec, 2)}×` : "") : "-"));
  const sf = R.sendFlush;
  out.push(`mudmail as a new user runs it, 10 slots: ${fmtInt(N)} messages through send() (fsync on, 64 at a time: ` +
    (sf ? `${fmtInt(sf.sendsPerSec)} sends/s), then one flush(): ${fmtInt(sf.msgsPerSec)} msgs/s, loop p99 ${fmt(sf.loop?.p99, 2)} ms, max ${fmt(sf.loop?.max, 2)} ms, peak RSS ${fmt(sf.rssPeakMB, 0)} MB` : "-)"));
  const ln = R.mudmailLinked;
  out.push(`(not comparable, the old bench's method: mudmail at 10 slots with fsync off and a hard-linked spool, whose unlinks only drop a link: ` +
    `${ln ? `${fmtInt(ln.msgsPerSec)} msgs/s` : "-"})`);
  if (R.nodemailerComposed) {
    out.push(`Nodemailer composing each message from fields (from/to/subject/text), 10 slots: ${fmtInt(R.nodemailerComposed.msgsPerSec)} msgs/s, ` +
      `peak RSS ${fmt(R.nodemailerComposed.rssPeakMB, 0)} MB (the table feeds it the same bytes as raw messages)`);
  }
  const mb = R.oneMB;
  out.push(`${fmtInt(ONE_MB.n)} messages of 1 MB, ${ONE_MB.slots} slots: mudmail ${mb.mudmail ? `${fmtInt(mb.mudmail.msgsPerSec)} msgs/s (${fmt(mb.mudmail.mbPerSec, 0)} MB/s, peak RSS ${fmt(mb.mudmail.rssPeakMB, 0)} MB)` : "-"}, ` +
    `Nodemailer ${mb.nodemailer ? `${fmtInt(mb.nodemailer.msgsPerSec)} msgs/s (peak RSS ${fmt(mb.nodemailer.rssPeakMB, 0)} MB)` : "-"}, ` +
    `smtp-source -d ${mb.smtpSourceD ? `${fmtInt(mb.smtpSourceD.msgsPerSec)} msgs/s` : "-"}`);
  out.push("");
  out.push(`2. Host friendliness: event-loop delay while sending ${fmtInt(N)} × 1 KB (monitorEventLoopDelay, 1 ms resolution; ≈1 ms = an idle loop)`);
  out.push(table([
    ["slots", "mudmail p50 / p99 / max ms", "Nodemailer p50 / p99 / max ms"],
    ...R.throughput.map((row) => [row.slots, loopCell(row.mudmail?.loop), loopCell(row.nodemailer?.loop)]),
  ]));
  out.push("");
  const L = R.large;
  const lcell = (r) => (r ? `${fmtInt(r.msgsPerSec)} msgs/s, ${fmt(r.mbPerSec)} MB/s` : "-");
  out.push(`3. Large messages: ${fmtInt(LARGE.n)} of 100 KB, ${LARGE.slots} slots; mudmail: send() then one timed flush() (defaults, fsync on); ` +
    `DKIM: RSA-2048 (${dkimKey?.made ?? "the CLI's --dkim-keygen"}), relaxed/relaxed`);
  out.push(table([
    ["", "mudmail", "Nodemailer pooled", "mudmail ÷ Nodemailer", "mudmail CPU µs/msg", "mudmail loop p99 / max ms"],
    ["unsigned", lcell(L?.mudmail), lcell(L?.nodemailer), L?.mudmail && L?.nodemailer ? `${fmt(L.mudmail.msgsPerSec / L.nodemailer.msgsPerSec, 2)}×` : "-",
      fmt(L?.mudmail?.cpuUsPerMsg, 0), L?.mudmail?.loop ? `${fmt(L.mudmail.loop.p99, 2)} / ${fmt(L.mudmail.loop.max, 2)}` : "-"],
    ["DKIM-signed", lcell(L?.mudmailDkim), lcell(L?.nodemailerDkim), L?.mudmailDkim && L?.nodemailerDkim ? `${fmt(L.mudmailDkim.msgsPerSec / L.nodemailerDkim.msgsPerSec, 2)}×` : "-",
      fmt(L?.mudmailDkim?.cpuUsPerMsg, 0), L?.mudmailDkim?.loop ? `${fmt(L.mudmailDkim.loop.p99, 2)} / ${fmt(L.mudmailDkim.loop.max, 2)}` : "-"],
  ]));
  out.push("");
  const rc = R.receiver;
  out.push(`4. Receiver (--serve): ${rc?.command ?? `smtp-source -d -s ${RECEIVER.sessions}`} into one mailbox, timed until smtp-source exits (every message answered 250: on disk): ` +
    (rc ? `${fmtInt(rc.msgsPerSec)} msgs/s, ${rc.messagesPerSync ?? "-"} messages per fsync (group commit), CPU ${fmt(rc.cpuUsPerMsg, 0)} µs a message` : "-"));
  out.push("");
  out.push(`5. Scale: flushing spools of 1 KB messages through ${SCALE_SLOTS} slots (defaults, files on disk)` + (REPEAT > 1 ? `, the fastest of ${REPEAT} rounds` : ""));
  out.push(table([
    ["queued", "seconds", "msgs/s", "µs/msg (wall)", "CPU µs/msg", "peak RSS", "loop p99 / max ms", "every round, msgs/s"],
    ...R.scale.map((s) => [fmtInt(s.messages), fmt(s.seconds, 2), fmtInt(s.msgsPerSec), fmt(s.usPerMsg), fmt(s.cpuUsPerMsg), `${fmt(s.rssPeakMB)} MB`,
      s.loop ? `${fmt(s.loop.p99, 2)} / ${fmt(s.loop.max, 2)}` : "-", (s.runs ?? []).map((x) => fmtInt(x)).join("/")]),
  ]));
  if (R.scaleRatio != null) out.push(`cost per message, ${fmtInt(SCALE[2])} vs ${fmtInt(SCALE[0])}: ${fmt(R.scaleRatio, 2)}×` +
    (R.scaleRatio10k != null ? ` (${fmtInt(SCALE[2])} vs ${fmtInt(SCALE[1])}: ${fmt(R.scaleRatio10k, 2)}×)` : ""));
  out.push("");
  const b = R.big;
  out.push(`6. Big message: one ${BIG / 1048576} MB message: ` + (b
    ? `RSS ${b.rssIdleMB} MB idle (after a warm-up send and a GC), ${b.rssPeakMB} MB peak (20 ms samples), growth ${b.rssGrowthMB} MB; ${fmt(b.seconds, 2)} s, ${b.mbPerSec} MB/s` +
      (b.peakGrowthMB ? `\n   peak growth by kind: V8 heap used ${b.peakGrowthMB.heapUsed} MB, Buffers (arrayBuffers) ${b.peakGrowthMB.arrayBuffers} MB` : "")
    : "-"));
  out.push("");
  const l = R.latency;
  out.push(`7. Latency: send() to the sink's 250 ("sent" event), engine started, default options (fsync on), ${fmtInt(LATENCY.n)} sends one after another: ` + (l
    ? `p50 ${l.ms.p50} ms, p99 ${l.ms.p99} ms, max ${l.ms.max} ms (of which send() itself: p50 ${l.sendCallMs.p50} ms, p99 ${l.sendCallMs.p99} ms)`
    : "-"));
  out.push("");
  for (const issue of [13, 7]) {
    out.push((issue === 13 ? "Targets (issue 13: 2 CPUs, one run, default options, 20,000 × 1 KB, 10 slots)" : "Targets (issue 7, still standing)") +
      "; measured ÷ wanted: at least 1 meets a ≥ target, under 1 meets a < (or ≤) one");
    out.push(table([
      ["target", "wanted", "measured", "measured ÷ wanted", ""],
      ...R.targets.filter((t) => t.issue === issue).map((t) => [t.name, t.target, t.value ?? "not measured", margin(t), t.met == null ? "-" : t.met ? "met" : "MISSED"]),
    ]));
    out.push("");
  }
  if (R.failures.length) {
    out.push("Failures:");
    for (const f of R.failures) out.push(`  ${f}`);
    out.push("");
  }
  out.push(`${fmt(R.durationSeconds, 0)} s in all; figures in ${path.relative(process.cwd(), outFile) || outFile}, chart in ${path.relative(process.cwd(), svgFile) || svgFile}`);
  return out.join("\n");
}

/* ---------------------------------------------------------------------------------- */
/* Main                                                                                */

async function main() {
  if (opts.markdown) {
    process.stdout.write(markdown(JSON.parse(fs.readFileSync(opts.markdown, "utf8"))));
    return;
  }
  if (opts.chart) {
    const R = JSON.parse(fs.readFileSync(opts.chart, "utf8"));
    const file = path.join(path.dirname(opts.chart), path.basename(opts.chart).startsWith("results-partial") ? "throughput-partial.svg" : "throughput.svg");
    fs.writeFileSync(file, throughputChart(R));
    console.log(`chart of ${opts.chart} in ${file}`);
    return;
  }
  for (const tool of [SMTP_SINK, SMTP_SOURCE]) {
    if (!fs.existsSync(tool)) throw new Error(`${tool} is missing: apt-get install postfix (it ships smtp-sink and smtp-source)`);
  }
  if (!fs.existsSync(opts.library ?? path.join(root, "dist", "index.js"))) throw new Error(`${opts.library ?? "dist/index.js"} is missing: run node build.mjs first (npm run bench does)`);
  tmpRoot = await fs.promises.mkdtemp(path.join(opts.dir ?? os.tmpdir(), "mudmail-bench-"));
  await fs.promises.chmod(tmpRoot, 0o755);
  // One build for the whole run: a copy of the library (an ES module, hence .mjs outside the package).
  library = path.join(tmpRoot, "mudmail.mjs");
  const dist = opts.library ?? path.join(root, "dist", "index.js");
  const built = fs.statSync(dist).mtime.toISOString();
  fs.copyFileSync(dist, library);
  if (fs.existsSync(`${dist}.map`)) fs.copyFileSync(`${dist}.map`, path.join(tmpRoot, "index.js.map"));
  const onSignal = () => { interrupted = true; killAllChildren(); };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    if ([...SLOTS.map((s) => `throughput/nodemailer/${s}`), "throughput/nodemailer-composed/10", `1mb/nodemailer/${ONE_MB.slots}`,
      `large/nodemailer/${LARGE.slots}`, `large/nodemailer-dkim/${LARGE.slots}`].some(wanted)) await ensureNodemailer();
    if (wanted(`throughput/postfix/${POSTFIX_CONCURRENCY}`) && !fs.existsSync(POSTFIX)) throw new Error(`${POSTFIX} is missing: apt-get install postfix`);
    if ([`large/mudmail-dkim/${LARGE.slots}`, `large/nodemailer-dkim/${LARGE.slots}`].some(wanted)) dkimKey = await makeDkimKey();
    const R = { date: new Date().toISOString(), command: `node bench/run.mjs ${process.argv.slice(2).join(" ")}`.trim(), machine: machine() };
    R.library = { file: path.relative(root, dist) || dist, built, sha256: createHash("sha256").update(fs.readFileSync(library)).digest("hex").slice(0, 16), git: opts.library ? null : gitState() };
    // Other work on the machine skews every figure: say how busy it was.
    R.loadAverage = { start: os.loadavg().map((x) => round(x, 2)) };
    if (os.loadavg()[0] > 0.7 * os.cpus().length) {
      progress(`warning: load average ${os.loadavg().map((x) => x.toFixed(2)).join(" ")} on ${os.cpus().length} CPUs: other work will skew the figures`);
    }
    R.unlinkUs = unlinkCost(path.join(tmpRoot, "unlink-cost"));
    // Round 1 of every case, issue 13's rows first; then rounds 2..REPEAT of the throughput
    // and scale cases, so that a run short of time loses repeats, never a row. Each repeated
    // row reports its fastest run (other work on a shared machine only ever slows a run);
    // every run is kept.
    const tp = new Map(); // "sender/slots" -> results
    const keep = (key, r) => { if (!tp.has(key)) tp.set(key, []); if (r) tp.get(key).push(r); };
    const throughputRound = async () => {
      for (const slots of SLOTS) {
        keep(`mudmail/${slots}`, await mudmailCase(`throughput/mudmail/${slots}`, N, SIZE, slots));
        keep(`nodemailer/${slots}`, await nodemailerCase(`throughput/nodemailer/${slots}`, N, SIZE, slots));
        keep(`smtpSource/${slots}`, await smtpSourceCase(`throughput/smtp-source/${slots}`, N, SIZE, slots, false));
        keep(`smtpSourceD/${slots}`, await smtpSourceCase(`throughput/smtp-source-d/${slots}`, N, SIZE, slots, true));
      }
      keep("postfix", await postfixCase(`throughput/postfix/${POSTFIX_CONCURRENCY}`, N, SIZE, POSTFIX_CONCURRENCY));
    };
    const sc = new Map(SCALE.map((n) => [n, []]));
    const scaleRound = async () => {
      for (const n of SCALE) {
        const r = await scaleCase(n);
        if (r) sc.get(n).push(r);
      }
    };
    currentRep = 1;
    await throughputRound();
    R.sendFlush = await sendCase("throughput/mudmail-send/10", N, SIZE, 10);
    R.mudmailLinked = await mudmailCase("throughput/mudmail-linked/10", N, SIZE, 10, { linked: true });
    R.large = {
      messages: LARGE.n, bodyBytes: LARGE.size, slots: LARGE.slots, dkim: dkimKey ? { algorithm: "rsa-sha256", bits: 2048, made: dkimKey.made } : null,
      mudmail: await sendCase(`large/mudmail/${LARGE.slots}`, LARGE.n, LARGE.size, LARGE.slots),
      mudmailDkim: await sendCase(`large/mudmail-dkim/${LARGE.slots}`, LARGE.n, LARGE.size, LARGE.slots, { dkim: true }),
      nodemailer: await nodemailerCase(`large/nodemailer/${LARGE.slots}`, LARGE.n, LARGE.size, LARGE.slots),
      nodemailerDkim: await nodemailerCase(`large/nodemailer-dkim/${LARGE.slots}`, LARGE.n, LARGE.size, LARGE.slots, { dkim: true }),
    };
    R.receiver = await receiverCase(`receiver/${RECEIVER.sessions}`, RECEIVER);
    R.nodemailerComposed = await nodemailerCase("throughput/nodemailer-composed/10", N, SIZE, 10, { composed: true });
    R.oneMB = {
      messages: ONE_MB.n, slots: ONE_MB.slots,
      mudmail: await mudmailCase(`1mb/mudmail/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots),
      nodemailer: await nodemailerCase(`1mb/nodemailer/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots),
      smtpSourceD: await smtpSourceCase(`1mb/smtp-source-d/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots, true),
    };
    R.big = await bigCase();
    R.latency = await latencyCase();
    await scaleRound();
    for (currentRep = 2; currentRep <= REPEAT; currentRep++) {
      await throughputRound();
      await scaleRound();
    }
    currentRep = 1;
    R.throughput = SLOTS.map((slots) => ({
      slots,
      mudmail: fastest(tp.get(`mudmail/${slots}`)),
      nodemailer: fastest(tp.get(`nodemailer/${slots}`)),
      smtpSource: fastest(tp.get(`smtpSource/${slots}`)),
      smtpSourceD: fastest(tp.get(`smtpSourceD/${slots}`)),
    }));
    R.postfix = fastest(tp.get("postfix"));
    R.throughputSetup = { messages: N, bodyBytes: SIZE, repeats: REPEAT, reported: "the fastest of the repeats; every run's msgs/s in runs[]",
      mudmail: { options: "defaults (fsync on)", spool: opts.freshSpools ? "written afresh, then the file system synced" : "copies of a stock, then the file system synced" },
      nodemailer: "raw (header+body bytes as in the queue files)", postfix: { concurrency: POSTFIX_CONCURRENCY, method: "filled while held; postsuper -H ALL; postqueue -f" } };
    R.scale = SCALE.map((n) => fastest(sc.get(n))).filter(Boolean);
    R.spool = {
      method: opts.freshSpools ? "fresh files per case, then the file system synced" : "copies of a stock of queue files written once per run, then the file system synced (lib/spool.mjs)",
      stockWriteSeconds: Object.fromEntries([...stocks].map(([size, st]) => [size, round(st.writeSeconds, 2)])),
      unlinkUs: R.unlinkUs,
    };
    const t10 = R.throughput.find((r) => r.slots === 10);
    R.hostFriendliness = { slots: 10, mudmail: t10?.mudmail?.loop ?? null, nodemailer: t10?.nodemailer?.loop ?? null };
    const per = (n) => R.scale.find((s) => s.messages === n)?.usPerMsg;
    R.scaleRatio = per(SCALE[2]) && per(SCALE[0]) ? round(per(SCALE[2]) / per(SCALE[0]), 2) : null;
    R.scaleRatio10k = per(SCALE[2]) && per(SCALE[1]) ? round(per(SCALE[2]) / per(SCALE[1]), 2) : null;
    R.loadAverage.end = os.loadavg().map((x) => round(x, 2));
    R.targets = targets(R);
    R.failures = failures;
    R.durationSeconds = round(elapsed(), 1);
    await fs.promises.writeFile(outFile, JSON.stringify(R, null, 2) + "\n");
    await fs.promises.writeFile(svgFile, throughputChart(R));
    console.log(report(R));
    if (failures.length) process.exitCode = 1;
  } finally {
    killAllChildren();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    if (tmpRoot) await fs.promises.rm(tmpRoot, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`run.mjs: ${interrupted ? "interrupted" : err?.stack ?? err}`);
  process.exitCode = interrupted ? 130 : 1;
});
