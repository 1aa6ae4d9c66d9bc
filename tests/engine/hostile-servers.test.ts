// Hostile servers: a table of misbehaving SMTP servers, each
// one a scripted server (tests/helpers/scripted-server.ts; a plain node:net server for the
// endless line, which must be streamed). For each case an engine in this process flushes two
// queued messages through it with 1-second stage timeouts, and the test checks that
//   - the flush ends within the time the stage's timeout allows,
//   - each message ends in the right state (deferred/ for what may work later, gone when
//     sent or bounced) with a log line that says what happened,
//   - the process RSS stays bounded (sampled while the flush runs),
//   - no exception escapes (uncaughtException / unhandledRejection) and the engine emits no
//     "error" event,
//   - the engine keeps serving: the server is then fixed, one more message is queued, and a
//     second flush of the same engine (--force) delivers it and everything deferred.
//
// The messages come from the null sender, so a message that bounces is dropped, not answered
// with a DSN that would meet the same server (the log says so).

import t from "tap";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import net from "node:net";
import { MailEngine, type FlushSummary, type MailError, type MailOptions } from "../../mail.js";
import { multiline, startScriptedServer, type Reply, type Script, type ScriptedServer } from "../helpers/scripted-server.js";
import { testMessage, testNumber } from "../helpers/spool-files.js";
import { torturePrng, watchProcess } from "../helpers/prng.js";
import { bounded } from "../helpers/daemon.js";

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const prng = torturePrng(7_0003);
t.comment(`seed ${prng.seed} (TORTURE_SEED=${prng.seed} repeats this run)`);

/** Every stage bounded by one second. */
const FAST: MailOptions = {
  connectTimeout: 1, heloTimeout: 1, mailTimeout: 1, rcptTimeout: 1,
  dataInitTimeout: 1, dataXferTimeout: 1, dataDoneTimeout: 1, quitTimeout: 1,
};
/** For the slow drip that must succeed: the 90-octet EHLO reply takes half a second at 5 ms an octet. */
const TWO_SECONDS: MailOptions = {
  connectTimeout: 2, heloTimeout: 2, mailTimeout: 2, rcptTimeout: 2,
  dataInitTimeout: 2, dataXferTimeout: 2, dataDoneTimeout: 2, quitTimeout: 2,
};
/** RSS growth allowed while one hostile flush runs. */
const RSS_LIMIT_MB = 64;

/* ------------------------------------------------------------------------------------ */
/* Replies as a hostile server shapes them                                               */

const EHLO_LINES = ["scripted.test", "PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"];
const EHLO_TEXT = multiline(250, EHLO_LINES).map((l) => `${l}\r\n`).join("");

/** A script whose every reply (greeting, EHLO, MAIL, RCPT, DATA, dot, RSET, QUIT) is text -> Reply. */
function everyReply(shape: (text: string) => Reply, ehlo = EHLO_TEXT): Script {
  return {
    greeting: shape("220 scripted.test ESMTP\r\n"),
    onCommand: (line) => {
      const verb = (/^\S*/.exec(line)?.[0] ?? "").toUpperCase();
      switch (verb) {
        case "EHLO": return shape(ehlo);
        case "MAIL": return shape("250 2.1.0 Ok\r\n");
        case "RCPT": return shape("250 2.1.5 Ok\r\n");
        case "DATA": return shape("354 End data with <CR><LF>.<CR><LF>\r\n");
        case "RSET": return shape("250 2.0.0 Ok\r\n");
        case "QUIT": return shape("221 2.0.0 Bye\r\n");
        default: return undefined;
      }
    },
    onData: () => shape("250 2.0.0 Ok: queued\r\n"),
  };
}

/** One octet per write, `ms` apart. */
const drip = (ms: number) => (text: string): Reply => ({ action: "raw", chunks: [...Buffer.from(text)].map((b) => Buffer.from([b])), delayMs: ms });

/** After STARTTLS's 220 the server never says (or reads as TLS) anything again. */
function stalledTls(): Script {
  const stalled = new WeakSet<object>();
  return {
    extensions: ["STARTTLS"],
    onCommand: (line, session) => {
      if (stalled.has(session)) return { action: "silence" };
      if (/^STARTTLS/i.test(line)) {
        stalled.add(session);
        return "220 2.0.0 Ready to start TLS";
      }
      return undefined;
    },
  };
}

/** Garbage: octets no reply starts with, CR LF at the end. */
function garbage(n: number): Buffer {
  return Buffer.concat([Buffer.from([0x00, 0xff]), prng.bytes(n), Buffer.from("\r\n")]);
}

const onData = (reply: Reply): Script["onData"] => () => reply;
const onVerb = (verb: string, reply: Reply): Script["onCommand"] => (line) => ((/^\S*/.exec(line)?.[0] ?? "").toUpperCase() === verb ? reply : undefined);

/* ------------------------------------------------------------------------------------ */
/* The endless line: streamed by a plain server (a scripted raw reply would be built in memory) */

interface Endless {
  port: number;
  /** Octets written to each connection before the client hung up. */
  written: number[];
  /** From now on, connections are passed to this port (the fixed server). */
  fixTo(port: number): void;
  close(): Promise<void>;
}

async function endlessLineServer(total: number): Promise<Endless> {
  const written: number[] = [];
  const sockets = new Set<net.Socket>();
  let fixed: number | null = null;
  const block = Buffer.alloc(64 * 1024, 0x78);
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
    if (fixed !== null) {
      const upstream = net.connect({ host: "127.0.0.1", port: fixed });
      sockets.add(upstream);
      upstream.on("close", () => { sockets.delete(upstream); socket.destroy(); });
      upstream.on("error", () => socket.destroy());
      socket.on("close", () => upstream.destroy());
      socket.pipe(upstream);
      upstream.pipe(socket);
      return;
    }
    socket.write("220 endless.test ESMTP\r\n");
    let sent = 0;
    let started = false;
    const index = written.length;
    written.push(0);
    const pump = () => {
      while (sent < total && !socket.destroyed) {
        const n = Math.min(block.length, total - sent);
        sent += n;
        written[index] = sent;
        if (!socket.write(block.subarray(0, n))) return void socket.once("drain", pump);
      }
    };
    socket.on("data", (d: Buffer) => {
      // The reply to EHLO is one line of `total` octets that never ends.
      if (!started && /^EHLO/i.test(d.toString("latin1"))) {
        started = true;
        socket.write("250-");
        pump();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    written,
    fixTo: (port) => { fixed = port; },
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

/* ------------------------------------------------------------------------------------ */
/* The table                                                                             */

interface Case {
  name: string;
  /** The hostile script (a scripted server), or "endless" for the streamed endless line. */
  script: Script | "endless";
  engine?: MailOptions;
  /** What the flush of the two messages must count. */
  expect: Pick<FlushSummary, "sent" | "deferred" | "bounced">;
  /** A log line that says what happened. */
  log: RegExp;
  /** The flush must end within this many seconds. */
  within: number;
}

/** A timeout at the greeting or EHLO costs two connections (the tick gives up after two): 2 x 1 s. */
const TWO_TIMEOUTS = 3.5;
const QUICK = 2.5;
const deferred2 = { sent: 0, deferred: 2, bounced: 0 };

const CASES: Case[] = [
  // Silence and refusals before any mail.
  { name: "greeting never comes", script: { greeting: null }, expect: deferred2, within: TWO_TIMEOUTS,
    log: /status=deferred \(.*conversation with \S+ timed out while receiving the initial server greeting/ },
  { name: "421 at the greeting", script: { greeting: "421 4.3.2 Service not available" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(.*421 4\.3\.2 Service not available/ },
  { name: "421 to EHLO", script: { ehlo: "421 4.3.2 shutting down" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(.*said: 421 4\.3\.2 shutting down \(in reply to EHLO command\)/ },
  { name: "421 to MAIL", script: { mail: () => "421 4.3.2 shutting down" }, expect: deferred2, within: QUICK,
    log: /dsn=4\.3\.2, status=deferred \(host \S+ said: 421 4\.3\.2 shutting down \(in reply to MAIL FROM command\)\)/ },
  { name: "421 to RCPT", script: { rcpt: () => "421 4.3.2 shutting down" }, expect: deferred2, within: QUICK,
    log: /dsn=4\.3\.2, status=deferred \(host \S+ said: 421 4\.3\.2 shutting down \(in reply to RCPT TO command\)\)/ },
  { name: "421 to DATA", script: { onCommand: onVerb("DATA", "421 4.3.2 shutting down") }, expect: deferred2, within: QUICK,
    log: /dsn=4\.3\.2, status=deferred \(host \S+ said: 421 4\.3\.2 shutting down \(in reply to DATA command\)\)/ },
  { name: "421 after the dot", script: { onData: onData("421 4.3.2 shutting down") }, expect: deferred2, within: QUICK,
    log: /dsn=4\.3\.2, status=deferred \(host \S+ said: 421 4\.3\.2 shutting down \(in reply to end of DATA command\)\)/ },

  // Hang-ups (FIN) at each stage, and resets (RST).
  { name: "close at the greeting", script: { greeting: { action: "close" } }, expect: deferred2, within: QUICK,
    log: /status=deferred \(.*lost connection with \S+ while receiving the initial server greeting/ },
  { name: "close at EHLO", script: { ehlo: { action: "close" } }, expect: deferred2, within: QUICK,
    log: /status=deferred \(.*lost connection with \S+ while performing the EHLO handshake/ },
  { name: "close at MAIL", script: { mail: () => ({ action: "close" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending MAIL FROM\)/ },
  { name: "close at RCPT", script: { rcpt: () => ({ action: "close" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending RCPT TO\)/ },
  { name: "close at DATA", script: { onCommand: onVerb("DATA", { action: "close" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending DATA command\)/ },
  { name: "close after the dot", script: { onData: onData({ action: "close" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending end of data -- message may be sent more than once\)/ },
  { name: "reset (RST) at DATA", script: { onCommand: onVerb("DATA", { action: "reset" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending DATA command( \(Connection reset by peer\))?\)/ },
  { name: "reset (RST) after the dot", script: { onData: onData({ action: "reset" }) }, expect: deferred2, within: QUICK,
    log: /status=deferred \(lost connection with \S+ while sending end of data -- message may be sent more than once( \(Connection reset by peer\))?\)/ },
  { name: "EOF in the middle of a multi-line reply", script: { ehlo: { action: "raw", bytes: "250-scripted.test\r\n250-PIPELI", thenClose: true } },
    expect: deferred2, within: QUICK, log: /lost connection with \S+ while performing the EHLO handshake \(Premature EOF during smtp reply\./ },

  // Slow and split replies.
  { name: "every reply split byte by byte, 1 octet every 5 ms (within 2-second timeouts)", script: everyReply(drip(5)), engine: TWO_SECONDS,
    expect: { sent: 2, deferred: 0, bounced: 0 }, within: 8, log: /status=sent \(250 2\.0\.0 Ok: queued\)/ },
  { name: "a very slow drip of a long EHLO reply (60 lines, 1 octet every 5 ms): the stage timeout ends it",
    script: { ehlo: drip(5)(multiline(250, ["scripted.test", ...Array.from({ length: 59 }, (_, i) => `X-EXTENSION-${i} some words`)]).map((l) => `${l}\r\n`).join("")) },
    expect: deferred2, within: TWO_TIMEOUTS, log: /timed out while performing the EHLO handshake/ },
  { name: "LF-only line ends in every reply", script: everyReply((text) => ({ action: "raw", bytes: text.replace(/\r\n/g, "\n") })),
    expect: { sent: 2, deferred: 0, bounced: 0 }, within: QUICK, log: /status=sent \(250 2\.0\.0 Ok: queued\)/ },

  // Size: too many lines, too long a line, the limits themselves.
  { name: "a 10,000-line multi-line reply to EHLO", script: { ehlo: multiline(250, Array.from({ length: 10_000 }, (_, i) => `LINE-${i}`)) },
    expect: deferred2, within: QUICK, log: /broke the protocol: multi-line reply longer than 1000 lines \(in reply to EHLO command\)/ },
  { name: "an endless line: 100 MB without LF, streamed, in reply to EHLO", script: "endless",
    expect: deferred2, within: QUICK, log: /broke the protocol: reply line longer than 4096 octets \(in reply to EHLO command\)/ },
  { name: "the limits themselves: a 1000-line EHLO reply and a 4096-octet reply line are taken",
    script: { ehlo: multiline(250, ["scripted.test", "PIPELINING", `X-LONG ${"x".repeat(4096 - 4 - 7)}`, ...Array.from({ length: 997 }, (_, i) => `X-${i}`)]) },
    expect: { sent: 2, deferred: 0, bounced: 0 }, within: QUICK, log: /status=sent/ },

  // Wrong codes and garbage.
  { name: "354 to RCPT", script: { rcpt: () => "354 go ahead" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(host \S+ broke the protocol: 354 go ahead \(in reply to RCPT command\)\)/ },
  { name: "250 to DATA", script: { onCommand: onVerb("DATA", "250 2.0.0 Ok") }, expect: deferred2, within: QUICK,
    log: /status=deferred \(host \S+ broke the protocol: 250 2\.0\.0 Ok \(in reply to DATA command\)\)/ },
  { name: "220 to MAIL", script: { mail: () => "220 hello again" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(host \S+ broke the protocol: 220 hello again \(in reply to MAIL command\)\)/ },
  { name: "reply code 600 to MAIL", script: { mail: () => "600 six hundred" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(host \S+ broke the protocol: Improperly-formatted smtp reply: 600 six hundred \(in reply to MAIL command\)\)/ },
  { name: "reply code 999 to RCPT", script: { rcpt: () => "999 nine nine nine" }, expect: deferred2, within: QUICK,
    log: /status=deferred \(host \S+ broke the protocol: Improperly-formatted smtp reply: 999 nine nine nine \(in reply to RCPT command\)\)/ },
  { name: "the code changes in the middle of a multi-line reply", script: { ehlo: ["250-scripted.test", "421-PIPELINING", "250 8BITMIME"] },
    expect: deferred2, within: QUICK, log: /broke the protocol: Improperly-formatted smtp reply: 421-PIPELINING \(in reply to EHLO command\)/ },
  { name: "binary garbage in reply to EHLO", script: { ehlo: { action: "raw", bytes: garbage(300) } }, expect: deferred2, within: QUICK,
    log: /broke the protocol: Improperly-formatted smtp reply: .*\(in reply to EHLO command\)/ },
  { name: "5xx to EHLO and to HELO", script: { ehlo: "550 5.7.1 no EHLO here", onCommand: onVerb("HELO", "554 5.7.1 no HELO either") },
    expect: deferred2, within: QUICK, log: /refused to talk to me: 554 5\.7\.1 no HELO either \(in reply to HELO command\)/ },

  // Replies at the wrong moment.
  { name: "replies before commands: the greeting comes with two extra lines", script: { greeting: { action: "raw", bytes: "220 scripted.test ESMTP\r\n250 early\r\n250 earlier\r\n" } },
    expect: deferred2, within: QUICK, log: /sent a reply before the command it would answer: 250 early/ },
  { name: "an unsolicited extra reply after the first dot (one connection, the next envelope pipelined behind it)",
    script: {
      // The first 354 waits a moment, so the second message is surely read ahead when the
      // first dot goes out, and its envelope is pipelined behind it.
      onCommand: (c, session) => (c === "DATA" && session.messages.length === 0 ? { action: "delay", ms: 300, reply: "354 go ahead" } : undefined),
      onData: (_m, session) => (session.messages.length === 0 ? { action: "raw", bytes: "250 2.0.0 Ok: queued\r\n250 2.0.0 surprise\r\n" } : undefined),
    },
    engine: { maxConnections: 1 }, expect: { sent: 1, deferred: 1, bounced: 0 }, within: QUICK,
    log: /status=deferred \(host \S+ (sent a reply before the command it would answer|broke the protocol|sent an unexpected reply)/ },
  { name: "a 250 for the message before its data was sent (354 and 250 in one write)",
    script: { onCommand: onVerb("DATA", { action: "raw", bytes: "354 go ahead\r\n250 2.0.0 Ok: queued before the data\r\n" }) },
    expect: deferred2, within: QUICK, log: /status=deferred \(host \S+ sent a reply before the command it would answer: 250 2\.0\.0 Ok: queued before the data\)/ },

  // Extensions abused.
  { name: "a TLS handshake that stalls (STARTTLS offered, 220, then no TLS) under tls may", script: stalledTls(), engine: { tls: "may" },
    expect: deferred2, within: TWO_TIMEOUTS, log: /status=deferred \(.*(timed out while performing the EHLO handshake|TLS handshake)/ },
  { name: "an absurd SIZE 1", script: { size: 1 }, expect: { sent: 0, deferred: 0, bounced: 2 }, within: QUICK,
    log: /dsn=5\.3\.4, status=bounced \(message size \d+ exceeds size limit 1 of server \S+\)/ },
];

/* ------------------------------------------------------------------------------------ */

interface Rig {
  dir: string;
  maildir: string;
  engine: MailEngine;
  lines: string[];
  errors: MailError[];
  files(folder: string): string[];
  drop(n: number): string;
}

let dropped = 0;

function rig(tt: Tap, relay: string, engineOptions: MailOptions = {}): Rig {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-torture-hostile-"));
  const maildir = path.join(dir, "maildir");
  fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
  fs.mkdirSync(path.join(dir, "staging"));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay, log: (l) => lines.push(l), helo: "client.test", fsync: false, ...FAST, ...engineOptions });
  const errors: MailError[] = [];
  engine.on("error", (e: MailError) => errors.push(e));
  tt.teardown(async () => {
    await bounded(engine.stop(), 5000, "engine.stop()").catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const second = Math.floor(Date.now() / 1000);
  return {
    dir, maildir, engine, lines, errors,
    files: (folder) => {
      try {
        return fs.readdirSync(path.join(maildir, folder)).filter((n) => !n.startsWith("."));
      } catch {
        return [];
      }
    },
    drop(n) {
      const id = `${second}.${dropped++}`;
      const staged = path.join(dir, "staging", id);
      fs.writeFileSync(staged, `<>\nuser${n}@test.example\n${testMessage(n)}`);
      fs.renameSync(staged, path.join(maildir, "outgoing", id));
      return id;
    },
  };
}

const outcomes: string[] = [];

t.test(`hostile servers: ${CASES.length} misbehaviours`, async (t) => {
  t.ok(CASES.length >= 25, `at least 25 cases (${CASES.length})`);
  const { escaped } = watchProcess(t);

  // Warm up once against a healthy server, so the first case's RSS is not the engine's first load.
  {
    const server = await startScriptedServer({});
    const r = rig(t, `127.0.0.1:${server.port}`);
    r.drop(0);
    await bounded(r.engine.flush(), 10_000, "warm-up flush");
    await r.engine.stop();
    await server.close();
  }

  for (const [i, c] of CASES.entries()) {
    await t.test(`${i + 1}. ${c.name}`, async (t) => {
      const escapedBefore = escaped.length;
      const healthy = await startScriptedServer({});
      t.teardown(() => healthy.close());
      let scripted: ScriptedServer | null = null;
      let endless: Endless | null = null;
      if (c.script === "endless") {
        endless = await endlessLineServer(100 * 2 ** 20);
        t.teardown(() => endless!.close());
      } else {
        scripted = await startScriptedServer(c.script);
        t.teardown(() => scripted!.close());
      }
      const port = scripted ? scripted.port : endless!.port;
      const r = rig(t, `127.0.0.1:${port}`, c.engine);
      const ids = [r.drop(1), r.drop(2)];

      const before = process.memoryUsage.rss();
      let peak = before;
      const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 5);
      const started = Date.now();
      let summary: FlushSummary;
      try {
        summary = await bounded(r.engine.flush(), (c.within + 10) * 1000, "flush against the hostile server");
      } finally {
        clearInterval(sampler);
      }
      const seconds = (Date.now() - started) / 1000;
      peak = Math.max(peak, process.memoryUsage.rss());
      const growth = (peak - before) / 2 ** 20;

      t.ok(seconds <= c.within, `the flush ended in ${seconds.toFixed(2)} s (within ${c.within} s)`);
      t.match(summary, { ...c.expect, corrupt: 0 }, `outcome ${JSON.stringify(c.expect)}`);
      t.equal(r.files("deferred").length, c.expect.deferred, `${c.expect.deferred} in deferred/`);
      t.same(r.files("outgoing"), [], "outgoing/ empty");
      t.same(r.files("outgoing_active"), [], "outgoing_active/ empty");
      const matched = r.lines.find((l) => c.log.test(l));
      t.ok(matched, `a log line says what happened: ${c.log}${matched ? "" : `\n${r.lines.join("\n")}`}`);
      t.ok(growth < RSS_LIMIT_MB, `RSS grew ${growth.toFixed(1)} MB while it ran (< ${RSS_LIMIT_MB} MB)`);
      t.same(r.errors.map((e) => `${e.code}: ${e.message}`), [], "no error event");
      t.same(escaped.slice(escapedBefore).map(String), [], "no exception escaped");
      for (const id of ids) {
        const line = r.lines.filter((l) => l.includes(`${id}: to=<`)).pop();
        t.ok(line, `${id} has an outcome line`);
      }
      if (endless) t.ok(endless.written.every((n) => n < 100 * 2 ** 20), `the engine hung up long before the 100 MB were sent (${endless.written.map((n) => `${(n / 2 ** 20).toFixed(1)} MB`).join(", ")} written)`);

      // The server is fixed: the same engine delivers what was deferred and a new message.
      if (scripted) scripted.script = {};
      else endless!.fixTo(healthy.port);
      const target = scripted ?? healthy;
      const stored = target.messages.length;
      r.drop(3);
      const again = await bounded(r.engine.flush({ force: true }), 10_000, "flush after the server was fixed");
      t.match(again, { sent: c.expect.deferred + 1, deferred: 0, bounced: 0 }, "the fixed server gets everything deferred and the new message");
      t.same([...r.files("outgoing"), ...r.files("outgoing_active"), ...r.files("deferred")], [], "nothing left in the queue");
      t.equal(target.messages.length - stored, c.expect.deferred + 1, "the server stored them");
      const numbers = target.messages.slice(stored).map((m) => testNumber(m.data)).sort();
      t.ok(numbers.includes(3), `the new message among them (${numbers.join(", ")})`);
      t.same(escaped.slice(escapedBefore).map(String), [], "still no exception escaped");
      t.same(r.errors.map((e) => e.code), [], "still no error event");

      const why = (matched ?? "").replace(/^.*?status=/, "").replace(/^.*?mudmail\/\w+\[\d+\]: /, "");
      outcomes.push(`${String(i + 1).padStart(2)}. ${c.name}: ${JSON.stringify({ sent: summary.sent, deferred: summary.deferred, bounced: summary.bounced })} ` +
        `in ${seconds.toFixed(2)} s, RSS +${growth.toFixed(1)} MB; ${why.slice(0, 160)}`);
      const warning = r.lines.find((l) => /warning:/.test(l));
      if (warning) outcomes.push(`    ${warning.replace(/^.*?mudmail\/\w+\[\d+\]: /, "")}`);
    });
  }
  t.comment(`outcomes:\n${outcomes.join("\n")}`);
});

t.test("a TLS handshake that stalls under tls may counts as a failed handshake: the next pass goes in plaintext", async (t) => {
  // The engine's rule for --tls may (commit b81c7a9): a failed handshake defers, and the next
  // pass to that host goes in plaintext once. A handshake that never finishes has failed too;
  // otherwise a server that stalls after STARTTLS holds the mail until it expires.
  const server = await startScriptedServer(stalledTls());
  t.teardown(() => server.close());
  const r = rig(t, `127.0.0.1:${server.port}`, { tls: "may" });
  r.drop(4);
  const first = await bounded(r.engine.flush(), 10_000, "first flush");
  t.match(first, { sent: 0, deferred: 1 }, "first pass: deferred after the stage timeout");
  const warned = r.lines.some((l) => /warning: TLS handshake with .* failed; the next attempt to it goes in plaintext/.test(l));
  const second = await bounded(r.engine.flush({ force: true }), 10_000, "second flush");
  const plaintext = server.sessions.slice(-1)[0]?.commands.filter((c) => /^(MAIL|STARTTLS)/.test(c)) ?? [];
  t.comment(`warning logged: ${warned}; second pass: ${JSON.stringify(second)}; its last session sent ${JSON.stringify(plaintext)}`);
  t.test("the second pass delivers in plaintext", {
    todo: warned && second.sent === 1 ? false : "engine gap: a STARTTLS handshake that stalls until the EHLO timeout is not counted as a failed handshake " +
      "(tlsFailed() runs only on a TLS error event), so under --tls may every later pass tries TLS again and the mail waits until it expires",
  }, async (tt) => {
    tt.ok(warned, "the stall is logged as a failed handshake");
    tt.match(second, { sent: 1, deferred: 0 }, "delivered in plaintext in the next pass");
  });
});
