// bench/worker.mjs - one measurement in a fresh process, so RSS and the event loop belong
// to that measurement alone. Started by bench/run.mjs:
//
//   node [--expose-gc] bench/worker.mjs '{"case":"mudmail-flush", ..., "out":"/tmp/.../result.json"}'
//
// Cases:
//   mudmail-flush   time `await engine.flush()` of a spool run.mjs filled; the engine's default
//                   options (fsync on) unless args.fsync is false; DKIM with args.dkim
//   mudmail-send    n messages queued through send() (engine defaults, 64 sends at a time; timed
//                   apart), then one timed flush(); DKIM with args.dkim
//   nodemailer      a pooled Nodemailer transport fed n messages, every sendMail at once; its
//                   own DKIM signing with args.dkim
//   receiver        the receiver (startServer) with one mailbox, fed by smtp-source's sessions
//   big             RSS growth over an idle (warmed) engine while one large message goes out
//   latency         send() to the sink's 250 ("sent" event) on a started engine, n in a row
//
// Writes its figures as JSON to args.out; run.mjs enforces the time limit.

import * as fs from "node:fs";
import { createRequire } from "node:module";
import * as path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath, pathToFileURL } from "node:url";
import { FROM, headers, makeBody, rcpt, rfc2822Date } from "./lib/spool.mjs";
import { loopDelay, percentile, round, rssSampler, run, sleep, toMB } from "./lib/util.mjs";
import { HOST, SMTP_SOURCE } from "./lib/sink.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = JSON.parse(process.argv[2]);
// run.mjs hands over its own copy of dist/index.js, so a rebuild during the run changes nothing.
const LIBRARY = pathToFileURL(args.library ?? path.join(here, "..", "dist", "index.js")).href;

/** Folders that must be empty after a flush that sent everything. */
async function leftovers(maildir) {
  const problems = [];
  for (const folder of ["outgoing", "outgoing_active", "deferred", "corrupt"]) {
    const left = (await fs.promises.readdir(path.join(maildir, folder)).catch(() => [])).filter((f) => !f.startsWith("."));
    if (left.length) problems.push(`${folder}/ still holds ${left.length} file(s)`);
  }
  return problems;
}

function summaryProblems(summary, expected) {
  return summary.sent === expected ? [] : [`engine sent ${summary.sent} of ${expected} (${JSON.stringify(summary)})`];
}

/** The engine as the case wants it: default options but for the spool, the relay, the slots and the log. */
async function newEngine() {
  const { MailEngine } = await import(LIBRARY);
  const options = { maildir: args.maildir, relay: `${HOST}:${args.port}`, maxConnections: args.slots, log: args.logFile };
  if (args.fsync === false) options.fsync = false;
  if (args.dkim) Object.assign(options, { dkimDomain: args.dkim.domain, dkimSelector: args.dkim.selector, dkimKey: args.dkim.key });
  const engine = new MailEngine(options);
  const errors = [];
  engine.on("error", (e) => errors.push(e.message));
  return { engine, errors };
}

/** Bytes of every queue file in outgoing/ (what a flush will send, before the engine's own header fields). */
function spoolBytes(maildir) {
  const dir = path.join(maildir, "outgoing");
  return fs.readdirSync(dir).filter((f) => !f.startsWith(".")).reduce((sum, f) => sum + fs.statSync(path.join(dir, f)).size, 0);
}

/** One timed flush: msgs/s, MB/s (of `bytes`), CPU per message (every thread), loop delay, RSS. */
async function timedFlush(engine, errors, expect, bytes) {
  const rssBase = process.memoryUsage.rss();
  const cpu0 = process.cpuUsage();
  const rss = rssSampler(20);
  const loop = loopDelay();
  const t0 = performance.now();
  const window = { startUs: monotonicUs() };
  const summary = await engine.flush();
  window.endUs = monotonicUs();
  const seconds = (performance.now() - t0) / 1000;
  const loopMs = loop.stop();
  const rssPeak = rss.stop();
  const cpu = process.cpuUsage(cpu0);
  const problems = [...summaryProblems(summary, expect), ...errors.slice(0, 3).map((m) => `engine error: ${m}`)];
  problems.push(...(await leftovers(args.maildir)));
  if (args.dkim) {
    // Signing is on: a message the engine did not sign says so in the log.
    const unsigned = fs.readFileSync(args.logFile, "utf8").split("\n").filter((l) => /not DKIM-signed|not signed/.test(l));
    if (unsigned.length) problems.push(`${unsigned.length} message(s) not signed: ${unsigned[0]}`);
  }
  return {
    ok: problems.length === 0, problems,
    messages: expect, seconds: round(seconds, 3), msgsPerSec: Math.round(expect / seconds),
    mbPerSec: bytes ? round(bytes / 1048576 / seconds, 1) : null,
    usPerMsg: round((seconds * 1e6) / expect, 1),
    cpuUsPerMsg: round((cpu.user + cpu.system) / expect, 1),
    loop: loopMs, rssBaseMB: toMB(rssBase), rssPeakMB: toMB(rssPeak), summary, window,
  };
}

/** CLOCK_MONOTONIC in µs, the clock of V8's CPU profiles: --cpu-prof's summary keeps to the timed flush. */
const monotonicUs = () => Number(process.hrtime.bigint() / 1000n);

async function mudmailFlush() {
  const { engine, errors } = await newEngine();
  try {
    return await timedFlush(engine, errors, args.expect, args.size ? spoolBytes(args.maildir) : null);
  } finally {
    await engine.stop();
  }
}

/** As a new user would: send() n messages (fsync on), then one flush(). */
async function mudmailSend() {
  const { engine, errors } = await newEngine();
  const text = makeBody(args.size);
  try {
    const t0 = performance.now();
    let next = 0;
    await Promise.all(Array.from({ length: 64 }, async () => {
      while (next < args.n) {
        const i = next++;
        await engine.send({ from: args.from ?? FROM, to: rcpt(i), subject: `bench message ${i}`, text });
      }
    }));
    const sendSeconds = (performance.now() - t0) / 1000;
    const bytes = spoolBytes(args.maildir);
    const r = await timedFlush(engine, errors, args.n, bytes);
    return { ...r, sendSeconds: round(sendSeconds, 2), sendsPerSec: Math.round(args.n / sendSeconds), spoolMB: round(bytes / 1048576, 1) };
  } finally {
    await engine.stop();
  }
}

/* ---------------------------------------------------------------------------------- */

async function nodemailer() {
  const require = createRequire(import.meta.url);
  const nm = require("nodemailer");
  const version = require("nodemailer/package.json").version;
  const dkim = args.dkim ? { domainName: args.dkim.domain, keySelector: args.dkim.selector, privateKey: fs.readFileSync(args.dkim.key, "utf8") } : undefined;
  const transport = nm.createTransport({
    pool: true, maxConnections: args.slots, maxMessages: Infinity,
    host: HOST, port: args.port, secure: false, ignoreTLS: true, ...(dkim ? { dkim } : {}),
  });
  const from = args.from ?? FROM;
  const body = makeBody(args.size);
  const date = rfc2822Date();
  try {
    const rssBase = process.memoryUsage.rss();
    const cpu0 = process.cpuUsage();
    const rss = rssSampler(20);
    const loop = loopDelay();
    const t0 = performance.now();
    // As an application would: every message handed over at once, the pool queues them.
    const pending = new Array(args.n);
    for (let i = 0; i < args.n; i++) {
      pending[i] = args.composed
        ? transport.sendMail({ from: `Bench <${from}>`, to: rcpt(i), subject: `bench message ${i}`, text: body, date, messageId: `<nm.${i}@localhost>` })
        // The same bytes as mudmail's queue file holds: header block + body.
        : transport.sendMail({ envelope: { from, to: [rcpt(i)] }, raw: headers(i, date, "nm", from) + body });
    }
    const results = await Promise.allSettled(pending);
    const seconds = (performance.now() - t0) / 1000;
    const loopMs = loop.stop();
    const rssPeak = rss.stop();
    const cpu = process.cpuUsage(cpu0);
    const failed = results.filter((r) => r.status === "rejected");
    const problems = failed.length ? [`${failed.length} sendMail calls failed, first: ${failed[0].reason?.message}`] : [];
    const bytes = args.n * Buffer.byteLength(headers(0, date, "nm", from) + body);
    return {
      ok: problems.length === 0, problems, version,
      messages: args.n, seconds: round(seconds, 3), msgsPerSec: Math.round(args.n / seconds), mbPerSec: round(bytes / 1048576 / seconds, 1),
      usPerMsg: round((seconds * 1e6) / args.n, 1),
      cpuUsPerMsg: round((cpu.user + cpu.system) / args.n, 1),
      loop: loopMs, rssBaseMB: toMB(rssBase), rssPeakMB: toMB(rssPeak),
    };
  } finally {
    transport.close();
  }
}

/* ---------------------------------------------------------------------------------- */

async function big() {
  const { MailEngine } = await import(LIBRARY);
  const engine = new MailEngine({ maildir: args.maildir, relay: `${HOST}:${args.port}`, log: args.logFile });
  const errors = [];
  engine.on("error", (e) => errors.push(e.message));
  try {
    // Warm up: one small message (run.mjs put it in outgoing/), so "idle" means an engine
    // that has run, not one whose code was never loaded.
    const warm = await engine.flush();
    const problems = summaryProblems(warm, 1).map((p) => `warm-up: ${p}`);
    if (typeof globalThis.gc === "function") { globalThis.gc(); globalThis.gc(); }
    await sleep(200);
    const idle = process.memoryUsage();
    const rssIdle = idle.rss;
    const rss = rssSampler(20);
    // Where the growth sits: the V8 heap, or Buffers outside it (read and stuffer chunks).
    const peaks = { heapUsed: idle.heapUsed, external: idle.external, arrayBuffers: idle.arrayBuffers };
    const breakdown = setInterval(() => {
      const m = process.memoryUsage();
      for (const k of Object.keys(peaks)) peaks[k] = Math.max(peaks[k], m[k]);
    }, 20);
    const loop = loopDelay();
    // The big one, written beforehand by run.mjs, is dropped in by a rename.
    await fs.promises.rename(args.staged, path.join(args.maildir, "outgoing", args.id));
    const t0 = performance.now();
    const window = { startUs: monotonicUs() };
    const summary = await engine.flush();
    window.endUs = monotonicUs();
    const seconds = (performance.now() - t0) / 1000;
    const loopMs = loop.stop();
    const rssPeak = rss.stop();
    clearInterval(breakdown);
    problems.push(...summaryProblems(summary, 1), ...errors.slice(0, 3).map((m) => `engine error: ${m}`), ...(await leftovers(args.maildir)));
    return {
      ok: problems.length === 0, problems,
      bytes: args.bytes, seconds: round(seconds, 3), mbPerSec: round(args.bytes / 1048576 / seconds, 1),
      rssIdleMB: toMB(rssIdle), rssPeakMB: toMB(rssPeak), rssGrowthMB: toMB(rssPeak - rssIdle), loop: loopMs, window,
      peakGrowthMB: Object.fromEntries(Object.entries(peaks).map(([k, v]) => [k, toMB(v - idle[k])])),
    };
  } finally {
    await engine.stop();
  }
}

/* ---------------------------------------------------------------------------------- */

async function latency() {
  const { MailEngine } = await import(LIBRARY);
  // Default options: only where the spool is, where to relay, and where the log goes.
  const engine = new MailEngine({ maildir: args.maildir, relay: `${HOST}:${args.port}`, log: args.logFile });
  const errors = [];
  engine.on("error", (e) => errors.push(e.message));
  const text = makeBody(1024);
  // Every "sent" event, by queue id: a send waits for its own id's, and an id sent twice is counted.
  const sentAt = new Map();
  const waiting = new Map();
  let duplicates = 0;
  const strays = [];
  engine.on("sent", (outcome) => {
    const now = performance.now();
    if (sentAt.has(outcome.queueId)) { duplicates++; strays.push(outcome.queueId); return; }
    sentAt.set(outcome.queueId, now);
    waiting.get(outcome.queueId)?.(now);
  });
  const one = async (i) => {
    const t0 = performance.now();
    const id = await engine.send({ from: FROM, to: rcpt(i), subject: `latency ${i}`, text });
    const queued = performance.now();
    let timer;
    try {
      const done = sentAt.get(id) ?? await new Promise((resolve, reject) => {
        waiting.set(id, resolve);
        timer = setTimeout(() => reject(new Error(`no "sent" event within 10 s for ${id} (send #${i})`)), 10_000);
      });
      return { total: done - t0, queue: queued - t0 };
    } finally {
      clearTimeout(timer);
      waiting.delete(id);
    }
  };
  try {
    engine.start();
    for (let i = 0; i < args.warmup; i++) await one(-1 - i);
    await sleep(100);
    const totals = [];
    const queues = [];
    const t0 = performance.now();
    for (let i = 0; i < args.n; i++) {
      const r = await one(i);
      totals.push(r.total);
      queues.push(r.queue);
    }
    const seconds = (performance.now() - t0) / 1000;
    totals.sort((a, b) => a - b);
    queues.sort((a, b) => a - b);
    await sleep(200); // a late duplicate still counts
    const problems = errors.slice(0, 3).map((m) => `engine error: ${m}`);
    if (duplicates) problems.push(`${duplicates} "sent" event(s) for a queue id already sent: ${strays.slice(0, 5).join(", ")}`);
    return {
      ok: problems.length === 0, problems, duplicates, sends: args.n, warmup: args.warmup, seconds: round(seconds, 3),
      ms: { p50: round(percentile(totals, 50)), p99: round(percentile(totals, 99)), max: round(totals.at(-1)), min: round(totals[0]) },
      // The part of it spent in send() itself: composing and writing the queue file (fsync on).
      sendCallMs: { p50: round(percentile(queues, 50)), p99: round(percentile(queues, 99)) },
    };
  } finally {
    await engine.stop();
  }
}

/* ---------------------------------------------------------------------------------- */

/**
 * The receiver (--serve) with one local user, and smtp-source's sessions (-d: each keeps its
 * connection for many messages) all sending to that one mailbox; timed from smtp-source's
 * start to its exit (every message answered 250, so on disk), then the mbox is counted.
 */
async function receiver() {
  const { startServer } = await import(LIBRARY);
  const user = "user@local.test";
  fs.mkdirSync(path.join(args.maildir, "users", user), { recursive: true });
  const server = await startServer({ maildir: args.maildir, listen: `${HOST}:0`, hostname: "receiver.bench", log: () => undefined, maxSessions: args.sessions + 10 });
  try {
    const argv = ["-d", "-s", String(args.sessions), "-m", String(args.n), "-l", String(args.size), "-f", FROM, "-t", user, `${HOST}:${server.address.port}`];
    const cpu0 = process.cpuUsage();
    const loop = loopDelay();
    const window = { startUs: monotonicUs() };
    const r = await run(SMTP_SOURCE, argv, { timeoutMs: args.timeoutMs, stderrFile: args.stderrFile });
    window.endUs = monotonicUs();
    const loopMs = loop.stop();
    const cpu = process.cpuUsage(cpu0);
    const seconds = r.ms / 1000;
    const problems = [];
    if (r.timedOut) problems.push(`smtp-source timed out after ${args.timeoutMs / 1000} s`);
    else if (r.code !== 0) problems.push(`smtp-source exited ${r.code ?? r.signal}: ${fs.readFileSync(args.stderrFile, "utf8").trim().slice(0, 300)}`);
    await server.close();
    const mbox = fs.readFileSync(path.join(args.maildir, "users", user, "mail"), "latin1");
    const stored = (mbox.match(/^From /gm) ?? []).length;
    if (stored !== args.n) problems.push(`the mailbox holds ${stored} messages, expected ${args.n}`);
    const journal = fs.readdirSync(path.join(args.maildir, "journal")).map((f) => fs.readFileSync(path.join(args.maildir, "journal", f), "utf8")).join("");
    const groups = (journal.match(/ - synced \d+ messages?/g) ?? []).length;
    return {
      ok: problems.length === 0, problems, command: `smtp-source ${argv.join(" ")}`,
      messages: args.n, sessions: args.sessions, seconds: round(seconds, 3), msgsPerSec: Math.round(args.n / seconds),
      cpuUsPerMsg: round((cpu.user + cpu.system) / args.n, 1), loop: loopMs, stored,
      syncs: groups || null, messagesPerSync: groups ? round(stored / groups, 1) : null, window,
    };
  } finally {
    await server.close();
  }
}

const cases = { "mudmail-flush": mudmailFlush, "mudmail-send": mudmailSend, nodemailer, receiver, big, latency };
const fn = cases[args.case];
let result;
try {
  if (!fn) throw new Error(`unknown case ${args.case}`);
  result = await fn();
} catch (err) {
  result = { ok: false, problems: [`worker threw: ${err?.stack ?? err}`] };
}
fs.writeFileSync(args.out, JSON.stringify(result, null, 2) + "\n");
// A pooled transport or a lingering socket must not keep the worker alive.
process.exit(0);
