// bench/flush.mjs - how fast does one MailEngine.flush() empty a full queue into smtp-sink?
//
//   node build.mjs && node bench/flush.mjs [--messages N] [--slots N] [--size BYTES]
//
// Starts Postfix's smtp-sink on a free loopback port, drops N queue files into a fresh
// maildir the way another program would (write to tmp/, rename into outgoing/; SPEC 1 and 2),
// then, in this process, times `await engine.flush()` with 5 (or --slots) connection slots,
// measuring the event-loop delay (monitorEventLoopDelay, 1 ms resolution) and the RSS (sampled
// every 50 ms). Writing the queue files is not timed. Prints a table and writes the same
// figures to bench/results-flush.json. Exits 1 when the pass did not send every message or
// left files behind. A plain script, not a test.

import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { MailEngine } from "../dist/mail.js";

const SMTP_SINK = "/usr/sbin/smtp-sink";
const HOST = "127.0.0.1";

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

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Connects until smtp-sink's 220 greeting arrives, then says QUIT. Bounded by `ms`. */
async function waitForGreeting(port, ms, exited) {
  const deadline = Date.now() + ms;
  let last = "no attempt";
  while (Date.now() < deadline) {
    if (exited()) return { ok: false, why: exited() };
    const result = await new Promise((resolve) => {
      const sock = net.connect({ host: HOST, port });
      const timer = setTimeout(() => { sock.destroy(); resolve({ ok: false, why: "no greeting within 1 s" }); }, 1000);
      let buf = "";
      let quitSent = false;
      sock.setEncoding("latin1");
      sock.on("data", (d) => {
        buf += d;
        if (!quitSent && /^220 [^\n]*\n/.test(buf)) {
          quitSent = true;
          sock.write("QUIT\r\n");
        }
        if (/\n221[ -]/.test(buf)) { clearTimeout(timer); sock.end(); resolve({ ok: true }); }
      });
      sock.on("error", (e) => { clearTimeout(timer); resolve({ ok: false, why: e.message }); });
      sock.on("close", () => { clearTimeout(timer); resolve({ ok: false, why: "closed before 221" }); });
    });
    if (result.ok) return result;
    last = result.why;
    await sleep(50);
  }
  return { ok: false, why: `smtp-sink not ready after ${ms} ms (${last})` };
}

/** smtp-sink -c counters ("sess=N quit=N mesg=N", CR-separated), the last one in its output. */
function readCounters(file) {
  let text = "";
  try {
    const fd = fs.openSync(file, "r");
    try {
      const size = fs.fstatSync(fd).size;
      const len = Math.min(size, 4096);
      const buf = Buffer.alloc(len);
      fs.readSync(fd, buf, 0, len, size - len);
      text = buf.toString("latin1");
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return null;
  }
  const all = [...text.matchAll(/sess=(\d+) quit=(\d+) mesg=(\d+)/g)];
  if (!all.length) return null;
  const m = all[all.length - 1];
  return { sess: Number(m[1]), quit: Number(m[2]), mesg: Number(m[3]) };
}

async function startSink(dir) {
  const outFile = path.join(dir, "smtp-sink.out");
  const errFile = path.join(dir, "smtp-sink.err");
  let lastError = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    const port = await freePort();
    const args = [];
    if (process.getuid?.() === 0) args.push("-u", "nobody");
    // -c: running counters on stdout (sessions, QUITs, messages) - to a file, never a pipe.
    // PIPELINING is announced by default. The last argument is the listen(2) backlog.
    args.push("-c", `${HOST}:${port}`, "1024");
    const out = fs.openSync(outFile, "w");
    const err = fs.openSync(errFile, "w");
    let child;
    try {
      child = spawn(SMTP_SINK, args, { stdio: ["ignore", out, err] });
    } finally {
      fs.closeSync(out);
      fs.closeSync(err);
    }
    let exited = null;
    const exitPromise = new Promise((resolve) => {
      child.once("exit", (code, signal) => { exited = `smtp-sink exited (code ${code}, signal ${signal})`; resolve(); });
      child.once("error", (e) => { exited = `cannot run ${SMTP_SINK}: ${e.message}`; resolve(); });
    });
    const ready = await waitForGreeting(port, 5000, () => exited);
    const sink = {
      port, outFile, command: `${SMTP_SINK} ${args.join(" ")}`,
      async stop() {
        if (exited) return;
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 3000);
        await exitPromise;
        clearTimeout(t);
      },
    };
    if (ready.ok) return sink;
    await sink.stop();
    const stderr = fs.readFileSync(errFile, "utf8").trim();
    lastError = `${ready.why}; command: ${sink.command}; stderr: ${stderr || "(empty)"}`;
    if (!/in use/i.test(stderr)) break; // retry only a port race
  }
  throw new Error(`cannot start smtp-sink: ${lastError}`);
}

/* ---------------------------------------------------------------------------------- */
/* The queue                                                                           */

/** A body of exactly `size` bytes (LF line ends): normal text, and lines the engine must dot-stuff. */
function makeBody(size) {
  const lines = [];
  let length = 0;
  const words = "the quick brown fox jumps over the lazy dog while the talker keeps on talking".split(" ");
  for (let i = 0; length < size; i++) {
    let line;
    if (i % 10 === 3) line = ".";                                  // a lone dot: would end DATA
    else if (i % 10 === 7) line = `.leading dot on line ${i}`;     // must go out as "..leading"
    else if (i % 10 === 9) line = `..two dots on line ${i}`;
    else line = Array.from({ length: 11 }, (_, k) => words[(i + k) % words.length]).join(" ");
    lines.push(line);
    length += line.length + 1;
  }
  return (lines.join("\n") + "\n").slice(0, size);
}

function rfc2822Date(d) {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const p = (n) => String(n).padStart(2, "0");
  return `${days[d.getUTCDay()]}, ${d.getUTCDate()} ${months[d.getUTCMonth()]} ${d.getUTCFullYear()} ` +
    `${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000`;
}

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
    const before = readCounters(sink.outFile) ?? { sess: 0, quit: 0, mesg: 0 };

    engine = new MailEngine({
      maildir, relay: `${HOST}:${sink.port}`, maxConnections: opts.slots, log: logFile, fsync: false,
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
    let after = readCounters(sink.outFile);
    for (let i = 0; i < 40 && (!after || after.mesg - before.mesg < summary.sent); i++) {
      await sleep(50);
      after = readCounters(sink.outFile);
    }
    await sleep(100);
    after = readCounters(sink.outFile) ?? after;
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
