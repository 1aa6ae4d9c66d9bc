// bench/worker.mjs - one measurement in a fresh process, so RSS and the event loop belong
// to that measurement alone. Started by bench/run.mjs:
//
//   node [--expose-gc] bench/worker.mjs '{"case":"mudmail-flush", ..., "out":"/tmp/.../result.json"}'
//
// Cases:
//   mudmail-flush   time `await engine.flush()` of a spool run.mjs filled (fsync off)
//   nodemailer      a pooled Nodemailer transport fed n messages, every sendMail at once
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
import { loopDelay, percentile, round, rssSampler, sleep, toMB } from "./lib/util.mjs";
import { HOST } from "./lib/sink.mjs";

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

/* ---------------------------------------------------------------------------------- */

async function mudmailFlush() {
  const { MailEngine } = await import(LIBRARY);
  const engine = new MailEngine({
    maildir: args.maildir, relay: `${HOST}:${args.port}`, maxConnections: args.slots, log: args.logFile, fsync: false,
  });
  const errors = [];
  engine.on("error", (e) => errors.push(e.message));
  try {
    const rssBase = process.memoryUsage.rss();
    const cpu0 = process.cpuUsage();
    const rss = rssSampler(20);
    const loop = loopDelay();
    const t0 = performance.now();
    const summary = await engine.flush();
    const seconds = (performance.now() - t0) / 1000;
    const loopMs = loop.stop();
    const rssPeak = rss.stop();
    const cpu = process.cpuUsage(cpu0);
    const problems = [...summaryProblems(summary, args.expect), ...errors.slice(0, 3).map((m) => `engine error: ${m}`)];
    problems.push(...(await leftovers(args.maildir)));
    return {
      ok: problems.length === 0, problems,
      messages: args.expect, seconds: round(seconds, 3), msgsPerSec: Math.round(args.expect / seconds),
      usPerMsg: round((seconds * 1e6) / args.expect, 1),
      cpuUsPerMsg: round((cpu.user + cpu.system) / args.expect, 1),
      loop: loopMs, rssBaseMB: toMB(rssBase), rssPeakMB: toMB(rssPeak), summary,
    };
  } finally {
    await engine.stop();
  }
}

/* ---------------------------------------------------------------------------------- */

async function nodemailer() {
  const require = createRequire(import.meta.url);
  const nm = require("nodemailer");
  const version = require("nodemailer/package.json").version;
  const transport = nm.createTransport({
    pool: true, maxConnections: args.slots, maxMessages: Infinity,
    host: HOST, port: args.port, secure: false, ignoreTLS: true,
  });
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
        ? transport.sendMail({ from: `Bench <${FROM}>`, to: rcpt(i), subject: `bench message ${i}`, text: body, date, messageId: `<nm.${i}@localhost>` })
        // The same bytes as mudmail's queue file holds: header block + body.
        : transport.sendMail({ envelope: { from: FROM, to: [rcpt(i)] }, raw: headers(i, date, "nm") + body });
    }
    const results = await Promise.allSettled(pending);
    const seconds = (performance.now() - t0) / 1000;
    const loopMs = loop.stop();
    const rssPeak = rss.stop();
    const cpu = process.cpuUsage(cpu0);
    const failed = results.filter((r) => r.status === "rejected");
    const problems = failed.length ? [`${failed.length} sendMail calls failed, first: ${failed[0].reason?.message}`] : [];
    return {
      ok: problems.length === 0, problems, version,
      messages: args.n, seconds: round(seconds, 3), msgsPerSec: Math.round(args.n / seconds),
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
    const summary = await engine.flush();
    const seconds = (performance.now() - t0) / 1000;
    const loopMs = loop.stop();
    const rssPeak = rss.stop();
    clearInterval(breakdown);
    problems.push(...summaryProblems(summary, 1), ...errors.slice(0, 3).map((m) => `engine error: ${m}`), ...(await leftovers(args.maildir)));
    return {
      ok: problems.length === 0, problems,
      bytes: args.bytes, seconds: round(seconds, 3), mbPerSec: round(args.bytes / 1048576 / seconds, 1),
      rssIdleMB: toMB(rssIdle), rssPeakMB: toMB(rssPeak), rssGrowthMB: toMB(rssPeak - rssIdle), loop: loopMs,
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

const cases = { "mudmail-flush": mudmailFlush, nodemailer, big, latency };
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
