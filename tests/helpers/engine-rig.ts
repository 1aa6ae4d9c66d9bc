// Test helper: the engine embedded in a host program (MailEngine: send / flush / stop) against
// the scripted SMTP server (tests/helpers/scripted-server.ts), as the engine tests use it.
//
//   setup(tt, { script?, engine?, errorListener?, proxy?, relay?, at? })  a rig: a fresh maildir,
//       a scripted server (optionally behind a recording proxy), an engine with 1-second stage
//       timeouts, its log lines, events and errors; flush() bounded; files(), where(), drop()
//   checkLog(tt, rig, { dsns })  every log line in the SPEC section 4 shape, one line per event
//   expectDsn(tt, rig, ...)      the engine's non-delivery notification, as the server got it
//   mailCommands / testMails / rcptsOf / verbs / inTestTransaction  what a session sent
//   simple(), queueFile(), crlf(), messageLines()  queue files and wire forms
//
// A recipient that fails for good makes the engine queue a delivery status notification
// (RFC 3464, from the null sender <>, to the original envelope sender) and, the engine being
// active, send it in the same flush through the same relay: to the scripted server. So the
// counts of such a flush include the DSN, the server sees a transaction MAIL FROM:<>, and the
// log has the DSN's own lines. Tests tell these apart (a server message whose `from` is "", a
// queue id named in "<id>: sender non-delivery notification: <dsn id>") and check the DSN
// explicitly with expectDsn(); scripts that refuse "the first message" key on the transactions
// of test messages (from !== "") so that the DSN is never refused by mistake.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { Test } from "tap";
import { MailEngine, MailError, type FlushSummary, type MailOptions, type Outcome } from "../../mail.js";
import {
  startScriptedServer, type Message, type Script, type ScriptedServer, type Session,
} from "./scripted-server.js";
import { recordingProxy, type Proxy } from "./proxy.js";
import { bounded } from "./daemon.js";

export { bounded };

export type Tap = Test;

/** Every stage bounded by one second, so a test that waits on a timeout ends in a few. */
export const FAST: MailOptions = {
  connectTimeout: 1, heloTimeout: 1, mailTimeout: 1, rcptTimeout: 1,
  dataInitTimeout: 1, dataXferTimeout: 1, dataDoneTimeout: 1, quitTimeout: 1,
};
export const FLUSH_MS = 10_000;
export const FOLDERS = ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"] as const;
export type FolderName = (typeof FOLDERS)[number];

/** SPEC section 4: the whole line of one recipient outcome. */
export const SMTP_LINE =
  /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/smtp\[\d+\]: (\S+): to=<([^>]*)>, relay=(\S+), delay=(\d+(?:\.\d+)?), delays=(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?), dsn=([245]\.\d{1,3}\.\d{1,3}), status=(sent|deferred|bounced) \((.*)\)$/;
/** Any log line: the Postfix-shaped prefix. */
export const ANY_LINE = /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/(smtp|qmgr|pickup|cleanup|postsuper)\[\d+\]: \S/;
/** The qmgr line naming the DSN queued for a message: original id, DSN id. */
export const NOTIFICATION_LINE = /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/qmgr\[\d+\]: (\S+): sender non-delivery notification: (\S+)$/;
/** The qmgr line for a message from the null sender that failed: never bounced, dropped. */
export const droppedLine = (id: string): RegExp =>
  new RegExp(`mudmail/qmgr\\[\\d+\\]: ${id.replace(/\./g, "\\.")}: undeliverable mail from the null sender is dropped, not bounced \\(no mail loops\\)$`);

export interface LogOutcome {
  line: string;
  id: string;
  to: string;
  relay: string;
  dsn: string;
  status: "sent" | "deferred" | "bounced";
  text: string;
}

export let idCounter = 0;
/** A queue id of SPEC section 1, unique in this process: <now seconds>.<subtime>. */
export function newQueueId(): string {
  return `${Math.floor(Date.now() / 1000)}.${9000 + idCounter++}`;
}

export interface Rig {
  dir: string;
  maildir: string;
  server: ScriptedServer;
  proxy: Proxy | null;
  engine: MailEngine;
  lines: string[];
  events: { sent: Outcome[]; deferred: Outcome[]; bounced: Outcome[] };
  /** Every outcome event (sent, deferred, bounced) in the order they came. */
  all: Outcome[];
  errors: MailError[];
  /** engine.flush(), bounded; force: deferred messages count as due (--flush --force). */
  flush(ms?: number, force?: boolean): Promise<FlushSummary>;
  /** Message file names (no dot files) in a spool folder. */
  files(folder: FolderName): string[];
  /** The folders holding a message with this id. */
  where(id: string): FolderName[];
  /** Writes a queue file elsewhere and renames it into outgoing/, as SPEC section 1 allows. */
  drop(content: string | Buffer, id?: string): string;
  /** Parsed smtp log lines, each checked against the SPEC section 4 shape. */
  outcomes(): LogOutcome[];
  /** The relay field a log line has when the scripted server was reached. */
  relay: string;
  /** Queue ids of the DSNs the engine queued: "<id>: sender non-delivery notification: <dsn id>". */
  dsnIds(): Set<string>;
  /** Messages the server accepted from a real sender: the test's own messages. */
  originals(): Message[];
  /** Messages the server accepted from the null sender <>: the engine's DSNs. */
  dsns(): Message[];
}

export interface RigOptions {
  script?: Script;
  engine?: MailOptions;
  /** Attach an "error" listener (default true). */
  errorListener?: boolean;
  /** Put a recording proxy between engine and server. */
  proxy?: boolean;
  /** Override the relay (e.g. a port with nothing listening). */
  relay?: string;
  /** Where the scripted server listens (e.g. port 465); default an ephemeral loopback port. */
  at?: { host?: string; port?: number };
}

/** Engines whose stop() a test already called (and perhaps saw hang). */
export const stopTried = new WeakSet<MailEngine>();

export async function setup(tt: Tap, o: RigOptions = {}): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-scripted-"));
  const maildir = path.join(dir, "maildir");
  fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
  fs.mkdirSync(path.join(dir, "staging"), { recursive: true });
  const server = await startScriptedServer(o.script ?? {}, o.at ?? {});
  const proxy = o.proxy ? await recordingProxy(server.port) : null;
  const port = proxy ? proxy.port : server.port;
  const lines: string[] = [];
  const engine = new MailEngine({
    maildir,
    relay: o.relay ?? `127.0.0.1:${port}`,
    log: (line) => lines.push(line),
    helo: "client.test",
    fsync: false,
    ...FAST,
    ...o.engine,
  });
  const events = { sent: [] as Outcome[], deferred: [] as Outcome[], bounced: [] as Outcome[] };
  const all: Outcome[] = [];
  const errors: MailError[] = [];
  for (const status of ["sent", "deferred", "bounced"] as const) {
    engine.on(status, (e: Outcome) => {
      events[status].push(e);
      all.push(e);
    });
  }
  if (o.errorListener !== false) engine.on("error", (e: MailError) => errors.push(e));
  tt.teardown(async () => {
    // A stop() that already hung in the test is not waited for twice.
    if (!stopTried.has(engine)) await bounded(engine.stop(), 5000, "engine.stop()").catch(() => undefined);
    await proxy?.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const files = (folder: FolderName): string[] => {
    try {
      return fs.readdirSync(path.join(maildir, folder)).filter((n) => !n.startsWith(".")).sort();
    } catch {
      return [];
    }
  };
  return {
    dir, maildir, server, proxy, engine, lines, events, all, errors,
    relay: `127.0.0.1[127.0.0.1]:${port}`,
    flush: (ms = FLUSH_MS, force = false) => bounded(engine.flush({ force }), ms, "engine.flush()"),
    files,
    where: (id) => FOLDERS.filter((f) => files(f).includes(id)),
    drop(content, id = newQueueId()) {
      const staged = path.join(dir, "staging", id);
      fs.writeFileSync(staged, content);
      fs.renameSync(staged, path.join(maildir, "outgoing", id));
      return id;
    },
    outcomes() {
      return lines.filter((l) => l.includes(" mudmail/smtp[")).map((line) => {
        const m = SMTP_LINE.exec(line);
        if (!m) throw new Error(`log line not in the SPEC section 4 shape: ${line}`);
        return { line, id: m[1], to: m[2], relay: m[3], dsn: m[9], status: m[10] as LogOutcome["status"], text: m[11] };
      });
    },
    dsnIds: () => new Set(lines.map((l) => NOTIFICATION_LINE.exec(l)?.[2]).filter((x): x is string => x !== undefined)),
    originals: () => server.messages.filter((m) => m.from !== ""),
    dsns: () => server.messages.filter((m) => m.from === ""),
  };
}

/**
 * Every log line has the Postfix prefix, every smtp line the full shape, and each event its
 * line (the DSNs' too). `dsns`: how many non-delivery notifications the engine must have queued
 * and the server accepted so far (default none). Returns the outcome lines of the test's own
 * messages; those of the DSNs are checked by expectDsn().
 */
export function checkLog(tt: Tap, rig: Rig, { dsns = 0 }: { dsns?: number } = {}): LogOutcome[] {
  for (const line of rig.lines) tt.match(line, ANY_LINE, `log line prefix: ${line}`);
  let outcomes: LogOutcome[] = [];
  try {
    outcomes = rig.outcomes();
    tt.pass("every smtp log line has the SPEC section 4 shape");
  } catch (err) {
    tt.fail(String(err));
  }
  const all = [...rig.events.sent, ...rig.events.deferred, ...rig.events.bounced];
  tt.equal(all.length, outcomes.length, "one event per recipient outcome line");
  for (const e of all) {
    tt.type(e.queueId, "string");
    tt.type(e.recipient, "string");
    tt.type(e.code, "number");
    tt.match(e.dsn, /^[245]\.\d{1,3}\.\d{1,3}$/, "event dsn");
    tt.type(e.text, "string");
    tt.equal(e.dsn[0], e.status === "sent" ? "2" : e.status === "bounced" ? "5" : "4", `dsn class fits status ${e.status}`);
    const line = outcomes.find((o) => o.id === e.queueId && o.to === e.recipient && o.status === e.status && o.text === e.text);
    tt.ok(line, `a log line for the ${e.status} event of ${e.queueId} to ${e.recipient}`);
    if (line) tt.equal(line.dsn, e.dsn, "log line and event have the same dsn");
  }
  const dsnIds = rig.dsnIds();
  tt.equal(dsnIds.size, dsns, `${dsns} non-delivery notification(s) queued`);
  tt.equal(rig.dsns().length, dsns, `${dsns} DSN(s) from <> accepted by the server`);
  return outcomes.filter((o) => !dsnIds.has(o.id));
}

/* ------------------------------------------------------------------------------------ */
/* DSNs: the engine's non-delivery notifications, as the server received them           */

export type Fields = Array<[string, string]>;

/** "Name: value" lines; a line starting with SP or HT continues the field before it (unfolded). */
export function parseFields(block: string): Fields {
  const fields: Fields = [];
  for (const line of block.split("\n")) {
    if (line === "") continue;
    if (/^[ \t]/.test(line) && fields.length > 0) {
      fields[fields.length - 1][1] += line;
      continue;
    }
    const colon = line.indexOf(":");
    fields.push(colon > 0 ? [line.slice(0, colon), line.slice(colon + 1).trim()] : [line, ""]);
  }
  return fields;
}

export function field(fields: Fields, name: string): string | undefined {
  return fields.find(([n]) => n.toLowerCase() === name.toLowerCase())?.[1];
}

export interface Dsn {
  headers: Fields;
  /** The parts between the delimiters: headers and content (LF line ends). */
  parts: Array<{ headers: Fields; body: string }>;
  /** message/delivery-status: the per-message group, then one group per recipient. */
  groups: Fields[];
}

/** A DSN as received (CRLF, un-stuffed): top headers, the multipart/report parts, the status groups. */
export function parseDsn(data: Buffer): Dsn {
  const text = data.toString("latin1").replace(/\r\n/g, "\n");
  const entity = (t: string) => {
    const end = t.indexOf("\n\n");
    return end < 0 ? { headers: parseFields(t), body: "" } : { headers: parseFields(t.slice(0, end + 1)), body: t.slice(end + 2) };
  };
  const top = entity(text);
  const boundary = /;\s*boundary="?([^";]+)"?/i.exec(field(top.headers, "Content-Type") ?? "")?.[1];
  if (!boundary) return { headers: top.headers, parts: [], groups: [] };
  const quoted = boundary.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  // RFC 2046 5.1.1: the line end before a delimiter belongs to the delimiter.
  const chunks = `\n${top.body}`.split(new RegExp(`\\n--${quoted}(?:--)?[ \\t]*(?=\\n|$)`));
  const parts = chunks.slice(1, -1).map((c) => entity(c.replace(/^\n/, "")));
  const status = parts[1]?.body ?? "";
  const groups = status.split(/\n(?:[ \t]*\n)+/).filter((g) => g.trim() !== "").map(parseFields);
  return { headers: top.headers, parts, groups };
}

/** The header block of a queue file's message lines (up to the first empty line), LF line ends. */
export function headerBlockOf(file: string | Buffer): string {
  const text = messageLines(Buffer.from(file)).toString("latin1").replace(/\r\n/g, "\n");
  const end = text.indexOf("\n\n");
  return end < 0 ? text : text.slice(0, end + 1);
}

export interface DsnExpectation {
  /** Queue id of the message that failed. */
  id: string;
  /** Its envelope sender: the DSN goes there. */
  sender: string;
  /** The recipients that failed for good, each with its RFC 3463 status and the server's reply if one said it. */
  failed: Array<{ rcpt: string; status: string; diagnostic?: string }>;
  /** The message's queue file: part 3 must be its header block. */
  file?: string | Buffer;
  /** Without the file: lines part 3 must have. */
  headerLines?: RegExp[];
}

/**
 * Exactly one DSN for `id`: named in the log, queued, sent to the sender through the scripted
 * server in the same flush (its own log line, sent event and removal), and, as received, an
 * RFC 3464 multipart/report naming exactly the failed recipients. Returns the DSN's queue id.
 */
export function expectDsn(tt: Tap, rig: Rig, x: DsnExpectation): string {
  const notes = rig.lines.map((l) => NOTIFICATION_LINE.exec(l)).filter((m) => m !== null && m[1] === x.id);
  tt.equal(notes.length, 1, `${x.id}: one "sender non-delivery notification" log line`);
  const dsnId = notes[0]?.[2] ?? "(none)";
  // Its delivery: one recipient, the original sender, sent through the same relay.
  const lines = rig.outcomes().filter((o) => o.id === dsnId);
  tt.equal(lines.length, 1, `the DSN ${dsnId} has one outcome line`);
  tt.match(lines[0], { to: x.sender, status: "sent", relay: rig.relay, dsn: "2.0.0" }, "the DSN was sent to the sender");
  tt.match(rig.events.sent.filter((e) => e.queueId === dsnId), [{ queueId: dsnId, recipient: x.sender, status: "sent" }], "a sent event for the DSN");
  tt.same([...rig.events.deferred, ...rig.events.bounced].filter((e) => e.queueId === dsnId), [], "no other event for the DSN");
  tt.ok(rig.lines.some((l) => l.endsWith(`: ${dsnId}: removed`)), `${dsnId}: removed`);
  tt.same(rig.where(dsnId), [], "the DSN left the queue");
  tt.notOk(rig.lines.some((l) => droppedLine(x.id).test(l)), "not dropped: the sender is not null");

  // What the server got: one message from <> to the sender, announced by MAIL FROM:<>.
  const mine = rig.dsns().filter((m) => m.to.length === 1 && m.to[0] === x.sender);
  tt.equal(mine.length, 1, `exactly one DSN from <> to <${x.sender}> reached the server`);
  const m = mine[0];
  if (!m) {
    tt.comment(rig.server.transcripts());
    return dsnId;
  }
  const session = rig.server.sessions.find((s) => s.id === m.session)!;
  tt.ok(mailCommands(session).some((c) => /^MAIL FROM:<>(?: |$)/.test(c)), "MAIL FROM:<> (the null sender)");
  const dsn = parseDsn(m.data);
  const top = (name: string) => field(dsn.headers, name) ?? "";
  tt.match(top("From"), /^MAILER-DAEMON@client\.test\b/, "From: MAILER-DAEMON");
  tt.equal(top("To"), x.sender, "To: the original sender");
  tt.equal(top("Subject"), "Undelivered Mail Returned to Sender");
  tt.equal(top("Auto-Submitted"), "auto-replied", "Auto-Submitted: auto-replied");
  tt.equal(top("MIME-Version"), "1.0");
  tt.match(top("Content-Type"), /^multipart\/report;/i, "multipart/report");
  tt.match(top("Content-Type"), /;\s*report-type="?delivery-status"?(?:;|$)/i, "report-type=delivery-status");
  tt.equal(dsn.parts.length, 3, "three parts");
  const type = (i: number) => field(dsn.parts[i]?.headers ?? [], "Content-Type") ?? "";
  tt.match(type(0), /^text\/plain\b/i, "part 1: text/plain");
  tt.match(type(1), /^message\/delivery-status\s*$/i, "part 2: message/delivery-status");
  tt.match(type(2), /^text\/rfc822-headers\s*$/i, "part 3: text/rfc822-headers");
  for (const f of x.failed) tt.ok(dsn.parts[0]?.body.includes(f.rcpt), `the notification names ${f.rcpt}`);

  // Part 2: the per-message fields, then exactly one group per failed recipient.
  const [perMessage, ...perRecipient] = dsn.groups;
  tt.equal(field(perMessage ?? [], "Reporting-MTA"), "dns; client.test", "Reporting-MTA");
  tt.equal(field(perMessage ?? [], "X-Mudmail-Queue-ID"), x.id, "the failed message's queue id");
  tt.same(perRecipient.map((g) => field(g, "Final-Recipient")).sort(), x.failed.map((f) => `rfc822; ${f.rcpt}`).sort(),
    "Final-Recipient: exactly the failed recipients");
  for (const f of x.failed) {
    const g = perRecipient.find((fields) => field(fields, "Final-Recipient") === `rfc822; ${f.rcpt}`) ?? [];
    tt.equal(field(g, "Action"), "failed", `${f.rcpt}: Action: failed`);
    tt.equal(field(g, "Status"), f.status, `${f.rcpt}: Status: ${f.status}`);
    if (f.diagnostic !== undefined) {
      tt.equal(field(g, "Diagnostic-Code"), `smtp; ${f.diagnostic}`, `${f.rcpt}: Diagnostic-Code: the server's reply`);
      tt.equal(field(g, "Remote-MTA"), "dns; 127.0.0.1", `${f.rcpt}: Remote-MTA: the server that said it`);
    } else {
      tt.notMatch(field(g, "Diagnostic-Code") ?? "", /^smtp;/i, `${f.rcpt}: no server said it: no smtp Diagnostic-Code`);
    }
  }

  // Part 3: the original message's headers (not its body).
  const part3 = dsn.parts[2]?.body ?? "";
  if (x.file !== undefined) tt.equal(part3, headerBlockOf(x.file), "part 3: the original header block");
  for (const re of x.headerLines ?? []) tt.match(part3, re, `part 3 has ${re}`);
  tt.notOk(part3.includes("\n\n"), "part 3: headers only");
  return dsnId;
}

/** The message lines of a queue file (line 3 on). */
export function messageLines(file: Buffer): Buffer {
  const first = file.indexOf(0x0a);
  const second = file.indexOf(0x0a, first + 1);
  return second < 0 ? Buffer.alloc(0) : file.subarray(second + 1);
}

/** Message lines as they must arrive (un-stuffed): every line end CRLF, the last line ended. */
export function crlf(content: Buffer): Buffer {
  let text = content.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
  if (text.length > 0 && !text.endsWith("\r\n")) text += "\r\n";
  return Buffer.from(text, "latin1");
}

export function mailCommands(session: Session): string[] {
  return session.commands.filter((c) => /^MAIL /i.test(c));
}

/** The MAIL commands of test messages: not those of a DSN (MAIL FROM:<>). */
export function testMails(session: Session): string[] {
  return mailCommands(session).filter((c) => !/^MAIL FROM:<>/i.test(c));
}

/** The session is in (or setting up) a transaction of a test message, not of a DSN. */
export function inTestTransaction(session: Session): boolean {
  const last = mailCommands(session).at(-1);
  return last !== undefined && !/^MAIL FROM:<>/i.test(last);
}

/** RCPT commands of test messages' transactions (dsn false) or of DSNs' (after MAIL FROM:<>, dsn true). */
export function rcptsOf(session: Session, dsn = false): string[] {
  let ofDsn = false;
  const out: string[] = [];
  for (const c of session.commands) {
    if (/^MAIL /i.test(c)) ofDsn = /^MAIL FROM:<>/i.test(c);
    else if (/^RCPT /i.test(c) && ofDsn === dsn) out.push(c);
  }
  return out;
}

export function verbs(session: Session): string[] {
  return session.commands.map((c) => (/^\S*/.exec(c)?.[0] ?? "").toUpperCase());
}

export function queueFile(sender: string, rcpts: string[], body: string): string {
  return `${sender}\n${rcpts.join(", ")}\n${body}`;
}

export const SIMPLE_BODY = "Subject: test\nFrom: a@example.org\nDate: Mon, 23 Nov 2026 15:44:09 +0000\nMessage-ID: <x@example.org>\n\nhello\n";

export function simple(sender: string, rcpts: string[], subject = "test"): string {
  return queueFile(sender, rcpts, SIMPLE_BODY.replace("Subject: test", `Subject: ${subject}`));
}

/** Each test that takes it runs twice: with PIPELINING offered and without. */
export const PIPELINING_VARIANTS = [
  { name: "with PIPELINING", pipelining: true },
  { name: "without PIPELINING", pipelining: false },
] as const;
