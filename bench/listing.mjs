// bench/listing.mjs - how long does MailEngine.queue() take over a large queue, and how long
// does it hold the host's event loop?
//
//   node build.mjs && node bench/listing.mjs [--messages N]
//
// Writes N queue files (default 50,000; not synced, not timed) into deferred/ of a fresh
// maildir, starts an engine on it (its relay is never used: nothing is flushed), asks for the
// listing once to start the spool's thread, then times a second `await engine.queue()` while a
// 1 ms timer and monitorEventLoopDelay watch the loop. Prints one line. A plain script, not a test.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { MailEngine } from "../dist/index.js";

const at = process.argv.indexOf("--messages");
const n = at >= 0 ? Number(process.argv[at + 1]) : 50_000;
if (!Number.isInteger(n) || n < 1) {
  console.error("usage: node bench/listing.mjs [--messages N]");
  process.exit(2);
}
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-listing-"));
const maildir = path.join(dir, "maildir");
try {
  for (const f of ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"]) fs.mkdirSync(path.join(maildir, f), { recursive: true, mode: 0o700 });
  const t0 = Math.floor(Date.now() / 1000) - 100;
  for (let i = 0; i < n; i++) {
    fs.writeFileSync(path.join(maildir, "deferred", `${t0}.${i}`), `a@b.example\nc${i}@d${i % 50}.example\nSubject: x\n\nbody\n`, { mode: 0o600 });
  }
  const engine = new MailEngine({ maildir, relay: "127.0.0.1:9", log: () => {} });
  try {
    await engine.queue();
    const delay = monitorEventLoopDelay({ resolution: 1 });
    delay.enable();
    let longest = 0;
    let last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      longest = Math.max(longest, now - last);
      last = now;
    }, 1);
    const started = performance.now();
    const listed = await engine.queue();
    const ms = performance.now() - started;
    await new Promise((resolve) => setTimeout(resolve, 20));
    clearInterval(timer);
    delay.disable();
    console.log(`queue() of ${listed.length} messages: ${ms.toFixed(0)} ms; the host's loop: longest gap between 1 ms timers ${longest.toFixed(1)} ms, ` +
      `delay p99 ${(delay.percentile(99) / 1e6).toFixed(1)} ms, max ${(delay.max / 1e6).toFixed(1)} ms`);
  } finally {
    await engine.stop();
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
