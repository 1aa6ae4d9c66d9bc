// Fuzzed queue files: 2,000 seeded files (random bytes, truncated files, 200 KB headers, lines
// over 998 octets, no blank line, odd address forms, control bytes, long recipient lists)
// flushed by an engine in this process to the scripted server. Each one is either delivered
// intact (the server's un-stuffed data is the file's message lines with CRLF line ends behind
// the headers the engine adds) or in corrupt/ with its reason in the log; no "error" event but
// ECORRUPT, no exception escapes. Then single checks for what the fuzz turned up: lines over
// 998 octets, 8-bit and UTF-8 envelope addresses, header field names longer than 79 octets.
//
// TORTURE_SEED=<n> (or "random") changes the seed; the seed used is printed as a comment.

import t from "tap";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { MailEngine, type MailError, type Outcome } from "../../mail.js";
import { rfc5322Date } from "../../compose.js";
import { startScriptedServer, type Message, type Script } from "../helpers/scripted-server.js";
import { Prng, torturePrng, watchProcess } from "../helpers/prng.js";
import { bounded } from "../helpers/daemon.js";

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const base = torturePrng(7_2026_1123);
t.comment(`seed ${base.seed} (TORTURE_SEED=${base.seed} repeats this run)`);

/* ==================================================================================== */
/* Fuzzed queue files                                                                    */

const FILES = 2000;
const HELO = "client.test";
const RECIPIENT_LIMIT = 50;

type Expectation = "deliver" | "corrupt" | "either" | "deliver-or-bounce";

interface FuzzCase {
  id: string;
  kind: string;
  file: Buffer;
  expect: Expectation;
  /** Envelope recipients as the server should record them (unique, brackets off), when known. */
  recipients?: string[];
}

const VALID_SENDERS = [
  "talker@test.example", "<talker@test.example>", "<>", "", '"quoted sender"@test.example', "s@[127.0.0.1]",
  "s\u00e9nder@test.example", "  spaced@test.example  ", "first.last+tag@sub.test.example", "x@y",
];
const INVALID_SENDERS = [
  "no-at-sign", "a b@test.example", "a..b@test.example", "@test.example", "a@", "<a@test.example", "a@test.example>",
  '"unbalanced@test.example', "a@[1.2.3]", "a@-x.example", "a@x..example", `${"l".repeat(320)}@test.example`,
];

function validRecipient(r: Prng, n: number): { raw: string; address: string } {
  const k = r.int(12);
  const address = [
    () => `user${n}.${k}@test.example`,
    () => `"john doe ${n}"@test.example`,
    () => `"a,b ${n}"@test.example`,
    () => `"esc\\"q${n}"@test.example`,
    () => `u${n}@[127.0.0.1]`,
    () => `u${n}@[IPv6:2001:db8::${(n % 65535).toString(16)}]`,
    () => `j\u00f6rg${n}@b\u00fccher.example`,
    () => `first.last+tag!#$%&'*/=?^_\`{|}~-${n}@sub-domain.x.org`,
    () => `u${n}@y`,
    () => `${"l".repeat(60)}${n}@${"d".repeat(60)}.example`,
    () => `UPPER${n}@Test.Example`,
    () => `u${n}@xn--bcher-kva.example`,
  ][r.int(12)]();
  const raw = r.chance(0.3) ? `<${address}>` : address;
  return { raw, address };
}

function invalidRecipient(r: Prng, n: number): string {
  return r.pick([
    "<>", `nobody${n}`, `a${n} b@test.example`, `a${n}..b@test.example`, `@test.example`, `a${n}@`, `a${n}@x..org`,
    `a${n}@[1.2.3]`, `<a${n}@test.example`, `a${n}@test.example>`, `"un${n}@test.example`, `a${n}@-x.org`, `a${n}>b@x.org`,
    `${"l".repeat(100)}${n}@${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(60)}.${"g".repeat(60)}.org`, `a${n}@x_y.org`,
  ]);
}

/** A control byte that is neither LF nor CR (those change the file's lines, not an address). */
function controlByte(r: Prng): string {
  return String.fromCharCode(r.pick([0x00, 0x01, 0x07, 0x08, 0x0b, 0x0c, 0x0e, 0x1b, 0x1f, 0x7f]));
}

const EOLS = ["\n", "\n", "\n", "\r\n", "\r\n", "\r"];

/** Body lines that break naive senders: dots, 8-bit, NUL, long runs, stray CRs. */
function bodyLines(r: Prng, n: number, count: number, maxLine = 200): string[] {
  const lines: string[] = [`fuzz body of case ${n}`];
  for (let i = 0; i < count; i++) {
    lines.push(r.weighted([
      [30, () => `line ${i} ${"x".repeat(r.int(maxLine))}`],
      [8, () => "."],
      [8, () => `.${"dot".repeat(r.int(5))}`],
      [5, () => ".."],
      [8, () => ""],
      [6, () => "caf\u00e9 na\u00efve \u2603"],
      [5, () => Buffer.from([0xc0 + r.int(64), 0x80 + r.int(64), 0xff, 0xfe]).toString("latin1")],
      [3, () => "nul\u0000byte"],
      [4, () => "tab\there and trailing space "],
      [3, () => "From the start of a line"],
      [3, () => "\r"],
      [3, () => ". \r\n. "],
    ] as const)());
  }
  return lines;
}

/** Joins lines with random line ends; the last line ends with one or, sometimes, none. */
function joinLines(r: Prng, lines: string[]): string {
  let out = "";
  lines.forEach((line, i) => {
    out += line;
    if (i < lines.length - 1 || r.chance(0.85)) out += r.pick(EOLS);
  });
  return out;
}

function headerBlock(r: Prng, n: number, extra: string[] = []): string[] {
  const headers = [`X-Fuzz-Case: ${n}`];
  if (r.chance(0.6)) headers.push(`From: Fuzz <talker@test.example>`);
  if (r.chance(0.6)) headers.push(`Date: Mon, 23 Nov 2026 12:00:00 +0000`);
  if (r.chance(0.6)) headers.push(`Message-ID: <fuzz.${n}@test.example>`);
  if (r.chance(0.5)) headers.push(`Subject: fuzz ${n} ${r.chance(0.3) ? "caf\u00e9" : ""}`);
  if (r.chance(0.2)) headers.push("Received: from a.example\n\tby b.example; Mon, 23 Nov 2026 12:00:00 +0000");
  return [...headers, ...extra];
}

/** Envelope + message lines; the envelope lines always end in LF (or CRLF), never a bare CR. */
function queueFileOf(r: Prng, sender: string, recipients: string[], message: string): Buffer {
  const eol = r.chance(0.85) ? "\n" : "\r\n";
  const sep = r.pick([", ", ",", " ", " , ", "\t", ",, "]);
  return Buffer.from(`${sender}${eol}${recipients.join(sep)}${eol}${message}`, "latin1");
}

/** The UTF-8 octets of a text as a latin1 string: every string written into a file here is such an octet string. */
function utf8(text: string): string {
  return Buffer.from(text, "utf8").toString("latin1");
}

function makeCase(r: Prng, n: number, id: string): FuzzCase {
  const kind = r.weighted([
    [450, "valid"], [200, "random-bytes"], [250, "truncated"], [12, "huge-headers"], [90, "long-lines"],
    [140, "no-blank-line"], [260, "odd-addresses"], [230, "bad-addresses"], [60, "control-bytes"],
    [18, "long-recipient-list"], [110, "odd-content"], [40, "envelope-forms"],
  ] as const);
  const validEnvelope = () => {
    const count = r.weighted([[80, 1], [15, r.range(2, 5)], [5, r.range(6, 30)]]);
    const list = Array.from({ length: count }, (_, k) => validRecipient(r, n * 1000 + k));
    return { sender: utf8(r.pick(VALID_SENDERS)), raw: list.map((x) => utf8(x.raw)), recipients: [...new Set(list.map((x) => x.address))] };
  };
  const normalMessage = () => utf8(joinLines(r, [...headerBlock(r, n), "", ...bodyLines(r, n, r.range(0, 30))]));
  switch (kind) {
    case "valid": {
      const env = validEnvelope();
      return { id, kind, expect: "deliver", recipients: env.recipients, file: queueFileOf(r, env.sender, env.raw, normalMessage()) };
    }
    case "random-bytes": {
      const length = r.weighted([[70, r.int(300)], [25, r.range(300, 5000)], [5, r.range(5000, 100_000)]]);
      let bytes = r.bytes(length);
      // Half of them start like a queue file, so the fuzz gets past the envelope now and then.
      if (r.chance(0.5)) bytes = Buffer.concat([Buffer.from(`talker@test.example\nuser${n}@test.example\n`), bytes]);
      return { id, kind, expect: "either", file: bytes };
    }
    case "truncated": {
      const env = validEnvelope();
      const file = queueFileOf(r, env.sender, env.raw, normalMessage());
      return { id, kind, expect: "either", file: file.subarray(0, r.int(file.length + 1)) };
    }
    case "huge-headers": {
      // 200 KB of header lines, each of them within 998 octets, some folded.
      const extra: string[] = [];
      let size = 0;
      for (let k = 0; size < 200 * 1024; k++) {
        const line = r.chance(0.2)
          ? `X-Folded-${k}: ${"a".repeat(r.int(500))}\n\t${"b".repeat(r.int(400))}`
          : `X-Header-${k}: ${"v".repeat(r.int(900))}`;
        extra.push(line);
        size += line.length + 1;
      }
      const env = validEnvelope();
      const message = joinLines(r, [...headerBlock(r, n, extra), "", ...bodyLines(r, n, 5)]);
      return { id, kind, expect: "deliver", recipients: env.recipients, file: queueFileOf(r, env.sender, env.raw, utf8(message)) };
    }
    case "long-lines": {
      // A header or body line over 998 octets: RFC 5322 forbids it; see the single check below.
      const long = "L".repeat(r.range(999, r.chance(0.2) ? 200_000 : 5000));
      const headers = headerBlock(r, n, r.chance(0.4) ? [`X-Long: ${long}`] : []);
      const body = bodyLines(r, n, r.range(0, 10));
      body.splice(r.range(1, body.length), 0, long);
      const env = validEnvelope();
      return { id, kind, expect: "deliver-or-bounce", recipients: env.recipients, file: queueFileOf(r, env.sender, env.raw, utf8(joinLines(r, [...headers, "", ...body]))) };
    }
    case "no-blank-line": {
      // Headers and then straight into the body (or nothing but headers).
      const lines = [...headerBlock(r, n), ...(r.chance(0.7) ? bodyLines(r, n, r.range(0, 10)) : [])];
      const env = validEnvelope();
      return { id, kind, expect: "deliver", recipients: env.recipients, file: queueFileOf(r, env.sender, env.raw, utf8(joinLines(r, lines))) };
    }
    case "odd-addresses": {
      // Several recipients in the odd forms, and an odd sender.
      const list = Array.from({ length: r.range(1, 6) }, (_, k) => validRecipient(r, n * 1000 + 100 + k));
      const sender = utf8(r.pick(VALID_SENDERS.slice(2)));
      return {
        id, kind, expect: "deliver", recipients: [...new Set(list.map((x) => x.address))],
        file: queueFileOf(r, sender, list.map((x) => utf8(x.raw)), normalMessage()),
      };
    }
    case "bad-addresses": {
      const env = validEnvelope();
      if (r.chance(0.3)) return { id, kind, expect: "corrupt", file: queueFileOf(r, r.pick(INVALID_SENDERS), env.raw, normalMessage()) };
      const raw = [...env.raw];
      raw.splice(r.int(raw.length + 1), 0, invalidRecipient(r, n));
      return { id, kind, expect: "corrupt", file: queueFileOf(r, env.sender, raw, normalMessage()) };
    }
    case "control-bytes": {
      const env = validEnvelope();
      const inSender = r.chance(0.3) && env.sender.length > 2;
      if (inSender) {
        // Inside the address (trim() would take one at either end away: that one is fine).
        const s = env.sender.replace(/^[<\s]+|[>\s]+$/g, "");
        const at = r.range(1, Math.max(1, s.length - 1));
        return { id, kind, expect: "corrupt", file: queueFileOf(r, s.slice(0, at) + controlByte(r) + s.slice(at), env.raw, normalMessage()) };
      }
      const raw = [...env.raw];
      const k = r.int(raw.length);
      const a = raw[k].replace(/^<|>$/g, "");
      const at = r.range(1, Math.max(1, a.length - 1));
      raw[k] = a.slice(0, at) + controlByte(r) + a.slice(at);
      return { id, kind, expect: "corrupt", file: queueFileOf(r, env.sender, raw, normalMessage()) };
    }
    case "long-recipient-list": {
      const count = r.range(100, 1200);
      const list = Array.from({ length: count }, (_, k) => validRecipient(r, n * 10_000 + k));
      // A few repeated: the engine sends each address once.
      const raw = list.map((x) => utf8(x.raw));
      for (let k = 0; k < 5; k++) raw.push(utf8(r.pick(list).address));
      return { id, kind, expect: "deliver", recipients: [...new Set(list.map((x) => x.address))], file: queueFileOf(r, "talker@test.example", raw, normalMessage()) };
    }
    case "odd-content": {
      const env = validEnvelope();
      const content = r.weighted([
        [10, () => ""],
        [8, () => "\n"],
        [8, () => "\r\n\r\n"],
        [10, () => utf8(joinLines(r, bodyLines(r, n, r.range(0, 10))))],
        [10, () => utf8(joinLines(r, [` starts with a space ${n}`, ...headerBlock(r, n), "", "body"]))],
        [10, () => utf8(joinLines(r, [`From talker@test.example Mon Nov 23 12:00:00 2026`, ...headerBlock(r, n), "", "body"]))],
        [10, () => utf8(joinLines(r, [...headerBlock(r, n), "", `.\r\n.\r\nQUIT\r\nMAIL FROM:<x@y> case ${n}`, ".", ""]))],
        [8, () => `X-Fuzz-Case: ${n}\rDate: Mon, 23 Nov 2026 12:00:00 +0000\rbare CR line ends\r.\r..\r`],
        [8, () => utf8(joinLines(r, [`X-8bit-${n}: ${Buffer.from([0xe9, 0xff, 0x80]).toString("latin1")}`, "", "8-bit header"]))],
        [8, () => utf8(joinLines(r, [...headerBlock(r, n), "", ...bodyLines(r, n, 3)])).replace(/\n$/, "")],
        [5, () => `${"\n".repeat(r.range(1, 50))}case ${n}`],
        [5, () => `X-Fuzz-Case: ${n}\n\n${".\n".repeat(r.range(1, 200))}`],
      ] as const)();
      return { id, kind, expect: "deliver", recipients: env.recipients, file: queueFileOf(r, env.sender, env.raw, content) };
    }
    case "envelope-forms": {
      // Separators, brackets, spaces around, duplicates, CRLF: all allowed forms of the two lines.
      const env = validEnvelope();
      const raw = [...env.raw, ...env.raw.slice(0, 2)];
      const eol = r.pick(["\n", "\r\n"]);
      const line2 = raw.join(r.pick([",", ", ", " ,", "\t", " \t, "])) + r.pick(["", " ", ",", " ,\t"]);
      const sender = r.pick([` ${env.sender} `, env.sender, `\t${env.sender}`]);
      return { id, kind, expect: "deliver", recipients: env.recipients, file: Buffer.from(`${sender}${eol}${line2}${eol}${normalMessage()}`, "latin1") };
    }
  }
}

/* The reference: what the server must store for a file, written from SPEC section 2, not from queue.ts. */

/** RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: 998 octets a line, without the CRLF. */
const MAX_LINE = 998;

function longestLine(data: string): number {
  let most = 0;
  for (const line of data.split("\r\n")) most = Math.max(most, line.length);
  return most;
}

/** The data with every CRLF SP taken out: a fold inserted by the sender (Postfix's smtp_line_length_limit) disappears. */
function withoutFolds(data: string): string {
  return data.replace(/\r\n /g, "");
}

/**
 * A stored copy is the expected data: as written, or, when a line was over 998 octets, with
 * lines broken by CRLF SP so that none is longer (nothing lost, nothing else changed).
 */
function sameOrSafelyFolded(stored: string, expected: string): "same" | "folded" | null {
  if (stored === expected) return "same";
  if (longestLine(expected) <= MAX_LINE || longestLine(stored) > MAX_LINE) return null;
  const folds = (stored.match(/\r\n /g) ?? []).length - (expected.match(/\r\n /g) ?? []).length;
  return folds > 0 && withoutFolds(stored) === withoutFolds(expected) && stored.length === expected.length + 3 * folds ? "folded" : null;
}

/** The message lines: everything after the second LF (none when there is no second LF). */
function contentOf(file: Buffer): Buffer {
  const first = file.indexOf(0x0a);
  const second = first < 0 ? -1 : file.indexOf(0x0a, first + 1);
  return second < 0 ? Buffer.alloc(0) : file.subarray(second + 1);
}

function senderOf(file: Buffer): string {
  const first = file.indexOf(0x0a);
  const text = file.toString("utf8", 0, first).replace(/\r$/, "").trim();
  if (text === "" || text === "<>") return "";
  return text.startsWith("<") && text.endsWith(">") ? text.slice(1, -1) : text;
}

/** Every CRLF, bare CR and bare LF as CRLF, and a CRLF after a last line that had none. */
function normalised(content: Buffer): string {
  const text = content.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
  return text === "" || text.endsWith("\r\n") ? text : `${text}\r\n`;
}

const FIELD = /^[\x21-\x39\x3b-\x7e]+:/;

/** The header block's facts, on whole lines (RFC 5322 2.2: a field name is any printable but colon). */
function facts(norm: string): { date: boolean; id: boolean; from: boolean; startsWithHeader: boolean } {
  const f = { date: false, id: false, from: false, startsWithHeader: false };
  const lines = norm.split("\r\n");
  if (norm.endsWith("\r\n")) lines.pop();
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line === "") break;
    if (i > 0 && (line[0] === " " || line[0] === "\t")) continue;
    if (!FIELD.test(line)) break;
    if (i === 0) f.startsWithHeader = true;
    const name = line.slice(0, line.indexOf(":")).toLowerCase();
    if (name === "date") f.date = true;
    if (name === "message-id") f.id = true;
    if (name === "from") f.from = true;
  }
  return f;
}

function compactUtc(d: Date): string {
  const p = (x: number) => String(x).padStart(2, "0");
  return `${d.getUTCFullYear()}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}`;
}

/** SPEC section 2: Date, Message-ID and From when missing, and a blank line when the content starts with no header. */
function expectedData(file: Buffer, id: string): Buffer {
  const norm = normalised(contentOf(file));
  const f = facts(norm);
  const arrival = new Date(Number(id.split(".")[0]) * 1000);
  const sender = senderOf(file);
  let prefix = "";
  if (!f.date) prefix += `Date: ${rfc5322Date(arrival)}\r\n`;
  if (!f.id) prefix += `Message-ID: <${compactUtc(arrival)}.${id}@${HELO}>\r\n`;
  if (!f.from) prefix += `From: ${sender === "" ? `MAILER-DAEMON@${HELO}` : sender}\r\n`;
  if (!f.startsWithHeader) prefix += "\r\n";
  return Buffer.concat([Buffer.from(prefix, "utf8"), Buffer.from(norm, "latin1")]);
}

interface Flushed {
  maildir: string;
  lines: string[];
  messages: Message[];
  errors: MailError[];
  escaped: unknown[];
  sent: Outcome[];
  deferred: Outcome[];
  bounced: Outcome[];
  summary: Awaited<ReturnType<MailEngine["flush"]>>;
  server: Awaited<ReturnType<typeof startScriptedServer>>;
}

/** Drops the files, flushes them with an engine in this process, returns what happened. */
async function flushFiles(tt: Tap, files: Array<{ id: string; file: Buffer }>, script: Script = {}, ms = 120_000): Promise<Flushed> {
  const { escaped } = watchProcess(tt);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-torture-fuzz-"));
  tt.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const maildir = path.join(dir, "maildir");
  fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
  fs.mkdirSync(path.join(dir, "staging"));
  for (const { id, file } of files) {
    fs.writeFileSync(path.join(dir, "staging", id), file);
    fs.renameSync(path.join(dir, "staging", id), path.join(maildir, "outgoing", id));
  }
  const server = await startScriptedServer(script);
  tt.teardown(() => server.close());
  const lines: string[] = [];
  const engine = new MailEngine({
    maildir, relay: `127.0.0.1:${server.port}`, log: (l) => lines.push(l), helo: HELO, fsync: false,
    recipientLimit: RECIPIENT_LIMIT, connectTimeout: 5, heloTimeout: 5, mailTimeout: 5, rcptTimeout: 5,
    dataInitTimeout: 5, dataXferTimeout: 5, dataDoneTimeout: 5, quitTimeout: 5,
  });
  const errors: MailError[] = [];
  const sent: Outcome[] = [];
  const deferred: Outcome[] = [];
  const bounced: Outcome[] = [];
  engine.on("error", (e: MailError) => errors.push(e));
  engine.on("sent", (o: Outcome) => sent.push(o));
  engine.on("deferred", (o: Outcome) => deferred.push(o));
  engine.on("bounced", (o: Outcome) => bounced.push(o));
  tt.teardown(() => bounded(engine.stop(), 10_000, "engine.stop()").catch(() => undefined));
  const summary = await bounded(engine.flush(), ms, "engine.flush()");
  await bounded(engine.stop(), 10_000, "engine.stop()");
  return { maildir, lines, messages: server.messages, errors, escaped, sent, deferred, bounced, summary, server };
}

function folder(maildir: string, name: string): string[] {
  try {
    return fs.readdirSync(path.join(maildir, name)).filter((n) => !n.startsWith("."));
  } catch {
    return [];
  }
}

t.test(`fuzzed queue files: ${FILES} files, each delivered intact or moved to corrupt/ with a reason`, async (t) => {
  const r = new Prng(base.seed ^ 0x5eed_0003);
  const second = Math.floor(Date.now() / 1000) - 60;
  const cases = Array.from({ length: FILES }, (_, n) => makeCase(r, n, `${second}.${n}`));
  const byKind = new Map<string, number>();
  for (const c of cases) byKind.set(c.kind, (byKind.get(c.kind) ?? 0) + 1);
  t.comment(`files: ${[...byKind].map(([k, v]) => `${k} ${v}`).join(", ")}; ${(cases.reduce((s, c) => s + c.file.length, 0) / 2 ** 20).toFixed(1)} MB`);

  const started = Date.now();
  // A server that offers SMTPUTF8, as current MTAs do: the UTF-8 addresses among the cases are deliverable.
  const f = await flushFiles(t, cases, { extensions: ["SMTPUTF8"] });
  t.comment(`flush: ${JSON.stringify(f.summary)} in ${((Date.now() - started) / 1000).toFixed(1)} s; ${f.messages.length} messages stored by the server`);

  t.same(f.escaped.map(String), [], "no exception escaped to the process");
  const unexpected = f.errors.filter((e) => e.code !== "ECORRUPT");
  t.same(unexpected.map((e) => `${e.code}: ${e.message}`), [], "no error event but ECORRUPT");
  t.same(folder(f.maildir, "outgoing"), [], "outgoing/ is empty");
  t.same(folder(f.maildir, "outgoing_active"), [], "outgoing_active/ is empty");
  t.same(folder(f.maildir, "deferred"), [], "deferred/ is empty: nothing was deferred");
  t.same(f.deferred.map((o) => `${o.queueId}: ${o.text}`), [], "no deferred outcome");

  // The server's messages by their exact data, and by their data without CRLF SP (folds).
  const stored = new Map<string, Message[]>();
  const unfolded = new Map<string, Message[]>();
  for (const m of f.messages) {
    const key = m.data.toString("latin1");
    stored.set(key, [...(stored.get(key) ?? []), m]);
    const loose = withoutFolds(key);
    unfolded.set(loose, [...(unfolded.get(loose) ?? []), m]);
  }
  const folded = { files: 0 };
  const corrupt = new Set(folder(f.maildir, "corrupt"));
  const sentIds = new Set(f.sent.map((o) => o.queueId));
  const bouncedIds = new Set(f.bounced.map((o) => o.queueId));
  const corruptLines = new Map<string, string>();
  for (const line of f.lines) {
    const m = /mudmail\/qmgr\[\d+\]: (\S+): corrupt queue file moved to corrupt\/(\S+): (.+)$/.exec(line);
    if (m) corruptLines.set(m[1], m[3]);
  }
  const problems: string[] = [];
  const outcomes = { delivered: 0, corrupt: 0, bounced: 0 };
  const copies = { expected: 0 };
  for (const c of cases) {
    const where = `${c.id} (${c.kind}, ${c.file.length} octets${c.file.length < 300 ? `: ${JSON.stringify(c.file.toString("latin1"))}` : ""})`;
    const isCorrupt = corrupt.has(c.id);
    const isSent = sentIds.has(c.id);
    const isBounced = bouncedIds.has(c.id);
    if ([isCorrupt, isSent, isBounced].filter(Boolean).length !== 1) {
      problems.push(`${where}: corrupt ${isCorrupt}, sent ${isSent}, bounced ${isBounced}: expected exactly one`);
      continue;
    }
    if (isCorrupt) {
      outcomes.corrupt++;
      if (c.expect === "deliver" || c.expect === "deliver-or-bounce") problems.push(`${where}: moved to corrupt/ (${corruptLines.get(c.id)}), expected delivery`);
      const reason = corruptLines.get(c.id);
      if (!reason || reason.trim().length < 5) problems.push(`${where}: in corrupt/ without a reason in the log`);
      const kept = fs.readFileSync(path.join(f.maildir, "corrupt", c.id));
      if (!kept.equals(c.file)) problems.push(`${where}: the file in corrupt/ is not the file dropped`);
      continue;
    }
    if (isBounced) {
      outcomes.bounced++;
      if (c.expect !== "deliver-or-bounce") problems.push(`${where}: bounced (${f.bounced.find((o) => o.queueId === c.id)?.text}), expected ${c.expect}`);
      continue;
    }
    outcomes.delivered++;
    if (c.expect === "corrupt") problems.push(`${where}: delivered, expected corrupt/`);
    const data = expectedData(c.file, c.id).toString("latin1");
    let got = stored.get(data) ?? [];
    if (got.length === 0 && longestLine(data) > MAX_LINE) {
      // Lines over 998 octets: broken with CRLF SP is fine, as long as nothing is lost.
      got = (unfolded.get(withoutFolds(data)) ?? []).filter((m) => sameOrSafelyFolded(m.data.toString("latin1"), data) !== null);
      if (got.length > 0) folded.files++;
    }
    if (got.length === 0) {
      const n = c.id.split(".")[1];
      const near = f.messages.find((m) => m.data.toString("latin1").includes(`X-Fuzz-Case: ${n}\r\n`) || m.data.toString("latin1").includes(`case ${n}\r\n`));
      problems.push(`${where}: sent, but the server has no copy with the expected data${near ? `; a copy that differs: ${JSON.stringify(near.data.toString("latin1").slice(0, 400))} vs expected ${JSON.stringify(data.slice(0, 400))}` : ""}`);
      continue;
    }
    if (c.recipients) {
      const transactions = Math.ceil(c.recipients.length / RECIPIENT_LIMIT);
      copies.expected += transactions;
      const to = got.flatMap((m) => m.to);
      const wanted = new Set(c.recipients);
      const missing = c.recipients.filter((x) => !to.includes(x));
      const extra = to.filter((x) => !wanted.has(x));
      if (missing.length || extra.length) problems.push(`${where}: recipients differ: missing ${JSON.stringify(missing.slice(0, 5))}, extra ${JSON.stringify(extra.slice(0, 5))}`);
      if (got.length !== transactions) problems.push(`${where}: ${got.length} copies for ${c.recipients.length} recipients, expected ${transactions}`);
    }
  }
  t.same(problems.slice(0, 30), [], `every file delivered intact or in corrupt/ with a reason (${problems.length} problems)`);
  t.equal(f.summary.corrupt, corrupt.size, "the flush counted every corrupt file");
  t.equal(outcomes.delivered + outcomes.corrupt + outcomes.bounced, FILES, "every file accounted for");
  t.comment(`outcomes: ${outcomes.delivered} delivered intact (${folded.files} of them with lines over 998 octets folded), ${outcomes.corrupt} in corrupt/, ${outcomes.bounced} bounced; ` +
    `${f.messages.length} transactions stored (${copies.expected} for the files with known recipients)`);
  const reasons = new Map<string, number>();
  for (const reason of corruptLines.values()) {
    const key = reason.replace(/"[^"]*"/g, '"..."').replace(/\d+/g, "N").slice(0, 60);
    reasons.set(key, (reasons.get(key) ?? 0) + 1);
  }
  t.comment(`corrupt/ reasons: ${[...reasons].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k, v]) => `${v}x ${k}`).join("; ")}`);
});

/* ==================================================================================== */
/* 3. Single checks                                                                      */

t.test("lines over 998 octets (RFC 5322 2.1.1): folded safely or bounced with a clear reason, never truncated silently", async (t) => {
  const second = Math.floor(Date.now() / 1000) - 30;
  const longBody = "B".repeat(5000);
  const longHeader = `X-Long: ${"H".repeat(1500)}`;
  const longDots = `.${"D".repeat(2500)}`;
  const message = `From: talker@test.example\nDate: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <long@test.example>\n${longHeader}\n\nshort line\n${longBody}\n${longDots}\nlast line\n`;
  const id = `${second}.1`;
  const file = Buffer.from(`talker@test.example\nuser@test.example\n${message}`);
  const f = await flushFiles(t, [{ id, file }]);
  t.same(f.escaped.map(String), [], "no exception escaped");
  const copy = f.messages[0];
  const bounced = f.bounced.find((o) => o.queueId === id);
  if (!copy) {
    t.ok(bounced, "not sent: bounced");
    t.match(bounced?.text ?? "", /998|line.*long|long.*line/i, `with a clear reason: ${bounced?.text}`);
    return;
  }
  const data = copy.data.toString("latin1");
  const expected = expectedData(file, id).toString("latin1");
  const how = sameOrSafelyFolded(data, expected);
  const longest = longestLine(data);
  t.comment(`sent: ${how ?? "changed"}; the longest line the server got has ${longest} octets`);
  t.ok(how !== null, "never truncated silently: the server got every octet, as written or with CRLF SP folds only");
  if (how === "same") {
    t.test("the long lines are folded (or the message bounced)", {
      todo: "engine gap: a queue file's lines over 998 octets go on the wire unchanged (the Stuffer neither folds nor refuses them); " +
        "expected: folded safely (CRLF SP, as Postfix's smtp_line_length_limit) or bounced with a clear reason",
    }, async (tt) => {
      tt.ok(longest <= MAX_LINE, `every line the server got is at most 998 octets (longest: ${longest})`);
    });
  } else {
    t.ok(longest <= MAX_LINE, `folded: every line at most 998 octets (longest ${longest})`);
    t.ok(data.includes(`\r\nshort line\r\n`) && data.endsWith("\r\nlast line\r\n"), "the short lines around them unchanged");
  }
});

t.test("a UTF-8 envelope address: sent with SMTPUTF8 only where it is offered, else bounced (RFC 6531 3.2)", async (t) => {
  const second = Math.floor(Date.now() / 1000) - 30;
  const file = (n: number) => ({ id: `${second}.${n}`, file: Buffer.from(`talker@test.example\nj\u00f6rg@b\u00fccher.example\nSubject: utf8 ${n}\n\nbody\n`, "utf8") });
  await t.test("server without SMTPUTF8", async (t) => {
    const f = await flushFiles(t, [file(1)]);
    const commands = f.server.sessions.flatMap((s) => s.commands).filter((c) => /^(MAIL|RCPT)/.test(c));
    t.comment(`outcome: ${JSON.stringify(f.summary)}; commands: ${JSON.stringify(commands)}`);
    t.test("not sent to a server that did not offer SMTPUTF8", async (tt) => {
      tt.equal(f.messages.filter((m) => m.from !== "").length, 0, "nothing sent (only the bounce report, from <>)");
      tt.match(f.bounced[0]?.dsn ?? "", /^5\.6\.7$/, "bounced 5.6.7");
    });
  });
  await t.test("server with SMTPUTF8", async (t) => {
    const f = await flushFiles(t, [file(2)], { extensions: ["SMTPUTF8"] });
    const mail = f.server.sessions.flatMap((s) => s.commands).find((c) => /^MAIL/.test(c)) ?? "";
    t.equal(f.summary.sent, 1, "delivered");
    t.test("MAIL FROM carries SMTPUTF8", async (tt) => {
      tt.match(mail, / SMTPUTF8\b/, `MAIL command: ${mail}`);
    });
  });
});

t.test("an envelope address with octets that are not UTF-8: corrupt/, never sent to another address", async (t) => {
  const second = Math.floor(Date.now() / 1000) - 30;
  const id = `${second}.1`;
  const f = await flushFiles(t, [{ id, file: Buffer.from("talker@test.example\nm\xfcller@test.example\nSubject: latin-1\n\nbody\n", "latin1") }]);
  const rcpt = f.server.sessions.flatMap((s) => s.commands).find((c) => /^RCPT/.test(c));
  t.comment(`outcome: ${JSON.stringify(f.summary)}; RCPT: ${JSON.stringify(rcpt)}`);
  t.test("the file is corrupt", async (tt) => {
    tt.equal(f.summary.corrupt, 1, "moved to corrupt/");
    tt.equal(f.messages.length, 0, "nothing sent");
  });
});

t.test("a header field name longer than 79 octets is still a header", async (t) => {
  const second = Math.floor(Date.now() / 1000) - 30;
  const name = `X-${"N".repeat(90)}`;
  const headers = "Date: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <n@test.example>\nFrom: talker@test.example\n";
  const files = [
    { id: `${second}.1`, file: Buffer.from(`talker@test.example\nuser@test.example\nSubject: middle\n${name}: v\n${headers}\nbody\n`) },
    { id: `${second}.2`, file: Buffer.from(`talker@test.example\nuser@test.example\n${name}: v\n${headers}\nbody\n`) },
  ];
  const f = await flushFiles(t, files);
  t.equal(f.summary.sent, 2, "both delivered");
  for (const { id, file } of files) {
    const want = expectedData(file, id).toString("latin1");
    const got = f.messages.find((m) => m.data.toString("latin1").includes(`${name}: v`))?.data.toString("latin1");
    const copy = f.messages.map((m) => m.data.toString("latin1")).find((d) => d.endsWith(want)) ?? got;
    t.test(`${id}: delivered as written, no header added`, async (tt) => {
      tt.equal(f.messages.map((m) => m.data.toString("latin1")).includes(want), true, `stored as written; got ${JSON.stringify(copy?.slice(0, 200))}`);
    });
  }
});
