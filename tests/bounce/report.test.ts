// Unit tests of bounce.ts: the DSN queue file, read back with a small MIME parser written
// here (boundary split, part headers, delivery-status field groups) and, when Python is
// there, with Python's email package as an independent parser; then the real queue parser.
import { needFile, requireAll, run } from "../helpers/daemon.js";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import { composeBounce, BounceError, type BounceInput, type BounceRecipient } from "../../bounce.js";
import { HeaderScan, Spool } from "../../queue.js";

/* ------------------------------------------------------------------------------------ */
/* A small MIME parser                                                                   */

type Fields = Array<[string, string]>;

interface Part {
  headers: Fields;
  /** The part's content, latin1 (one char per byte), exactly as between the delimiters. */
  body: string;
}

interface Parsed {
  envelope: [string, string];
  /** The message lines, latin1. */
  message: string;
  headers: Fields;
  boundary: string;
  preamble: string;
  parts: Part[];
  epilogue: string;
}

const unfold = (value: string): string => value.replace(/\r?\n(?=[ \t])/g, "");

/** Header-style fields: "Name: value" lines, continuation lines starting with SP or HT. */
function parseFields(block: string): Fields {
  const fields: Fields = [];
  for (const line of block.split("\n")) {
    if (line === "") continue;
    if (line[0] === " " || line[0] === "\t") {
      if (fields.length === 0) throw new Error(`continuation line first: ${JSON.stringify(line)}`);
      fields[fields.length - 1][1] += `\n${line}`;
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Error(`not a field: ${JSON.stringify(line)}`);
    fields.push([line.slice(0, colon), line.slice(colon + 1)]);
  }
  return fields.map(([name, value]) => [name, unfold(value).replace(/^[ \t]+/, "")]);
}

/** Headers and body of an entity: the headers end at the first empty line. */
function splitEntity(text: string): { headers: Fields; body: string } {
  const end = text.indexOf("\n\n");
  if (end < 0) return { headers: parseFields(text), body: "" };
  return { headers: parseFields(text.slice(0, end + 1)), body: text.slice(end + 2) };
}

function get(fields: Fields, name: string): string | undefined {
  return fields.find(([n]) => n.toLowerCase() === name.toLowerCase())?.[1];
}

function getAll(fields: Fields, name: string): string[] {
  return fields.filter(([n]) => n.toLowerCase() === name.toLowerCase()).map(([, v]) => v);
}

/** A parameter of a Content-Type value, quoted or not. */
function param(value: string, name: string): string | undefined {
  const m = new RegExp(`;\\s*${name}\\s*=\\s*(?:"([^"]*)"|([^;\\s]+))`, "i").exec(value);
  return m ? (m[1] ?? m[2]) : undefined;
}

function parseDsn(file: Buffer): Parsed {
  const text = file.toString("latin1");
  const first = text.indexOf("\n");
  const second = text.indexOf("\n", first + 1);
  const envelope: [string, string] = [text.slice(0, first), Buffer.from(text.slice(first + 1, second), "latin1").toString("utf8")];
  const message = text.slice(second + 1);
  const top = splitEntity(message);
  const boundary = param(get(top.headers, "Content-Type") ?? "", "boundary");
  if (!boundary) throw new Error("no boundary");
  // RFC 2046 5.1.1: a delimiter is a line "--boundary" (or "--boundary--" for the last),
  // and the line end before it belongs to it.
  const lines = top.body.split("\n");
  const chunks: string[][] = [[]];
  let closed = false;
  let epilogue: string[] = [];
  for (const line of lines) {
    if (closed) {
      epilogue.push(line);
    } else if (line.replace(/[ \t]+$/, "") === `--${boundary}`) {
      chunks.push([]);
    } else if (line.replace(/[ \t]+$/, "") === `--${boundary}--`) {
      closed = true;
    } else {
      chunks[chunks.length - 1].push(line);
    }
  }
  if (!closed) throw new Error("no close delimiter");
  const [preamble, ...partLines] = chunks;
  return {
    envelope,
    message,
    headers: top.headers,
    boundary,
    preamble: preamble.join("\n"),
    parts: partLines.map((p) => splitEntity(p.join("\n"))),
    epilogue: epilogue.join("\n"),
  };
}

/** message/delivery-status: groups of fields separated by blank lines. */
function statusGroups(body: string): Fields[] {
  return body.split(/\n(?:[ \t]*\n)+/).filter((g) => g.trim() !== "").map(parseFields);
}

function decodeQP(text: string): Buffer {
  const soft = text.replace(/=\n/g, "");
  const bytes: number[] = [];
  for (let i = 0; i < soft.length; i++) {
    if (soft[i] === "=" && /^[0-9A-F]{2}$/.test(soft.slice(i + 1, i + 3))) {
      bytes.push(parseInt(soft.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      bytes.push(soft.charCodeAt(i));
    }
  }
  return Buffer.from(bytes);
}

/** Part 1's text, decoded, with Postfix's wrapped lines joined again. */
function noticeOf(p: Parsed): string {
  const part = p.parts[0];
  const raw = /quoted-printable/i.test(get(part.headers, "Content-Transfer-Encoding") ?? "") ? decodeQP(part.body).toString("utf8") : part.body;
  return raw.replace(/\n {4}/g, " ");
}

/* ------------------------------------------------------------------------------------ */
/* Fixtures                                                                              */

const NOW = new Date("2025-11-23T16:05:07Z");
const ARRIVAL = new Date("2025-11-23T15:58:01Z");
const LAST = new Date("2025-11-23T16:04:59Z");
const UNTIL = new Date("2025-11-28T15:58:01Z");
const HEADERS = Buffer.from(
  "Return-Path: <alice@example.org>\r\n" +
  "Received: from talker (localhost [127.0.0.1])\r\n\tby talker.example.org; Sun, 23 Nov 2025 15:58:00 +0000\r\n" +
  "From: Alice <alice@example.org>\r\n" +
  "To: bob@example.com\r\n" +
  "Subject: the game tonight\r\n" +
  "Date: Sun, 23 Nov 2025 15:58:00 +0000\r\n" +
  "Message-ID: <1763913480.0@talker.example.org>\r\n" +
  "\r\n");
const BODY = Buffer.from("SECRET-BODY-LINE one\r\n.dot line\r\nlast line without end");

const BOB: BounceRecipient = {
  recipient: "bob@example.com",
  originalRecipient: "bob.smith@example.com",
  action: "failed",
  status: "5.1.1",
  remoteMta: "mx.example.com",
  diagnostic: "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
  reason: "host mx.example.com[192.0.2.10] said: 550 5.1.1 <bob@example.com>: Recipient address rejected: " +
    "User unknown in virtual mailbox table (in reply to RCPT TO command)",
  lastAttempt: LAST,
};
const CAROL: BounceRecipient = {
  recipient: "carol@example.net",
  action: "delayed",
  status: "4.4.1",
  diagnostic: "connect to mx.example.net[192.0.2.20]:25: Connection timed out",
  reason: "connect to mx.example.net[192.0.2.20]:25: Connection timed out",
  lastAttempt: LAST,
  willRetryUntil: UNTIL,
};
const DAVE: BounceRecipient = {
  recipient: "dave@example.com",
  action: "delivered",
  status: "2.0.0",
  remoteMta: "mx.example.com",
  diagnostic: "250 2.0.0 Ok: queued as 4Dn2xq1Zt",
  reason: "delivery via mx.example.com[192.0.2.10]:25: 250 2.0.0 Ok: queued as 4Dn2xq1Zt",
  willRetryUntil: UNTIL, // not "delayed": must not be written
};

function input(over: Partial<BounceInput> = {}): BounceInput {
  return {
    queueId: "1763913481.0",
    sender: "alice@example.org",
    arrival: ARRIVAL,
    reportingMta: "mail.example.org",
    recipients: [BOB],
    originalHeaders: HEADERS,
    now: NOW,
    ...over,
  };
}

const lf = (b: Buffer): string => b.toString("latin1").replace(/\r\n?/g, "\n");

/** The message lines this module wrote: everything before the content of part 3 (latin1). */
function generatedLines(p: Parsed): string[] {
  let at = -1;
  for (let n = 0; n < 3; n++) at = p.message.indexOf(`\n--${p.boundary}\n`, at + 1);
  const contentStart = p.message.indexOf("\n\n", at + 1) + 2;
  return p.message.slice(0, contentStart).split("\n");
}

function checkLines(t: Test, p: Parsed): void {
  const lines = generatedLines(p);
  t.ok(lines.length > 40, "generated lines found");
  t.same(lines.filter((l) => l.length > 998), [], "no generated line over 998 octets");
  t.same(lines.filter((l) => /[^\x00-\x7f]/.test(l)), [], "every generated line is ASCII");
}

/* ------------------------------------------------------------------------------------ */
/* The tests                                                                             */

t.test("one failed recipient: envelope, headers, parts, fields, original headers", async (t) => {
  const file = composeBounce(input());
  const p = parseDsn(file);

  t.same(p.envelope, ["<>", "alice@example.org"], "line 1 is the null sender, line 2 the original sender");
  t.equal(get(p.headers, "From"), "MAILER-DAEMON@mail.example.org (Mail Delivery System)");
  t.equal(get(p.headers, "To"), "alice@example.org");
  t.equal(get(p.headers, "Subject"), "Undelivered Mail Returned to Sender");
  t.equal(Date.parse(get(p.headers, "Date") ?? ""), NOW.getTime(), "Date: is now");
  t.match(get(p.headers, "Date"), /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$/, "RFC 5322 date");
  t.match(get(p.headers, "Message-ID"), /^<[\x21-\x3b\x3d\x3f-\x7e]+@mail\.example\.org>$/, "Message-ID at the reporting MTA");
  t.equal(get(p.headers, "Auto-Submitted"), "auto-replied");
  t.equal(get(p.headers, "MIME-Version"), "1.0");
  const ct = get(p.headers, "Content-Type") ?? "";
  t.match(ct, /^multipart\/report;/);
  t.equal(param(ct, "report-type"), "delivery-status");
  t.ok(p.boundary.length >= 1 && p.boundary.length <= 70, "boundary length per RFC 2046");
  t.equal(get(p.headers, "Content-Transfer-Encoding"), "7bit");
  for (const name of ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]) {
    t.equal(getAll(p.headers, name).length, 1, `exactly one ${name}:`);
  }

  t.equal(p.parts.length, 3, "three parts");
  t.same(p.parts.map((x) => (get(x.headers, "Content-Type") ?? "").split(";")[0].trim()),
    ["text/plain", "message/delivery-status", "text/rfc822-headers"], "content types in order");
  t.equal(param(get(p.parts[0].headers, "Content-Type") ?? "", "charset"), "us-ascii");

  const notice = noticeOf(p);
  t.match(notice, /^This is the mail system at host mail\.example\.org\.\n/);
  t.match(notice, /I'm sorry to have to inform you that your message could not\nbe delivered to one or more recipients/);
  t.ok(notice.includes(`<bob@example.com> (expanded from <bob.smith@example.com>): ${BOB.reason}\n`), "the recipient and its reason");
  t.ok(p.parts[0].body.split("\n").every((l) => l.length <= 76), "text wrapped at 76 columns");
  const same = noticeOf(parseDsn(composeBounce(input({ recipients: [{ ...BOB, originalRecipient: "Bob@Example.COM" }] }))));
  t.ok(same.includes(`<bob@example.com>: ${BOB.reason}`), "no \"expanded from\" when ORCPT differs only in case, as in Postfix");

  const groups = statusGroups(p.parts[1].body);
  t.equal(groups.length, 2, "per-message group and one recipient group");
  t.same(groups[0], [
    ["Reporting-MTA", "dns; mail.example.org"],
    ["X-Mudmail-Queue-ID", "1763913481.0"],
    ["X-Mudmail-Sender", "rfc822; alice@example.org"],
    ["Arrival-Date", get(groups[0], "Arrival-Date")!],
  ], "per-message fields");
  t.equal(Date.parse(get(groups[0], "Arrival-Date")!), ARRIVAL.getTime(), "Arrival-Date");
  t.same(groups[1].map(([n]) => n), ["Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"],
    "per-recipient fields in RFC 3464 order");
  t.equal(get(groups[1], "Original-Recipient"), "rfc822; bob.smith@example.com");
  t.equal(get(groups[1], "Final-Recipient"), "rfc822; bob@example.com");
  t.equal(get(groups[1], "Action"), "failed");
  t.equal(get(groups[1], "Status"), "5.1.1");
  t.equal(get(groups[1], "Remote-MTA"), "dns; mx.example.com");
  t.equal(get(groups[1], "Diagnostic-Code"), `smtp; ${BOB.diagnostic}`, "Diagnostic-Code unfolds to the reply");
  t.equal(Date.parse(get(groups[1], "Last-Attempt-Date")!), LAST.getTime());
  t.equal(get(groups[1], "Will-Retry-Until"), undefined, "no Will-Retry-Until for failed");

  t.equal(get(p.parts[2].headers, "Content-Description"), "Undelivered Message Headers");
  t.equal(p.parts[2].body, lf(HEADERS).replace(/\n\n$/, "\n"), "original headers byte for byte, LF line ends");
  t.notOk(file.includes("SECRET-BODY-LINE"), "no body");
  t.equal(p.epilogue, "", "nothing after the close delimiter");
  t.notOk(file.includes("\r"), "LF line ends only");
  checkLines(t, p);
});

t.test("three recipients, mixed actions", async (t) => {
  const p = parseDsn(composeBounce(input({ recipients: [BOB, CAROL, DAVE], envid: "QQ314159" })));
  t.equal(get(p.headers, "Subject"), "Undelivered Mail Returned to Sender", "any failure makes it a bounce");
  const groups = statusGroups(p.parts[1].body);
  t.equal(groups.length, 4, "per-message group and three recipient groups");
  t.equal(get(groups[0], "Original-Envelope-Id"), "QQ314159");
  t.equal(groups[0][0][0], "Original-Envelope-Id", "Original-Envelope-Id first (RFC 3464 grammar)");
  t.equal(get(groups[0], "Reporting-MTA"), "dns; mail.example.org");
  t.equal(get(groups[0], "X-Mudmail-Queue-ID"), "1763913481.0");

  const [, bob, carol, dave] = groups;
  t.equal(get(bob, "Final-Recipient"), "rfc822; bob@example.com");
  t.equal(get(bob, "Action"), "failed");
  t.equal(get(bob, "Status"), "5.1.1");

  t.same(carol.map(([n]) => n), ["Final-Recipient", "Action", "Status", "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"]);
  t.equal(get(carol, "Final-Recipient"), "rfc822; carol@example.net");
  t.equal(get(carol, "Action"), "delayed");
  t.equal(get(carol, "Status"), "4.4.1");
  t.equal(get(carol, "Diagnostic-Code"), `X-Mudmail; ${CAROL.diagnostic}`, "a non-SMTP diagnostic is ours, as Postfix's X-Postfix");
  t.equal(Date.parse(get(carol, "Last-Attempt-Date")!), LAST.getTime());
  t.equal(Date.parse(get(carol, "Will-Retry-Until")!), UNTIL.getTime());

  t.same(dave.map(([n]) => n), ["Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"]);
  t.equal(get(dave, "Action"), "delivered");
  t.equal(get(dave, "Status"), "2.0.0");
  t.equal(get(dave, "Remote-MTA"), "dns; mx.example.com");
  t.equal(get(dave, "Diagnostic-Code"), `smtp; ${DAVE.diagnostic}`);
  t.equal(Date.parse(get(dave, "Last-Attempt-Date")!), NOW.getTime(), "Last-Attempt-Date defaults to now");

  const notice = noticeOf(p);
  const at = (s: string) => notice.indexOf(s);
  t.ok(at(`<bob@example.com> (expanded from <bob.smith@example.com>): ${BOB.reason}`) > 0);
  const delayedHeading = at("Delivery to the following recipient(s) is delayed.");
  const successHeading = at("Your message was successfully delivered to the following recipient(s):");
  t.ok(delayedHeading > at(`<bob@example.com>`) && successHeading > delayedHeading, "failed first, then the delayed heading, then the success heading");
  t.ok(at(`<carol@example.net>: ${CAROL.reason}`) > delayedHeading, "the delayed recipient under its heading");
  t.ok(at(`<dave@example.com>: ${DAVE.reason}`) > successHeading, "the delivered one under its heading");
  t.ok(at(`<carol@example.net>`) < successHeading, "the delayed recipient before the success heading");
  checkLines(t, p);
});

t.test("RET=FULL: the whole message as message/rfc822", async (t) => {
  const body = Buffer.concat([BODY, Buffer.from(" caf\xc3\xa9", "latin1")]);
  const file = composeBounce(input({ returnContent: "full", originalBody: body }));
  const p = parseDsn(file);
  t.equal(get(p.parts[2].headers, "Content-Type"), "message/rfc822");
  t.equal(get(p.parts[2].headers, "Content-Description"), "Undelivered Message");
  t.equal(get(p.parts[2].headers, "Content-Transfer-Encoding"), "8bit", "8-bit content is declared");
  t.equal(get(p.headers, "Content-Transfer-Encoding"), "8bit", "and so is the multipart");
  t.equal(p.parts[2].body, lf(HEADERS) + lf(body), "headers, blank line, body: unchanged apart from line ends");
  t.ok(file.includes("SECRET-BODY-LINE"));

  t.throws(() => composeBounce(input({ returnContent: "full" })), BounceError, '"full" without a body');
  const h = parseDsn(composeBounce(input({ returnContent: "headers", originalBody: BODY })));
  t.notOk(h.message.includes("SECRET-BODY-LINE"), "a body given with \"headers\" is never included");
  const whole = parseDsn(composeBounce(input({ originalHeaders: Buffer.concat([HEADERS, BODY]) })));
  t.notOk(whole.message.includes("SECRET-BODY-LINE"), "headers given with the body attached: the body is cut off");
  t.equal(whole.parts[2].body, lf(HEADERS).replace(/\n\n$/, "\n"));
});

t.test("the delay warning", async (t) => {
  const p = parseDsn(composeBounce(input({ recipients: [CAROL] })));
  t.equal(get(p.headers, "Subject"), "Delayed Mail (still being retried)");
  const notice = noticeOf(p);
  t.match(notice, /THIS IS A WARNING ONLY\.  YOU DO NOT NEED TO RESEND YOUR MESSAGE\./);
  t.match(notice, /Your message could not be delivered for 7 minute\(s\)\./);
  t.match(notice, /It will be retried until it is 5 day\(s\) old\./);
  t.ok(notice.includes(`<carol@example.net>: ${CAROL.reason}`));
  t.notMatch(notice, /I'm sorry/);
  const groups = statusGroups(p.parts[1].body);
  t.equal(get(groups[1], "Action"), "delayed");
  t.equal(Date.parse(get(groups[1], "Will-Retry-Until")!), UNTIL.getTime());
  t.equal(get(p.parts[2].headers, "Content-Description"), "Delayed Message Headers");
  checkLines(t, p);
});

t.test("the success report", async (t) => {
  const relayed: BounceRecipient = { ...DAVE, recipient: "erin@example.com", action: "relayed", status: "2.0.0" };
  const p = parseDsn(composeBounce(input({ recipients: [DAVE, relayed] })));
  t.equal(get(p.headers, "Subject"), "Successful Mail Delivery Report");
  const notice = noticeOf(p);
  t.match(notice, /Your message was successfully delivered to the destination\(s\)\nlisted below/);
  t.notMatch(notice, /I'm sorry|WARNING/);
  t.ok(notice.includes(`<dave@example.com>: ${DAVE.reason}`));
  t.ok(notice.includes(`<erin@example.com>: ${DAVE.reason}`));
  const groups = statusGroups(p.parts[1].body);
  t.same(groups.slice(1).map((g) => get(g, "Action")), ["delivered", "relayed"]);
  t.same(groups.slice(1).map((g) => get(g, "Will-Retry-Until")), [undefined, undefined], "Will-Retry-Until only for delayed");
  t.equal(get(p.parts[2].headers, "Content-Description"), "Delivered Message Headers");
});

t.test("a 2,000-character diagnostic is folded and unfolds back", async (t) => {
  const words: string[] = [];
  for (let i = 0; words.join(" ").length < 2000; i++) words.push(`word${i}${"x".repeat(i % 13)}`);
  const diagnostic = `550 5.7.1 ${words.join(" ")}`.slice(0, 2000).replace(/ $/, "y");
  t.equal(diagnostic.length, 2000);
  const file = composeBounce(input({ recipients: [{ ...BOB, diagnostic }] }));
  const p = parseDsn(file);
  t.ok(file.toString("latin1").split("\n").every((l) => l.length <= 998), "no line over 998 octets");
  const raw = p.parts[1].body.split("\n");
  const start = raw.findIndex((l) => l.startsWith("Diagnostic-Code:"));
  let end = start + 1;
  while (raw[end] && /^[ \t]/.test(raw[end])) end++;
  t.ok(end - start > 20, "folded over many lines");
  t.ok(raw.slice(start, end).every((l) => l.length <= 78), "each within 78 columns");
  t.ok(raw.slice(start + 1, end).every((l) => /^ \S/.test(l)), "continuation lines start with one space, then text");
  t.equal(unfold(raw.slice(start, end).join("\n")), `Diagnostic-Code: smtp; ${diagnostic}`, "unfolds to the original");

  // Without a single space to fold at: still no line over 998 octets.
  const solid = `550 ${"z".repeat(2500)}`;
  const q = parseDsn(composeBounce(input({ recipients: [{ ...BOB, diagnostic: solid, reason: solid }] })));
  const lines = q.message.split("\n");
  t.ok(lines.every((l) => l.length <= 998), "a word longer than a line is cut");
  const groups = statusGroups(q.parts[1].body);
  t.equal(get(groups[1], "Diagnostic-Code")!.replace(/ /g, ""), `smtp;${solid.replace(/ /g, "")}`, "nothing lost but a space");
});

t.test("the null sender is never bounced; bad input is refused", async (t) => {
  t.throws(() => composeBounce(input({ sender: "" })), BounceError, '""');
  t.throws(() => composeBounce(input({ sender: "<>" })), BounceError, '"<>"');
  t.throws(() => composeBounce(input({ sender: "not an address" })), BounceError);
  t.throws(() => composeBounce(input({ recipients: [] })), BounceError);
  t.throws(() => composeBounce(input({ recipients: [{ ...BOB, status: "550" }] })), BounceError);
  t.throws(() => composeBounce(input({ reportingMta: "bad host" })), BounceError);
  t.throws(() => composeBounce(input({ arrival: new Date(NaN) })), BounceError);
  t.throws(() => composeBounce(input({ boundary: "bad\"boundary" })), BounceError);
  const colliding = Buffer.concat([HEADERS.subarray(0, HEADERS.length - 2), Buffer.from("X-Test: --collide\r\n\r\n")]);
  t.throws(() => composeBounce(input({ originalHeaders: colliding, boundary: "collide" })), BounceError, "a boundary that occurs in the content");
  t.same(parseDsn(composeBounce(input({ sender: "<alice@example.org>" }))).envelope, ["<>", "alice@example.org"], "brackets are dropped");
});

t.test("Message-ID and boundary are unique per call; a given boundary is used", async (t) => {
  const a = parseDsn(composeBounce(input()));
  const b = parseDsn(composeBounce(input()));
  t.not(get(a.headers, "Message-ID"), get(b.headers, "Message-ID"));
  t.not(a.boundary, b.boundary);
  const c = parseDsn(composeBounce(input({ boundary: "fixed.boundary/for-tests" })));
  t.equal(c.boundary, "fixed.boundary/for-tests");
  t.equal(c.parts.length, 3);
});

t.test("non-ASCII: utf-8 address type, encoded text, A-labels", async (t) => {
  const jose: BounceRecipient = {
    recipient: "josé+tag@exämple.com",
    originalRecipient: "rfc822;josé+tag@exämple.com",
    action: "failed",
    status: "5.1.1",
    remoteMta: "mx.exämple.com",
    diagnostic: "550 5.1.1 <josé+tag@exämple.com>: unknown — user",
    reason: "host mx.exämple.com said: 550 5.1.1 unknown — user",
  };
  const p = parseDsn(composeBounce(input({ sender: "alice@bücher.example", recipients: [jose, BOB] })));
  t.equal(p.envelope[1], "alice@bücher.example", "the queue file keeps the address");
  t.equal(get(p.headers, "To"), "alice@xn--bcher-kva.example", "To: has the A-label");
  const groups = statusGroups(p.parts[1].body);
  t.equal(get(groups[0], "X-Mudmail-Sender"), "utf-8; alice@b\\x{FC}cher.example");
  t.equal(get(groups[1], "Final-Recipient"), "utf-8; jos\\x{E9}\\x{2B}tag@ex\\x{E4}mple.com", "RFC 6533 utf-8-addr-xtext");
  t.equal(get(groups[1], "Original-Recipient"), "utf-8; jos\\x{E9}\\x{2B}tag@ex\\x{E4}mple.com");
  t.equal(get(groups[1], "Remote-MTA"), "dns; mx.xn--exmple-cua.com");
  t.equal(get(groups[1], "Diagnostic-Code"), "smtp; 550 5.1.1 <jos\\x{E9}+tag@ex\\x{E4}mple.com>: unknown \\x{2014} user");
  t.equal(get(groups[2], "Final-Recipient"), "rfc822; bob@example.com", "ASCII addresses stay rfc822");
  t.equal(param(get(p.parts[0].headers, "Content-Type") ?? "", "charset"), "utf-8");
  t.equal(get(p.parts[0].headers, "Content-Transfer-Encoding"), "quoted-printable");
  t.ok(p.parts[0].body.split("\n").every((l) => l.length <= 76), "quoted-printable lines of 76 at most");
  t.ok(noticeOf(p).includes(`<josé+tag@exämple.com>: ${jose.reason}`), "the text decodes back");
  checkLines(t, p);
});

t.test("a valid queue file (SPEC section 2), read by the spool", async (t) => {
  const root = await fsp.mkdtemp(path.join(os.tmpdir(), "mudmail-bounce-test-"));
  t.teardown(() => fsp.rm(root, { recursive: true, force: true }));
  const spool = new Spool(path.join(root, "maildir"));
  await spool.init();
  const file = composeBounce(input({ recipients: [BOB, CAROL, DAVE], returnContent: "full", originalBody: BODY }));
  const lines = file.toString("utf8").split("\n");
  t.equal(lines[0], "<>", "line 1: the null sender");
  t.equal(lines[1], "alice@example.org", "line 2: the original sender, the only recipient");
  t.match(lines[2], /^From: /, "line 3: the message's first header");
  const id = await spool.create(file);
  t.ok(await spool.claim(id));
  const msg = await spool.open(id);
  t.equal(msg.sender, "", "the spool reads the null sender");
  t.same(msg.recipients, ["alice@example.org"]);
  t.ok(msg.whole);
  t.equal(msg.head.toString("latin1"), file.subarray(file.indexOf("\n", file.indexOf("\n") + 1) + 1).toString("latin1"));
  const scan = new HeaderScan();
  scan.push(msg.head);
  t.match(scan.end(), { hasDate: true, hasMessageId: true, hasFrom: true, startsWithHeader: true, complete: true },
    "the engine adds nothing when it sends it");
});

/* ------------------------------------------------------------------------------------ */
/* An independent parser: Python's email package                                        */

const PYTHON = "/usr/bin/python3";
const PY = String.raw`
import email, json, re, sys
m = email.message_from_bytes(sys.stdin.buffer.read())
unfold = lambda v: re.sub(r"\r?\n(?=[ \t])", "", str(v))
out = {"type": m.get_content_type(), "reportType": m.get_param("report-type"),
       "multipart": m.is_multipart(), "subject": m["subject"],
       "defects": [type(d).__name__ for p in m.walk() for d in p.defects]}
parts = m.get_payload()
out["parts"] = [p.get_content_type() for p in parts]
ds = [p for p in parts if p.get_content_type() == "message/delivery-status"][0]
out["blocks"] = [[[k, unfold(v)] for k, v in b.items()] for b in ds.get_payload()]
text = parts[0]
out["text"] = text.get_payload(decode=True).decode(text.get_content_charset())
last = parts[2]
if last.get_content_type() == "message/rfc822":
    inner = last.get_payload(0)
    out["inner"] = {"subject": inner["subject"], "body": inner.get_payload(decode=True).decode("utf-8")}
else:
    out["headers"] = last.get_payload()
print(json.dumps(out))
`;

interface PyView {
  type: string;
  reportType: string;
  multipart: boolean;
  subject: string;
  defects: string[];
  parts: string[];
  blocks: Array<Array<[string, string]>>;
  text: string;
  inner?: { subject: string; body: string };
  headers?: string;
}

async function python(file: Buffer): Promise<PyView> {
  const message = file.subarray(file.indexOf("\n", file.indexOf("\n") + 1) + 1);
  const py = await run(PYTHON, ["-c", PY], { input: message });
  if (py.code !== 0) throw new Error(`python3 failed: ${py.stderr}`);
  return JSON.parse(py.stdout) as PyView;
}

// Skipped on a machine without Python; in CI a missing Python is a failure, not a skip.
t.test("Python's email package reads it as a delivery status notification", async (t) => {
  if (!requireAll(t, [needFile(PYTHON)])) return;
  const cases: Array<[string, BounceInput, string, number]> = [
    ["one failed", input(), "Undelivered Mail Returned to Sender", 1],
    ["three mixed", input({ recipients: [BOB, CAROL, DAVE], envid: "QQ314159" }), "Undelivered Mail Returned to Sender", 3],
    ["full", input({ returnContent: "full", originalBody: BODY }), "Undelivered Mail Returned to Sender", 1],
    ["delayed", input({ recipients: [CAROL] }), "Delayed Mail (still being retried)", 1],
    ["success", input({ recipients: [DAVE] }), "Successful Mail Delivery Report", 1],
    ["long diagnostic", input({ recipients: [{ ...BOB, diagnostic: `550 ${"lorem ipsum ".repeat(170)}end` }] }), "Undelivered Mail Returned to Sender", 1],
    ["non-ASCII", input({ recipients: [{ ...BOB, recipient: "josé@exämple.com", originalRecipient: undefined, reason: "unknown — user" }] }), "Undelivered Mail Returned to Sender", 1],
  ];
  for (const [name, given, subject, n] of cases) {
    const view = await python(composeBounce(given));
    t.equal(view.type, "multipart/report", `${name}: multipart/report`);
    t.equal(view.reportType, "delivery-status", `${name}: report-type`);
    t.equal(view.subject, subject, `${name}: subject`);
    t.same(view.defects, [], `${name}: no defects`);
    t.same(view.parts, ["text/plain", "message/delivery-status", given.returnContent === "full" ? "message/rfc822" : "text/rfc822-headers"], `${name}: parts`);
    t.equal(view.blocks.length, n + 1, `${name}: per-message block and ${n} recipient block(s)`);
    const perMessage = Object.fromEntries(view.blocks[0]);
    t.equal(perMessage["Reporting-MTA"], "dns; mail.example.org", `${name}: Reporting-MTA`);
    t.equal(perMessage["X-Mudmail-Queue-ID"], "1763913481.0", `${name}: queue id`);
    t.equal(Date.parse(perMessage["Arrival-Date"]), ARRIVAL.getTime(), `${name}: Arrival-Date`);
    if (given.envid) t.equal(perMessage["Original-Envelope-Id"], given.envid, `${name}: Original-Envelope-Id`);
    given.recipients.forEach((r, i) => {
      const block = Object.fromEntries(view.blocks[i + 1]);
      t.match(block["Final-Recipient"], /^(rfc822|utf-8); /, `${name}: Final-Recipient ${i}`);
      t.equal(block["Action"], r.action, `${name}: Action ${i}`);
      t.equal(block["Status"], r.status, `${name}: Status ${i}`);
      if (r.diagnostic && /^[\x20-\x7e]*$/.test(r.diagnostic)) t.match(block["Diagnostic-Code"], new RegExp(`; ${r.diagnostic.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`), `${name}: Diagnostic-Code ${i}`);
    });
    t.match(view.text, /^This is the mail system at host mail\.example\.org\./, `${name}: the text part decodes`);
    if (given.returnContent === "full") {
      t.equal(view.inner?.subject, "the game tonight", `${name}: the returned message's headers`);
      t.equal(view.inner?.body, lf(BODY), `${name}: the returned message's body`);
    } else {
      t.equal(view.headers, lf(HEADERS).replace(/\n\n$/, "\n"), `${name}: the returned headers`);
    }
  }
  t.match((await python(composeBounce(cases[6][1]))).text, /<josé@exämple\.com>: unknown — user/, "utf-8 text decodes");
});
