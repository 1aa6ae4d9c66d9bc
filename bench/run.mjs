// bench/run.mjs - mudmail against Nodemailer and Postfix's smtp-source, side by side, in one run.
//
//   node build.mjs && node bench/run.mjs [--quick] [--repeat N] [--only REGEX] [--cpu-prof DIR] [--dir DIR] [--fresh-spools] [--library FILE] [--out FILE]
//
// Every figure comes from this one run on this machine, everything on loopback, with
// Postfix's smtp-sink (PIPELINING announced) as the server, on the same CPUs:
//
//   1. throughput   20,000 queued 1 KB messages through 1, 5, 10, 20 slots: mudmail (queue
//                   files put in outgoing/ beforehand, not timed: hard links to a stock
//                   written once per run, see lib/spool.mjs; fsync off), Nodemailer
//                   (pooled SMTP, the same bytes as raw messages, every sendMail at once),
//                   smtp-source one message per session and with -d; 200 messages of 1 MB
//   2. host         the event-loop delay while mudmail / Nodemailer send at 10 slots
//   3. scale        spools of 1,000, 10,000 and 100,000 messages, 5 slots: cost per message
//   4. big          one 50 MB message: RSS growth over the idle (warmed) engine, 20 ms samples
//   5. latency      send() to the sink's 250 on a started engine, default options, 1,000 in a row
//
// Each measurement runs in its own process (bench/worker.mjs) with a time limit, against
// its own smtp-sink; temp dirs and processes go away in finally blocks. Prints a table with
// the targets of issue 7 marked met or missed, and writes bench/results.json (with --quick
// or --only: bench/results-partial.json). Nodemailer is a dependency of bench/ only
// (bench/package.json), installed here on first use. Exit status 1 when a measurement
// failed (a message not delivered, a worker that crashed or timed out); a missed target
// is a result, not a failure.
//
//   --quick         a tenth of every count, one round: a smoke test of the script, not a result
//   --repeat N      rounds of the throughput and scale cases (default 3): each figure is the
//                   fastest round, since other work on a shared machine only ever slows a run
//   --only REGEX    only the cases whose name matches (names: throughput/mudmail/10, scale/100000, ...)
//   --dir DIR       where the spools go (default: the OS temp dir, a disk; /dev/shm shows the
//                   engine without the file system's cost)
//   --fresh-spools  write every case's queue files afresh instead of hard-linking them from a
//                   stock written once per run (slow where creating files is slow; see lib/spool.mjs)
//   --library FILE  the engine to measure (default dist/index.js, which npm run bench builds)
//   --cpu-prof DIR  run the matching workers under node --cpu-prof, profiles into DIR
//                   (summarise with: node bench/profile-summary.mjs DIR/*.cpuprofile)

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { HOST, SMTP_SINK, SMTP_SOURCE, startSink } from "./lib/sink.mjs";
import { FROM, Stock, queueId, unlinkCost, writeBigMessage, writeSpool } from "./lib/spool.mjs";
import { fmt, fmtInt, killAllChildren, round, run, table } from "./lib/util.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.join(here, "..");
const WORKER = path.join(here, "worker.mjs");
const BUDGET_S = 540; // cases that would start after this are skipped: the whole run stays under 10 minutes

/* ---------------------------------------------------------------------------------- */
/* Arguments                                                                           */

function usage(message) {
  if (message) console.error(`run.mjs: ${message}`);
  console.error("usage: node bench/run.mjs [--quick] [--repeat N] [--only REGEX] [--cpu-prof DIR] [--dir DIR] [--fresh-spools] [--library FILE] [--out FILE]");
  process.exit(message ? 2 : 0);
}

const opts = { quick: false, only: null, cpuProf: null, out: null, repeat: null, dir: null, library: null, freshSpools: false };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === "--quick") opts.quick = true;
  else if (a === "--only") opts.only = new RegExp(process.argv[++i] ?? usage("--only needs a REGEX"));
  else if (a === "--cpu-prof") opts.cpuProf = path.resolve(process.argv[++i] ?? usage("--cpu-prof needs a DIR"));
  else if (a === "--library") opts.library = path.resolve(process.argv[++i] ?? usage("--library needs a FILE"));
  else if (a === "--fresh-spools") opts.freshSpools = true;
  else if (a === "--dir") opts.dir = path.resolve(process.argv[++i] ?? usage("--dir needs a DIR"));
  else if (a === "--out") opts.out = path.resolve(process.argv[++i] ?? usage("--out needs a FILE"));
  else if (a === "--repeat") {
    opts.repeat = Number(process.argv[++i]);
    if (!Number.isInteger(opts.repeat) || opts.repeat < 1 || opts.repeat > 10) usage("--repeat: expected 1..10");
  } else if (a === "--help" || a === "-h") usage();
  else usage(`unknown argument ${JSON.stringify(a)}`);
}
const partial = opts.quick || opts.only !== null;
const outFile = opts.out ?? path.join(here, partial ? "results-partial.json" : "results.json");
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

/* ---------------------------------------------------------------------------------- */
/* Bookkeeping                                                                         */

const started = performance.now();
const elapsed = () => (performance.now() - started) / 1000;
const failures = [];
let interrupted = false;
let tmpRoot = null;
let library = null; // this run's copy of dist/index.js
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
  if (elapsed() > BUDGET_S) {
    if (currentRep > 1) return null; // a repeat: the first run stands
    failures.push(`${name}: skipped, the run is past its ${BUDGET_S} s budget`);
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
  if (opts.cpuProf) {
    fs.mkdirSync(opts.cpuProf, { recursive: true });
    flags.push("--cpu-prof", `--cpu-prof-dir=${opts.cpuProf}`, `--cpu-prof-name=${slug(name)}${REPEAT > 1 ? `-run${currentRep}` : ""}.cpuprofile`);
  }
  const stderrFile = path.join(dir, "worker.err");
  const r = await run(process.execPath, [...flags, WORKER, JSON.stringify({ ...args, library, out })], {
    timeoutMs: timeoutS * 1000, stdoutFile: path.join(dir, "worker.out"), stderrFile,
  });
  const stderr = fs.existsSync(stderrFile) ? fs.readFileSync(stderrFile, "utf8").trim().slice(0, 2000) : "";
  if (r.timedOut) throw new Error(`worker took longer than ${timeoutS} s and was killed`);
  if (r.error) throw new Error(`cannot start the worker: ${r.error}`);
  if (!fs.existsSync(out)) throw new Error(`worker exited (code ${r.code}, signal ${r.signal}) without a result; stderr: ${stderr || "(empty)"}`);
  return JSON.parse(fs.readFileSync(out, "utf8"));
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

/** mudmail: n queue files written (not timed), then one timed flush in a worker. */
function mudmailCase(name, n, size, slots) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const maildir = path.join(dir, "maildir");
    const concurrency = size > 65536 ? 4 : 16;
    let writeSeconds;
    if (opts.freshSpools) writeSeconds = await writeSpool(maildir, n, size, { concurrency });
    else {
      if (!stocks.has(size)) stocks.set(size, new Stock(path.join(tmpRoot, `stock-${size}`), size, { concurrency }));
      writeSeconds = await stocks.get(size).linkInto(maildir, n);
    }
    const timeout = 30 + Math.ceil(n / 500) + Math.ceil((n * size) / (20 * 1024 * 1024));
    const r = await worker(name, dir, { case: "mudmail-flush", maildir, port: sink.port, slots, expect: n, logFile: path.join(dir, "mudmail.log") }, timeout);
    r.spoolWriteSeconds = round(writeSeconds, 2);
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s, ${fmt(r.usPerMsg)} µs/msg, loop p99 ${r.loop?.p99} ms, peak RSS ${r.rssPeakMB} MB ` +
      `(spool ${opts.freshSpools ? "written" : "linked"} in ${fmt(writeSeconds, 2)} s)`);
    return r;
  }));
}

function nodemailerCase(name, n, size, slots, composed = false) {
  return runCase(name, (dir) => withSink(dir, async (sink) => {
    const timeout = 30 + Math.ceil(n / 300) + Math.ceil((n * size) / (10 * 1024 * 1024));
    const r = await worker(name, dir, { case: "nodemailer", port: sink.port, slots, n, size, composed }, timeout);
    await checkSink(sink, n, r);
    progress(`${name}: ${fmtInt(r.msgsPerSec)} msgs/s, loop p99 ${r.loop?.p99} ms, peak RSS ${r.rssPeakMB} MB`);
    return r;
  }));
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

function targets(R) {
  const list = [];
  const at = (slots) => R.throughput.find((row) => row.slots === slots) ?? {};
  const t10 = at(10);
  const add = (name, target, value, ratio, met) => list.push({ name, target, value, ratio: round(ratio, 2), met: met == null ? null : Boolean(met) });
  {
    const mud = t10.mudmail?.msgsPerSec;
    const nm = t10.nodemailer?.msgsPerSec;
    const ratio = mud && nm ? mud / nm : null;
    add("throughput vs Nodemailer, 10 slots", "≥ 3× Nodemailer's msgs/s", ratio == null ? null : `${fmtInt(mud)} vs ${fmtInt(nm)} msgs/s: ${fmt(ratio, 2)}×`, ratio, ratio == null ? null : ratio >= 3);
  }
  for (const row of R.throughput) {
    const mud = row.mudmail?.msgsPerSec;
    const src = row.smtpSourceD?.msgsPerSec;
    const ratio = mud && src ? src / mud : null;
    add(`throughput vs smtp-source -d, ${row.slots} slot${row.slots === 1 ? "" : "s"}`, "smtp-source -d ≤ 1.5× mudmail",
      ratio == null ? null : `${fmtInt(mud)} vs ${fmtInt(src)} msgs/s: smtp-source -d is ${fmt(ratio, 2)}× mudmail`, ratio, ratio == null ? null : ratio <= 1.5);
  }
  {
    const loop = t10.mudmail?.loop;
    add("event loop while flushing, 10 slots", "p99 < 5 ms and max < 20 ms",
      loop ? `p99 ${loop.p99} ms (${fmt(loop.p99 / 5, 2)}× limit), max ${loop.max} ms (${fmt(loop.max / 20, 2)}× limit)` : null,
      loop ? Math.max(loop.p99 / 5, loop.max / 20) : null, loop ? loop.p99 < 5 && loop.max < 20 : null);
  }
  {
    const ratio = R.scaleRatio;
    add(`flat cost per message to ${fmtInt(SCALE[2])}`, `per-message cost ${fmtInt(SCALE[2])} / ${fmtInt(SCALE[0])} ≤ 1.3`,
      ratio == null ? null : `${fmt(ratio, 2)}×`, ratio == null ? null : ratio / 1.3, ratio == null ? null : ratio <= 1.3);
  }
  {
    const g = R.big?.rssGrowthMB;
    add(`RSS growth for one ${BIG / 1048576} MB message`, "< 16 MB", g == null ? null : `${g} MB (${fmt(g / 16, 2)}× limit)`, g == null ? null : g / 16, g == null ? null : g < 16);
  }
  {
    const p50 = R.latency?.ms?.p50;
    add("latency send() → 250, p50", "< 20 ms", p50 == null ? null : `${p50} ms (${fmt(p50 / 20, 2)}× limit)`, p50 == null ? null : p50 / 20, p50 == null ? null : p50 < 20);
  }
  return list;
}

/* ---------------------------------------------------------------------------------- */
/* Report                                                                              */

function report(R) {
  const m = R.machine;
  const out = [];
  const loopCell = (l) => (l ? `${fmt(l.p50, 2)} / ${fmt(l.p99, 2)} / ${fmt(l.max, 2)}` : "-");
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
    ["slots", "mudmail", "Nodemailer pooled", "smtp-source 1/session", "smtp-source -d", "mudmail ÷ Nodemailer", "smtp-source -d ÷ mudmail"],
    ...R.throughput.map((row) => [
      row.slots,
      row.mudmail ? `${fmtInt(row.mudmail.msgsPerSec)} (${fmt(row.mudmail.rssPeakMB, 0)} MB)` : "-",
      row.nodemailer ? `${fmtInt(row.nodemailer.msgsPerSec)} (${fmt(row.nodemailer.rssPeakMB, 0)} MB)` : "-",
      row.smtpSource ? `${fmtInt(row.smtpSource.msgsPerSec)} (${fmt(row.smtpSource.rssPeakMB, 0)} MB)` : "-",
      row.smtpSourceD ? `${fmtInt(row.smtpSourceD.msgsPerSec)} (${fmt(row.smtpSourceD.rssPeakMB, 0)} MB)` : "-",
      row.mudmail && row.nodemailer ? `${fmt(row.mudmail.msgsPerSec / row.nodemailer.msgsPerSec, 2)}×` : "-",
      row.mudmail && row.smtpSourceD ? `${fmt(row.smtpSourceD.msgsPerSec / row.mudmail.msgsPerSec, 2)}×` : "-",
    ]),
  ]));
  if (REPEAT > 1) {
    const runs = (r) => (r?.runs ? r.runs.map((x) => fmtInt(x)).join("/") : "-");
    out.push("every round, msgs/s: " + R.throughput.map((row) =>
      `${row.slots} slot${row.slots === 1 ? "" : "s"}: mudmail ${runs(row.mudmail)}, Nodemailer ${runs(row.nodemailer)}, smtp-source ${runs(row.smtpSource)}, -d ${runs(row.smtpSourceD)}`).join("\n                      "));
  }
  if (R.nodemailerComposed) {
    out.push(`Nodemailer composing each message from fields (from/to/subject/text), 10 slots: ${fmtInt(R.nodemailerComposed.msgsPerSec)} msgs/s, ` +
      `peak RSS ${fmt(R.nodemailerComposed.rssPeakMB, 0)} MB (the table feeds it the same bytes as raw messages)`);
  }
  const mb = R.oneMB;
  out.push(`${fmtInt(ONE_MB.n)} messages of 1 MB, ${ONE_MB.slots} slots: mudmail ${mb.mudmail ? `${fmtInt(mb.mudmail.msgsPerSec)} msgs/s (${fmt(ONE_MB.n / mb.mudmail.seconds, 0)} MB/s, peak RSS ${fmt(mb.mudmail.rssPeakMB, 0)} MB)` : "-"}, ` +
    `Nodemailer ${mb.nodemailer ? `${fmtInt(mb.nodemailer.msgsPerSec)} msgs/s (peak RSS ${fmt(mb.nodemailer.rssPeakMB, 0)} MB)` : "-"}, ` +
    `smtp-source -d ${mb.smtpSourceD ? `${fmtInt(mb.smtpSourceD.msgsPerSec)} msgs/s` : "-"}`);
  if (R.spool?.unlinkUs) out.push(`mudmail's queue files: hard links to a stock written once (not timed); an unlink that drops a link costs ` +
    `${R.spool.unlinkUs.notLastUs} µs here, the last link ${R.spool.unlinkUs.lastLinkUs} µs: the figures gain ≤ ${fmt(R.spool.unlinkUs.lastLinkUs - R.spool.unlinkUs.notLastUs, 1)} µs per message from it`);
  out.push("mudmail: queue files in outgoing/ before the timed flush, fsync off; Nodemailer: pool, maxMessages Infinity, " +
    "every sendMail at once with the same header+body bytes (raw); smtp-source: -l 1024 (its own headers), no pipelining (it has none)");
  out.push("");
  out.push(`2. Host friendliness: event-loop delay while sending ${fmtInt(N)} × 1 KB (monitorEventLoopDelay, 1 ms resolution; ≈1 ms = an idle loop)`);
  out.push(table([
    ["slots", "mudmail p50 / p99 / max ms", "Nodemailer p50 / p99 / max ms"],
    ...R.throughput.map((row) => [row.slots, loopCell(row.mudmail?.loop), loopCell(row.nodemailer?.loop)]),
  ]));
  out.push("");
  out.push(`3. Scale: flushing spools of 1 KB messages through ${SCALE_SLOTS} slots` + (REPEAT > 1 ? `, the fastest of ${REPEAT} rounds` : ""));
  out.push(table([
    ["queued", "seconds", "msgs/s", "µs/msg (wall)", "CPU µs/msg", "peak RSS", "loop p99 / max ms", "every round, msgs/s"],
    ...R.scale.map((s) => [fmtInt(s.messages), fmt(s.seconds, 2), fmtInt(s.msgsPerSec), fmt(s.usPerMsg), fmt(s.cpuUsPerMsg), `${fmt(s.rssPeakMB)} MB`,
      s.loop ? `${fmt(s.loop.p99, 2)} / ${fmt(s.loop.max, 2)}` : "-", (s.runs ?? []).map((x) => fmtInt(x)).join("/")]),
  ]));
  if (R.scaleRatio != null) out.push(`cost per message, ${fmtInt(SCALE[2])} vs ${fmtInt(SCALE[0])}: ${fmt(R.scaleRatio, 2)}×` +
    (R.scaleRatio10k != null ? ` (${fmtInt(SCALE[2])} vs ${fmtInt(SCALE[1])}: ${fmt(R.scaleRatio10k, 2)}×)` : ""));
  out.push("");
  const b = R.big;
  out.push(`4. Big message: one ${BIG / 1048576} MB message: ` + (b
    ? `RSS ${b.rssIdleMB} MB idle (after a warm-up send and a GC), ${b.rssPeakMB} MB peak (20 ms samples), growth ${b.rssGrowthMB} MB; ${fmt(b.seconds, 2)} s, ${b.mbPerSec} MB/s` +
      (b.peakGrowthMB ? `\n   peak growth by kind: V8 heap used ${b.peakGrowthMB.heapUsed} MB, Buffers (arrayBuffers) ${b.peakGrowthMB.arrayBuffers} MB` : "")
    : "-"));
  out.push("");
  const l = R.latency;
  out.push(`5. Latency: send() to the sink's 250 ("sent" event), engine started, default options (fsync on), ${fmtInt(LATENCY.n)} sends one after another: ` + (l
    ? `p50 ${l.ms.p50} ms, p99 ${l.ms.p99} ms, max ${l.ms.max} ms (of which send() itself: p50 ${l.sendCallMs.p50} ms, p99 ${l.sendCallMs.p99} ms)`
    : "-"));
  out.push("");
  out.push("Targets (issue 7)");
  out.push(table([
    ["target", "wanted", "measured", "ratio", ""],
    ...R.targets.map((t) => [t.name, t.target, t.value ?? "not measured", t.ratio == null ? "-" : `${fmt(t.ratio, 2)}`, t.met == null ? "-" : t.met ? "met" : "MISSED"]),
  ]));
  out.push("(ratio: measured ÷ limit for the limits, mudmail ÷ Nodemailer for the first row; met when ≥ 3 there, ≤ 1 / ≤ 1.5 / ≤ 1 elsewhere)");
  if (R.failures.length) {
    out.push("");
    out.push("Failures:");
    for (const f of R.failures) out.push(`  ${f}`);
  }
  out.push("");
  out.push(`${fmt(R.durationSeconds, 0)} s in all; figures in ${path.relative(process.cwd(), outFile) || outFile}`);
  return out.join("\n");
}

/* ---------------------------------------------------------------------------------- */
/* Main                                                                                */

async function main() {
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
    if ([...SLOTS.map((s) => `throughput/nodemailer/${s}`), "throughput/nodemailer-composed/10", `1mb/nodemailer/${ONE_MB.slots}`].some(wanted)) await ensureNodemailer();
    const R = { date: new Date().toISOString(), command: `node bench/run.mjs ${process.argv.slice(2).join(" ")}`.trim(), machine: machine() };
    R.library = { file: path.relative(root, dist) || dist, built, sha256: createHash("sha256").update(fs.readFileSync(library)).digest("hex").slice(0, 16), git: opts.library ? null : gitState() };
    // Other work on the machine skews every figure: say how busy it was.
    R.loadAverage = { start: os.loadavg().map((x) => round(x, 2)) };
    if (os.loadavg()[0] > 0.7 * os.cpus().length) {
      progress(`warning: load average ${os.loadavg().map((x) => x.toFixed(2)).join(" ")} on ${os.cpus().length} CPUs: other work will skew the figures`);
    }
    if (!opts.freshSpools) R.unlinkUs = unlinkCost(path.join(tmpRoot, "unlink-cost"));
    // Throughput and scale: REPEAT rounds, interleaved (a burst of other work on the machine
    // then hits every client alike); each row reports its fastest run, every run is kept.
    const tp = new Map(); // "client/slots" -> results
    const keep = (key, r) => { if (!tp.has(key)) tp.set(key, []); if (r) tp.get(key).push(r); };
    for (currentRep = 1; currentRep <= REPEAT; currentRep++) {
      for (const slots of SLOTS) {
        keep(`mudmail/${slots}`, await mudmailCase(`throughput/mudmail/${slots}`, N, SIZE, slots));
        keep(`nodemailer/${slots}`, await nodemailerCase(`throughput/nodemailer/${slots}`, N, SIZE, slots));
        keep(`smtpSource/${slots}`, await smtpSourceCase(`throughput/smtp-source/${slots}`, N, SIZE, slots, false));
        keep(`smtpSourceD/${slots}`, await smtpSourceCase(`throughput/smtp-source-d/${slots}`, N, SIZE, slots, true));
      }
    }
    currentRep = 1;
    R.spool = {
      method: opts.freshSpools ? "fresh files per case" : "hard links to a stock of queue files written once per run (lib/spool.mjs)",
      stockWriteSeconds: Object.fromEntries([...stocks].map(([size, st]) => [size, round(st.writeSeconds, 2)])),
      unlinkUs: R.unlinkUs ?? null,
    };
    R.throughput = SLOTS.map((slots) => ({
      slots,
      mudmail: fastest(tp.get(`mudmail/${slots}`)),
      nodemailer: fastest(tp.get(`nodemailer/${slots}`)),
      smtpSource: fastest(tp.get(`smtpSource/${slots}`)),
      smtpSourceD: fastest(tp.get(`smtpSourceD/${slots}`)),
    }));
    R.throughputSetup = { messages: N, bodyBytes: SIZE, repeats: REPEAT, reported: "the fastest of the repeats; every run's msgs/s in runs[]",
      mudmail: { fsync: false }, nodemailer: "raw (header+body bytes as in the queue files)" };
    R.nodemailerComposed = await nodemailerCase("throughput/nodemailer-composed/10", N, SIZE, 10, true);
    R.oneMB = {
      messages: ONE_MB.n, slots: ONE_MB.slots,
      mudmail: await mudmailCase(`1mb/mudmail/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots),
      nodemailer: await nodemailerCase(`1mb/nodemailer/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots),
      smtpSourceD: await smtpSourceCase(`1mb/smtp-source-d/${ONE_MB.slots}`, ONE_MB.n, ONE_MB.size, ONE_MB.slots, true),
    };
    R.big = await bigCase();
    R.latency = await latencyCase();
    const sc = new Map(SCALE.map((n) => [n, []]));
    for (currentRep = 1; currentRep <= REPEAT; currentRep++) {
      for (const n of SCALE) {
        const r = await scaleCase(n);
        if (r) sc.get(n).push(r);
      }
    }
    currentRep = 1;
    R.scale = SCALE.map((n) => fastest(sc.get(n))).filter(Boolean);
    R.spool.stockWriteSeconds = Object.fromEntries([...stocks].map(([size, st]) => [size, round(st.writeSeconds, 2)]));
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
