// Every stage has its own timer (Postfix's smtp_*_timeout), tested as a table: for each stage a
// scripted server stalls there, only that stage's timeout is short (SHORT_S) and every other
// one long (LONG_S, longer than the test waits), so the session must end after about SHORT_S
// with the stage named in the reason. A stage that used another stage's timeout (two rows of
// mail.ts's STAGES table swapped) waits LONG_S and fails the bound, or names the wrong stage.

import t, { type Test } from "tap";
import { MailEngine, type MailOptions } from "../../mail.js";
import { startScriptedServer, type Script } from "../helpers/scripted-server.js";
import { startDnsServer } from "../helpers/dns-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

const MESSAGE = "From: a@talker.test\nSubject: s\nDate: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <t@talker.test>\n\nbody\n";
/** A body that cannot fit in the socket buffers of a server that stopped reading (~30 MB). */
const BIG = MESSAGE + "x".repeat(998).concat("\n").repeat(30_000);

type Timeout = "connectTimeout" | "heloTimeout" | "mailTimeout" | "rcptTimeout" | "dataInitTimeout" | "dataXferTimeout" | "dataDoneTimeout" | "quitTimeout";
const TIMEOUTS: Timeout[] = ["connectTimeout", "heloTimeout", "mailTimeout", "rcptTimeout", "dataInitTimeout", "dataXferTimeout", "dataDoneTimeout", "quitTimeout"];
const SHORT_S = 1;
const LONG_S = 30;
/** A flush that took longer than this waited for some long timeout: a wrong stage's timer. */
const BOUND_S = 5;

/** Every stage timeout LONG_S but `short`, which is SHORT_S. */
function only(short: Timeout): MailOptions {
  return Object.fromEntries(TIMEOUTS.map((k) => [k, k === short ? SHORT_S : LONG_S])) as MailOptions;
}

async function attempt(t: Test, relay: string, message: string, options: MailOptions) {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const id = `${Math.floor(Date.now() / 1000)}.1`;
  await dropQueueFile(maildir, id, queueFile("<>", ["bob@x.test"], message));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay, log: (l) => lines.push(l), fsync: false, ...options });
  t.teardown(() => engine.stop());
  const started = Date.now();
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the flush did not end within ${BOUND_S + 5} s`)), (BOUND_S + 5) * 1000);
  });
  const summary = await Promise.race([engine.flush(), late]).finally(() => clearTimeout(timer));
  return { summary, seconds: (Date.now() - started) / 1000, lines, maildir, id };
}

interface Row {
  stage: string;
  timeout: Timeout;
  script: Script;
  /** The reason logged for the deferral: names the stage (mail.ts's STAGES labels). */
  reason: RegExp;
  message?: string;
  engine?: MailOptions;
}

const ROWS: Row[] = [
  // Implicit TLS: the handshake is part of connecting, and a server that never answers stalls it.
  { stage: "connect", timeout: "connectTimeout", script: { greeting: null }, engine: { tlsWrapper: true },
    reason: /connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: Connection timed out/ },
  { stage: "greeting", timeout: "heloTimeout", script: { greeting: { action: "silence" } },
    reason: /timed out while receiving the initial server greeting/ },
  { stage: "EHLO", timeout: "heloTimeout", script: { ehlo: { action: "silence" } },
    reason: /timed out while performing the EHLO handshake/ },
  { stage: "MAIL", timeout: "mailTimeout", script: { mail: () => ({ action: "silence" }) },
    reason: /timed out while sending MAIL FROM/ },
  { stage: "RCPT", timeout: "rcptTimeout", script: { rcpt: () => ({ action: "silence" }) },
    reason: /timed out while sending RCPT TO/ },
  { stage: "DATA", timeout: "dataInitTimeout", script: { onCommand: (c) => (c === "DATA" ? { action: "silence" } : undefined) },
    reason: /timed out while sending DATA command/ },
  // Answers 354, then reads nothing: the body fills the socket buffers and the engine waits for drain.
  { stage: "the body", timeout: "dataXferTimeout", message: BIG,
    script: { size: null, onCommand: (c) => (c === "DATA" ? { action: "stop-reading", reply: "354 go on" } : undefined) },
    reason: /timed out while sending message body/ },
  { stage: "end of data", timeout: "dataDoneTimeout", script: { onData: () => ({ action: "silence" }) },
    reason: /timed out while sending end of data -- message may be sent more than once/ },
];

for (const row of ROWS) {
  t.test(`a server silent at ${row.stage}: deferred after the ${row.timeout} alone`, async (t) => {
    const server = await startScriptedServer({ pipelining: false, ...row.script });
    t.teardown(() => server.close());
    const r = await attempt(t, `127.0.0.1:${server.port}`, row.message ?? MESSAGE, { ...only(row.timeout), ...row.engine });
    t.match(r.summary, { deferred: 1, sent: 0 });
    t.match(r.lines.join("\n"), row.reason, `the reason names ${row.stage}`);
    t.ok(r.seconds >= SHORT_S * 0.9, `not before the ${row.timeout} (${r.seconds} s)`);
    t.ok(r.seconds < BOUND_S, `after about the ${row.timeout} of ${SHORT_S} s, not a ${LONG_S} s one (${r.seconds} s)`);
    t.same(await listFolder(r.maildir, "deferred"), [r.id]);
  });
}

t.test("a server silent after QUIT: with --no-skip-quit-response the wait is the quit timeout alone", async (t) => {
  const server = await startScriptedServer({ onCommand: (c) => (c === "QUIT" ? { action: "silence" } : undefined) });
  t.teardown(() => server.close());
  const r = await attempt(t, `127.0.0.1:${server.port}`, MESSAGE, { ...only("quitTimeout"), skipQuitResponse: false });
  t.match(r.summary, { sent: 1, deferred: 0 });
  t.ok(r.seconds >= SHORT_S * 0.9, `waited for the reply to QUIT (${r.seconds} s)`);
  t.ok(r.seconds < BOUND_S, `for about the quitTimeout of ${SHORT_S} s, not a ${LONG_S} s one (${r.seconds} s)`);
  t.notMatch(r.lines.join("\n"), /status=deferred/, "a missing 221 changes no outcome");
});

t.test("--no-skip-quit-response waits for 221 up to --quit-timeout; the default does not wait", async (t) => {
  const server = await startScriptedServer({ onCommand: (c) => (c === "QUIT" ? { action: "silence" } : undefined) });
  t.teardown(() => server.close());
  const waiting = await attempt(t, `127.0.0.1:${server.port}`, MESSAGE, { ...only("quitTimeout"), skipQuitResponse: false, quitTimeout: 2 });
  t.match(waiting.summary, { sent: 1 });
  t.ok(waiting.seconds >= 1.8 && waiting.seconds < 4, `waited for the reply to QUIT (${waiting.seconds} s)`);
  t.notMatch(waiting.lines.join("\n"), /status=deferred/, "a missing 221 changes no outcome");
  const quick = await attempt(t, `127.0.0.1:${server.port}`, MESSAGE, { ...only("quitTimeout"), quitTimeout: 2 });
  t.match(quick.summary, { sent: 1 });
  t.ok(quick.seconds < 1, `did not wait (${quick.seconds} s)`);
});

t.test("a DNS server that never answers defers (it may answer later)", async (t) => {
  const dns = await startDnsServer({ "slow.test": { rcode: "TIMEOUT" } });
  t.teardown(() => dns.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  await dropQueueFile(maildir, `${Math.floor(Date.now() / 1000)}.1`, queueFile("<>", ["bob@slow.test"], MESSAGE));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, resolver: dns.address, dnsTimeout: 0.3, log: (l) => lines.push(l), fsync: false });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { deferred: 1 });
  t.match(lines.join("\n"), /dsn=4\.4\.3, status=deferred \(Host or domain name not found\. Name service error for name=slow\.test type=MX: Host not found, try again/);
});
