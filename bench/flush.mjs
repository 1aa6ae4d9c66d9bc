// bench/flush.mjs - how fast does one MailEngine.flush() empty a full queue into smtp-sink?
//
//   node build.mjs && node bench/flush.mjs [--messages N] [--slots N] [--size BYTES]
//
// Starts Postfix's smtp-sink on a free loopback port, drops N queue files into a fresh
// maildir the way another program would (write to tmp/, rename into outgoing/; SPEC 1 and 2)
// and syncs the file system (the files on disk, as fsynced ones are), then, in this process,
// times `await engine.flush()` with the engine's default options (fsync on) and 5 (or --slots)
// connection slots,
// measuring the event-loop delay (monitorEventLoopDelay, 1 ms resolution) and the RSS (sampled
// every 50 ms). Writing the queue files is not timed. Prints a table and writes the same
// figures to bench/results-flush.json. Exits 1 when the pass did not send every message or
// left files behind. A plain script, not a test.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { MailEngine } from "../dist/index.js";
import { HOST, startSink } from "./lib/sink.mjs";
import { makeBody, rfc2822Date, syncFs } from "./lib/spool.mjs";


/* ---------------------------------------------------------------------------------- */
/* Arguments                                                                           */

function parseArgs(argv) {
  const opts = { messages: 10000, slots: 5, size: 1024 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const key = { "--messages": "messages", "--slots": "slots", "--size": "size" }[flag];
    if (flag === "--help" || flag === "-h") {
      console.log("usage: node bench/flush.mjs [--messages N] [--slots N] [--size BYTES]");
      process.exit(0);
    }
    if (!key) usage(`unknown argument ${JSON.stringify(flag)}`);
    const value = Number(argv[++i]);
    if (!Number.isInteger(value) || value < (key === "size" ? 0 : 1)) usage(`${flag}: expected a whole number, got ${JSON.stringify(argv[i])}`);
    opts[key] = value;
  }
  return opts;
}

function usage(message) {
  console.error(`flush.mjs: ${message}\nusage: node bench/flush.mjs [--messages N] [--slots N] [--size BYTES]`);
  process.exit(2);
}

/* ---------------------------------------------------------------------------------- */
/* smtp-sink                                                                           */

/** Writes N queue files the way another program drops them: tmp/ first, then rename into outgoing/. */
async function fillQueue(maildir, n, size) {
  const tmp = path.join(maildir, "tmp");
  const outgoing = path.join(maildir, "outgoing");
  await fs.promises.mkdir(tmp, { recursive: true, mode: 0o700 });
  await fs.promises.mkdir(outgoing, { recursive: true, mode: 0o700 });
  const body = makeBody(size);
  const seconds = Math.floor(Date.now() / 1000);
  const date = rfc2822Date(new Date());
  const writeOne = async (i) => {
    const id = `${seconds}.${i}`;
    const text =
      "<bench@localhost>\n" +
      `user${i}@example.test\n` +
      `Date: ${date}\n` +
      `Message-ID: <${id}.bench@localhost>\n` +
      "From: Bench <bench@localhost>\n" +
      `To: user${i}@example.test\n` +
      `Subject: bench message ${i}\n` +
      "\n" + body;
    const tmpPath = path.join(tmp, `bench.${process.pid}.${i}`);
    await fs.promises.writeFile(tmpPath, text, { flag: "wx", mode: 0o600 });
    await fs.promises.rename(tmpPath, path.join(outgoing, id));
  };
  const width = 64;
  let next = 0;
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < n) await writeOne(next++);
  }));
}

/* ---------------------------------------------------------------------------------- */
/* The run                                                                             */

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ms = (ns) => Math.round(ns / 1e4) / 100; // nanoseconds -> milliseconds, 2 decimals
const mb = (bytes) => Math.round(bytes / 1048576 * 10) / 10;

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), "mudmail-bench-"));
  await fs.promises.chmod(dir, 0o755);
  const maildir = path.join(dir, "maildir");
  const logFile = path.join(dir, "mudmail.log");
  let sink = null;
  let engine = null;
  try {
    sink = await startSink(dir);
    await fillQueue(maildir, opts.messages, opts.size);
    syncFs(maildir);
    const before = sink.counters();

    engine = new MailEngine({
      maildir, relay: `${HOST}:${sink.port}`, maxConnections: opts.slots, log: logFile,
    });
    const errors = [];
    engine.on("error", (e) => errors.push(e));

    const loop = monitorEventLoopDelay({ resolution: 1 });
    let peakRss = process.memoryUsage().rss;
    const sampler = setInterval(() => { peakRss = Math.max(peakRss, process.memoryUsage().rss); }, 50);
    loop.enable();
    const t0 = performance.now();
    let summary;
    let seconds;
    try {
      summary = await engine.flush();
    } finally {
      seconds = (performance.now() - t0) / 1000;
      loop.disable();
      clearInterval(sampler);
      peakRss = Math.max(peakRss, process.memoryUsage().rss);
    }
    await engine.stop();
    engine = null;

    // Check: every message sent, nothing left in the queue folders.
    const problems = [];
    if (summary.sent !== opts.messages) problems.push(`summary.sent is ${summary.sent}, expected ${opts.messages} (summary: ${JSON.stringify(summary)})`);
    for (const folder of ["outgoing", "outgoing_active", "deferred", "corrupt"]) {
      const left = await fs.promises.readdir(path.join(maildir, folder)).catch(() => []);
      if (left.length) problems.push(`${folder}/ still holds ${left.length} file(s): ${left.slice(0, 5).join(", ")}${left.length > 5 ? ", ..." : ""}`);
    }
    for (const e of errors.slice(0, 5)) problems.push(`engine error: ${e.message}`);

    // smtp-sink counts a session when it ends: give it a moment to see the last ones.
    let after = sink.counters();
    for (let i = 0; i < 40 && (!after || after.mesg - before.mesg < summary.sent); i++) {
      await sleep(50);
      after = sink.counters();
    }
    await sleep(100);
    after = sink.counters() ?? after;
    const sinkConnections = after ? after.sess - before.sess : null;
    const sinkMessages = after ? after.mesg - before.mesg : null;
    if (sinkMessages !== null && sinkMessages !== opts.messages) problems.push(`smtp-sink counted ${sinkMessages} messages, expected ${opts.messages}`);

    const result = {
      messages: opts.messages,
      slots: opts.slots,
      messageSizeBytes: opts.size,
      seconds: Math.round(seconds * 1000) / 1000,
      messagesPerSecond: Math.round(opts.messages / seconds),
      loopDelayMs: { p50: ms(loop.percentile(50)), p99: ms(loop.percentile(99)), max: ms(loop.max), mean: ms(loop.mean) },
      peakRssMB: mb(peakRss),
      sinkConnections,
      sinkMessages,
      summary,
      cpus: os.cpus().length,
      node: process.version,
      date: new Date().toISOString(),
      ok: problems.length === 0,
    };

    const rows = [
      ["messages", result.messages],
      ["slots", result.slots],
      ["message size", `${result.messageSizeBytes} B body`],
      ["seconds", result.seconds.toFixed(3)],
      ["messages/second", result.messagesPerSecond],
      ["loop delay p50", `${result.loopDelayMs.p50} ms`],
      ["loop delay p99", `${result.loopDelayMs.p99} ms`],
      ["loop delay max", `${result.loopDelayMs.max} ms`],
      ["peak RSS", `${result.peakRssMB} MB`],
      ["smtp-sink connections", sinkConnections ?? "unknown"],
      ["smtp-sink messages", sinkMessages ?? "unknown"],
      ["CPUs", result.cpus],
      ["Node", result.node],
    ];
    const w = Math.max(...rows.map(([k]) => k.length));
    for (const [k, v] of rows) console.log(`${k.padEnd(w)}  ${v}`);
    console.log("(loop delay is the 1 ms-resolution timer's interval: about 1 ms means an idle loop)");

    const jsonPath = fileURLToPath(new URL("./results-flush.json", import.meta.url));
    await fs.promises.writeFile(jsonPath, JSON.stringify(result, null, 2) + "\n");

    if (problems.length) {
      for (const p of problems) console.error(`PROBLEM: ${p}`);
      // The temp dir (and the engine's log) goes in the finally block: show the first bad lines now.
      const log = await fs.promises.readFile(logFile, "utf8").catch(() => "");
      const bad = log.split("\n").filter((l) => /status=(deferred|bounced)|corrupt|error/i.test(l)).slice(0, 5);
      for (const l of bad) console.error(`  log: ${l}`);
      process.exitCode = 1;
    }
  } finally {
    if (engine) await engine.stop().catch(() => undefined);
    if (sink) await sink.stop();
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`flush.mjs: ${err?.stack ?? err}`);
  process.exitCode = 1;
});
