// bench/lib/sink.mjs - Postfix's smtp-sink on a free loopback port, with its running
// counters (-c) going to a file (never a pipe: under load it writes a lot), PIPELINING
// announced (its default), and a check that it greets before anyone is timed against it.

import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { sleep, startChild } from "./util.mjs";

export const SMTP_SINK = "/usr/sbin/smtp-sink";
export const SMTP_SOURCE = "/usr/sbin/smtp-source";
export const HOST = "127.0.0.1";

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Connects until the 220 greeting arrives, says QUIT; bounded by `ms`. */
export async function waitForGreeting(port, ms, exited) {
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
        if (!quitSent && /^220 [^\n]*\n/.test(buf)) { quitSent = true; sock.write("QUIT\r\n"); }
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

/** The last "sess=N quit=N mesg=N" in smtp-sink -c output (CR-separated), or null. */
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

/**
 * Starts smtp-sink in `dir` (its output files go there). Returns
 * { port, command, counters(), waitForMessages(n, ms), stop() }.
 */
export async function startSink(dir) {
  const outFile = path.join(dir, "smtp-sink.out");
  const errFile = path.join(dir, "smtp-sink.err");
  let lastError = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    const port = await freePort();
    const args = [];
    if (process.getuid?.() === 0) args.push("-u", "nobody");
    // -c counters; -m: up to 1024 sessions at once; the last argument is the listen backlog.
    args.push("-c", "-m", "1024", `${HOST}:${port}`, "1024");
    const proc = startChild(SMTP_SINK, args, { stdoutFile: outFile, stderrFile: errFile });
    const ready = await waitForGreeting(port, 5000, proc.exited);
    const zero = { sess: 0, quit: 0, mesg: 0 };
    let base = zero;
    const sink = {
      port,
      command: `${SMTP_SINK} ${args.join(" ")}`,
      /** Counters since the last reset(). */
      counters() {
        const c = readCounters(outFile) ?? zero;
        return { sess: c.sess - base.sess, quit: c.quit - base.quit, mesg: c.mesg - base.mesg };
      },
      reset() { base = readCounters(outFile) ?? zero; },
      /** smtp-sink counts a session when it ends: wait (bounded) until it has seen n messages. */
      async waitForMessages(n, ms = 3000) {
        const deadline = Date.now() + ms;
        let c = sink.counters();
        while (c.mesg < n && Date.now() < deadline) { await sleep(25); c = sink.counters(); }
        await sleep(50);
        return sink.counters();
      },
      stop: () => proc.stop(),
    };
    if (ready.ok) {
      // The readiness probe's session is not part of any case: wait (bounded) until the
      // sink has counted it, then count from there.
      for (let i = 0; i < 40 && (readCounters(outFile)?.sess ?? 0) < 1; i++) await sleep(25);
      sink.reset();
      return sink;
    }
    await proc.stop();
    const stderr = fs.readFileSync(errFile, "utf8").trim();
    lastError = `${ready.why}; command: ${sink.command}; stderr: ${stderr || "(empty)"}`;
    if (!/in use/i.test(stderr)) break; // retry only a port race
  }
  throw new Error(`cannot start smtp-sink: ${lastError}`);
}
