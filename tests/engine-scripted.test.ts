// The engine embedded in a host program (MailEngine: send / flush / stop) against the
// scripted SMTP server (tests/helpers/scripted-server.ts), for what a real server will
// not do on request: per-recipient refusals, 421 at every stage, hang-ups, garbage,
// replies split byte by byte, silence, SIZE limits, corrupt queue files, refused connects.
//
// Every test uses a fresh maildir, 1-second stage timeouts and bounded waits, and checks
// the flush counts, the spool folders (a message is in exactly one folder: deferred/ when
// deferred, gone when sent or bounced, corrupt/ when unparseable), the log lines (SPEC
// section 4), the events and what the server saw.
//
// A recipient that fails for good makes the engine queue a delivery status notification
// (RFC 3464, from the null sender <>, to the original envelope sender) and, the engine being
// active, send it in the same flush through the same relay: to the scripted server. So the
// counts of such a flush include the DSN, the server sees a transaction MAIL FROM:<>, and
// the log has the DSN's own lines. Tests tell these apart (a server message whose `from` is
// "", a queue id named in "<id>: sender non-delivery notification: <dsn id>") and check the
// DSN explicitly with expectDsn(); scripts that refuse "the first message" key on the
// transactions of test messages (from !== "") so that the DSN is never refused by mistake.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import net from "node:net";
import { syncBuiltinESMExports } from "node:module";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { MailEngine, MailError, type FlushSummary, type MailOptions, type Outcome } from "../mail.js";
import {
  startScriptedServer, type Message, type Script, type ScriptedServer, type Session,
} from "./helpers/scripted-server.js";
import { recordingProxy, type Proxy } from "./helpers/proxy.js";

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

/** Every stage bounded by one second, so a test that waits on a timeout ends in a few. */
const FAST: MailOptions = {
  connectTimeout: 1, heloTimeout: 1, mailTimeout: 1, rcptTimeout: 1,
  dataInitTimeout: 1, dataXferTimeout: 1, dataDoneTimeout: 1, quitTimeout: 1,
};
const FLUSH_MS = 10_000;
const FOLDERS = ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"] as const;
type FolderName = (typeof FOLDERS)[number];

/** SPEC section 4: the whole line of one recipient outcome. */
const SMTP_LINE =
  /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/smtp\[\d+\]: (\S+): to=<([^>]*)>, relay=(\S+), delay=(\d+(?:\.\d+)?), delays=(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?), dsn=([245]\.\d{1,3}\.\d{1,3}), status=(sent|deferred|bounced) \((.*)\)$/;
/** Any log line: the Postfix-shaped prefix. */
const ANY_LINE = /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/(smtp|qmgr)\[\d+\]: \S/;
/** The qmgr line naming the DSN queued for a message: original id, DSN id. */
const NOTIFICATION_LINE = /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mudmail\/qmgr\[\d+\]: (\S+): sender non-delivery notification: (\S+)$/;
/** The qmgr line for a message from the null sender that failed: never bounced, dropped. */
const droppedLine = (id: string): RegExp =>
  new RegExp(`mudmail/qmgr\\[\\d+\\]: ${id.replace(/\./g, "\\.")}: undeliverable mail from the null sender is dropped, not bounced \\(no mail loops\\)$`);

interface LogOutcome {
  line: string;
  id: string;
  to: string;
  relay: string;
  dsn: string;
  status: "sent" | "deferred" | "bounced";
  text: string;
}

function bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let idCounter = 0;
/** A queue id of SPEC section 1, unique in this process: <now seconds>.<subtime>. */
function newQueueId(): string {
  return `${Math.floor(Date.now() / 1000)}.${9000 + idCounter++}`;
}

interface Rig {
  dir: string;
  maildir: string;
  server: ScriptedServer;
  proxy: Proxy | null;
  engine: MailEngine;
  lines: string[];
  events: { sent: Outcome[]; deferred: Outcome[]; bounced: Outcome[] };
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

interface RigOptions {
  script?: Script;
  engine?: MailOptions;
  /** Attach an "error" listener (default true). */
  errorListener?: boolean;
  /** Put a recording proxy between engine and server. */
  proxy?: boolean;
  /** Override the relay (e.g. a port with nothing listening). */
  relay?: string;
}

/** Engines whose stop() a test already called (and perhaps saw hang). */
const stopTried = new WeakSet<MailEngine>();

async function setup(tt: Tap, o: RigOptions = {}): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-scripted-"));
  const maildir = path.join(dir, "maildir");
  fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
  fs.mkdirSync(path.join(dir, "staging"), { recursive: true });
  const server = await startScriptedServer(o.script ?? {});
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
  const errors: MailError[] = [];
  for (const status of ["sent", "deferred", "bounced"] as const) engine.on(status, (e: Outcome) => events[status].push(e));
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
    dir, maildir, server, proxy, engine, lines, events, errors,
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
function checkLog(tt: Tap, rig: Rig, { dsns = 0 }: { dsns?: number } = {}): LogOutcome[] {
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

type Fields = Array<[string, string]>;

/** "Name: value" lines; a line starting with SP or HT continues the field before it (unfolded). */
function parseFields(block: string): Fields {
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

function field(fields: Fields, name: string): string | undefined {
  return fields.find(([n]) => n.toLowerCase() === name.toLowerCase())?.[1];
}

interface Dsn {
  headers: Fields;
  /** The parts between the delimiters: headers and content (LF line ends). */
  parts: Array<{ headers: Fields; body: string }>;
  /** message/delivery-status: the per-message group, then one group per recipient. */
  groups: Fields[];
}

/** A DSN as received (CRLF, un-stuffed): top headers, the multipart/report parts, the status groups. */
function parseDsn(data: Buffer): Dsn {
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
function headerBlockOf(file: string | Buffer): string {
  const text = messageLines(Buffer.from(file)).toString("latin1").replace(/\r\n/g, "\n");
  const end = text.indexOf("\n\n");
  return end < 0 ? text : text.slice(0, end + 1);
}

interface DsnExpectation {
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
function expectDsn(tt: Tap, rig: Rig, x: DsnExpectation): string {
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
function messageLines(file: Buffer): Buffer {
  const first = file.indexOf(0x0a);
  const second = file.indexOf(0x0a, first + 1);
  return second < 0 ? Buffer.alloc(0) : file.subarray(second + 1);
}

/** Message lines as they must arrive (un-stuffed): every line end CRLF, the last line ended. */
function crlf(content: Buffer): Buffer {
  let text = content.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
  if (text.length > 0 && !text.endsWith("\r\n")) text += "\r\n";
  return Buffer.from(text, "latin1");
}

function mailCommands(session: Session): string[] {
  return session.commands.filter((c) => /^MAIL /i.test(c));
}

/** The MAIL commands of test messages: not those of a DSN (MAIL FROM:<>). */
function testMails(session: Session): string[] {
  return mailCommands(session).filter((c) => !/^MAIL FROM:<>/i.test(c));
}

/** The session is in (or setting up) a transaction of a test message, not of a DSN. */
function inTestTransaction(session: Session): boolean {
  const last = mailCommands(session).at(-1);
  return last !== undefined && !/^MAIL FROM:<>/i.test(last);
}

/** RCPT commands of test messages' transactions (dsn false) or of DSNs' (after MAIL FROM:<>, dsn true). */
function rcptsOf(session: Session, dsn = false): string[] {
  let ofDsn = false;
  const out: string[] = [];
  for (const c of session.commands) {
    if (/^MAIL /i.test(c)) ofDsn = /^MAIL FROM:<>/i.test(c);
    else if (/^RCPT /i.test(c) && ofDsn === dsn) out.push(c);
  }
  return out;
}

function verbs(session: Session): string[] {
  return session.commands.map((c) => (/^\S*/.exec(c)?.[0] ?? "").toUpperCase());
}

function queueFile(sender: string, rcpts: string[], body: string): string {
  return `${sender}\n${rcpts.join(", ")}\n${body}`;
}

const SIMPLE_BODY = "Subject: test\nFrom: a@example.org\nDate: Mon, 23 Nov 2026 15:44:09 +0000\nMessage-ID: <x@example.org>\n\nhello\n";

function simple(sender: string, rcpts: string[], subject = "test"): string {
  return queueFile(sender, rcpts, SIMPLE_BODY.replace("Subject: test", `Subject: ${subject}`));
}

/* ------------------------------------------------------------------------------------ */

t.test("1. happy path with PIPELINING: 3 messages, 2 recipients each, one connection", async (tt) => {
  const rig = await setup(tt, { proxy: true, engine: { maxConnections: 1 } });
  // A: LF line ends, no Date/Message-ID/From, lines that need dot-stuffing, a bare CR, no final newline.
  const aBody = "Subject: plain file\nTo: bob@example.net\n\nHello Bob.\n.leading dot\n..two dots\n.\nbare\rcr\nlast line without newline";
  const a = rig.drop(queueFile("alice@example.org", ["bob@example.net", "carol@example.net"], aBody));
  // B: CRLF message lines, has all three header fields; recipients in <> separated by a space.
  // (Envelope lines ending in CRLF are tested apart: see "queue file with CRLF envelope lines".)
  const bBody = "From: Dave <dave@example.org>\r\nDate: Mon, 23 Nov 2026 15:44:09 +0000\r\nMessage-ID: <b1@example.org>\r\nSubject: complete\r\n\r\nBody of B\r\n.\r\n";
  const b = rig.drop(`<dave@example.org>\n<erin@example.com> <frank@example.com>\n${bBody}`);
  // C: composed by send().
  const c = await rig.engine.send({ from: "gina@example.org", to: ["hal@example.com", "ivy@example.com"], subject: "composed", text: "Hi.\n.\nbye\n" });
  const files = new Map([a, b, c].map((id) => [id, fs.readFileSync(path.join(rig.maildir, "outgoing", id))]));

  const summary = await rig.flush();
  tt.match(summary, { sent: 3, deferred: 0, bounced: 0, corrupt: 0, messages: 3, recipients: 6 }, "flush counts");
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: every message left the queue`);

  const { server } = rig;
  tt.equal(server.connections, 1, "all three messages on ONE connection");
  const session = server.sessions[0];
  await server.waitFor(() => session.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
  tt.equal(session.commands.at(-1), "QUIT", "QUIT is the last command");
  tt.equal(mailCommands(session).length, 3, "three transactions");
  tt.same(session.pipeliningViolations, [], "no pipelining violation");
  tt.equal(server.messages.length, 3, "three messages accepted");

  // Pipelining: each MAIL/RCPT/RCPT/DATA group reached the server in one packet.
  const chunks = rig.proxy!.chunks[0] ?? [];
  const stream = Buffer.concat(chunks).toString("latin1");
  const ends: number[] = [];
  let offset = 0;
  for (const chunk of chunks) ends.push((offset += chunk.length));
  const chunkOf = (at: number) => ends.findIndex((end) => at < end);
  const groups = [...stream.matchAll(/MAIL FROM:<[^>]*>[^\r\n]*\r\nRCPT TO:<[^>]*>\r\nRCPT TO:<[^>]*>\r\nDATA\r\n/g)];
  tt.equal(groups.length, 3, "three MAIL/RCPT/RCPT/DATA groups, back to back");
  for (const g of groups) {
    tt.equal(chunkOf(g.index!), chunkOf(g.index! + g[0].length - 1), `one packet: ${JSON.stringify(g[0].slice(0, 40))}...`);
  }

  const byFrom = (from: string): Message | undefined => server.messages.find((m) => m.from === from);
  const ma = byFrom("alice@example.org");
  const mb = byFrom("dave@example.org");
  const mc = byFrom("gina@example.org");
  tt.same(ma?.to, ["bob@example.net", "carol@example.net"], "A's recipients");
  tt.same(mb?.to, ["erin@example.com", "frank@example.com"], "B's recipients");
  tt.same(mc?.to, ["hal@example.com", "ivy@example.com"], "C's recipients");

  // A lacks Date, Message-ID and From: the engine adds them, in front, then the file's lines.
  const aWire = crlf(messageLines(files.get(a)!));
  const aData = ma?.data ?? Buffer.alloc(0);
  const added = /^Date: [A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\nMessage-ID: <[^>\s]+@[^>\s]+>\r\nFrom: alice@example\.org\r\n/.exec(aData.toString("latin1"));
  tt.ok(added, `Date, Message-ID and From added to A: ${JSON.stringify(aData.subarray(0, 160).toString("latin1"))}`);
  if (added) tt.ok(aData.subarray(added[0].length).equals(aWire), "A's data: the file's message lines, CRLF, byte for byte");
  tt.ok(ma?.raw.toString("latin1").includes("\r\n..leading dot\r\n...two dots\r\n..\r\nbare\r\ncr\r\n"), "A was dot-stuffed on the wire");
  tt.ok(ma?.raw.toString("latin1").endsWith("last line without newline\r\n.\r\n"), "the last line was ended before the terminator");
  // B and C have all three: nothing added.
  tt.ok(mb?.data.equals(crlf(messageLines(files.get(b)!))), "B's data equals its message lines, nothing added");
  tt.ok(mc?.data.equals(crlf(messageLines(files.get(c)!))), "C's data equals its message lines, nothing added");
  tt.equal((mb?.data.toString("latin1").match(/^Date:/gim) ?? []).length, 1, "B keeps its one Date:");
  tt.equal((mb?.data.toString("latin1").match(/^Message-ID:/gim) ?? []).length, 1, "B keeps its one Message-ID:");
  // SIZE= declares the wire octets exactly.
  for (const m of server.messages) {
    const cmd = mailCommands(session).find((x) => x.startsWith(`MAIL FROM:<${m.from}>`)) ?? "";
    tt.equal(Number(/SIZE=(\d+)/.exec(cmd)?.[1]), m.raw.length, `SIZE= of ${m.from} is the wire size`);
    tt.notMatch(cmd, /BODY=8BITMIME/, "7-bit messages: no BODY=8BITMIME");
  }

  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.length, 6, "six log lines");
  for (const o of outcomes) {
    tt.equal(o.status, "sent");
    tt.equal(o.relay, rig.relay, "relay=host[ip]:port");
    tt.equal(o.dsn, "2.0.0");
    tt.match(o.text, /^250 2\.0\.0 Ok: queued as \d+$/, "the server's words");
  }
  for (const id of [a, b, c]) tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), `${id}: removed`);
  tt.equal(rig.events.sent.length, 6, "six sent events");
  tt.same(rig.errors, [], "no error events");
});

t.test("1b. a queue file whose envelope lines end in CRLF is delivered, not quarantined", async (tt) => {
  // SPEC 2: "LF or CRLF line ends"; queue.ts strips the CR of both envelope lines, so a
  // file written with CRLF throughout (as a Windows-side or network-fed writer does) must work.
  const rig = await setup(tt);
  const body = "From: Dave <dave@example.org>\r\nDate: Mon, 23 Nov 2026 15:44:09 +0000\r\nMessage-ID: <b1@example.org>\r\nSubject: crlf\r\n\r\nBody\r\n";
  const id = rig.drop(`<dave@example.org>\r\n<erin@example.com> <frank@example.com>\r\n${body}`);
  const single = rig.drop(`dave@example.org\r\nerin@example.com\r\n${body}`);
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, corrupt: 0, deferred: 0, bounced: 0 }, "both delivered, none corrupt");
  tt.same(rig.where(id), [], "the bracketed one left the queue");
  tt.same(rig.where(single), [], "the plain one left the queue");
  tt.same(rig.server.messages.map((m) => m.to).sort(), [["erin@example.com"], ["erin@example.com", "frank@example.com"]]);
  tt.same(rig.lines.filter((l) => l.includes("corrupt queue file")), [], "no corrupt-file log line");
  tt.equal(rig.server.messages.length, 2, "two messages accepted");
  tt.ok(rig.server.messages.every((m) => m.data.equals(Buffer.from(body))), "data byte for byte");
});

t.test("2. without PIPELINING: one command at a time, still delivered", async (tt) => {
  const rig = await setup(tt, { script: { pipelining: false }, engine: { maxConnections: 1 } });
  rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"], "one"));
  rig.drop(simple("d@example.org", ["e@example.net", "f@example.net"], "two"));
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, deferred: 0, bounced: 0, corrupt: 0, messages: 2, recipients: 4 });
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
  tt.equal(rig.server.connections, 1, "one connection");
  const s = rig.server.sessions[0];
  await rig.server.waitFor(() => s.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
  tt.same(s.pipeliningViolations, [], "never sent more before a reply");
  tt.notOk(s.extensions.includes("PIPELINING"), "PIPELINING was not offered");
  tt.same(verbs(s), ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]);
  tt.equal(rig.server.messages.length, 2);
  const outcomes = checkLog(tt, rig);
  tt.same(outcomes.map((o) => o.status), ["sent", "sent", "sent", "sent"]);
});

const PIPELINING_VARIANTS = [
  { name: "with PIPELINING", pipelining: true },
  { name: "without PIPELINING", pipelining: false },
] as const;

t.test("3. per-recipient 450, 550 and 250; the 450 one is retried in the next flush", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(variant.name, async (tt) => {
      const rig = await setup(tt, {
        script: {
          pipelining: variant.pipelining,
          rcpt: (address) => {
            if (address === "busy@example.net") return "450 4.2.0 <busy@example.net>: Recipient address rejected: Mailbox busy";
            if (address === "nobody@example.net") return "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown";
            return undefined;
          },
        },
      });
      const body = "Subject: mixed\nFrom: a@example.org\n\nline one\n.dot line\n";
      const original = queueFile("a@example.org", ["busy@example.net", "nobody@example.net", "ok@example.net"], body);
      const id = rig.drop(original);

      const first = await rig.flush();
      // The message (3 recipients) is deferred; nobody@'s 550 makes a DSN to a@example.org,
      // a second message with one recipient, sent in the same flush.
      tt.match(first, { sent: 1, deferred: 1, bounced: 0, corrupt: 0, messages: 2, recipients: 4 }, "first flush: the message is deferred, its DSN sent");
      tt.same(rig.where(id), ["deferred"], "in deferred/ only");
      const rewritten = fs.readFileSync(path.join(rig.maildir, "deferred", id), "latin1");
      const [line1, line2] = rewritten.split("\n");
      tt.equal(line1, "a@example.org", "line 1 unchanged");
      tt.equal(line2.trim(), "busy@example.net", "line 2 rewritten to the 450 recipient alone");
      tt.equal(rewritten.slice(rewritten.indexOf("\n", line1.length + 1) + 1), body, "message lines unchanged");
      const book = JSON.parse(fs.readFileSync(path.join(rig.maildir, "deferred", `.${id}`), "utf8")) as Record<string, unknown>;
      tt.equal(book.attempts, 1, "bookkeeping: one attempt");
      tt.ok(typeof book.nextAttempt === "number" && book.nextAttempt > Date.now(), "bookkeeping: the next attempt is later");
      tt.match(String(book.lastError), /450 4\.2\.0 <busy@example\.net>: Recipient address rejected: Mailbox busy/, "bookkeeping: the last error");
      tt.equal(rig.originals().length, 1, "one test message accepted");
      tt.same(rig.originals()[0].to, ["ok@example.net"], "for the 250 recipient only");
      for (const session of rig.server.sessions) tt.same(session.pipeliningViolations, [], `no pipelining violation (session ${session.id})`);
      const dsnId = expectDsn(tt, rig, {
        id, sender: "a@example.org", file: original,
        failed: [{ rcpt: "nobody@example.net", status: "5.1.1", diagnostic: "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown" }],
      });

      const outcomes = checkLog(tt, rig, { dsns: 1 });
      tt.same(outcomes.map((o) => o.id), [id, id, id], "three outcome lines of the message (the DSN's apart)");
      const of = (to: string) => outcomes.find((o) => o.to === to);
      tt.equal(of("ok@example.net")?.status, "sent");
      tt.equal(of("busy@example.net")?.status, "deferred");
      tt.equal(of("busy@example.net")?.dsn, "4.2.0");
      tt.equal(of("busy@example.net")?.text,
        "host 127.0.0.1[127.0.0.1] said: 450 4.2.0 <busy@example.net>: Recipient address rejected: Mailbox busy (in reply to RCPT TO command)");
      tt.equal(of("nobody@example.net")?.status, "bounced");
      tt.equal(of("nobody@example.net")?.dsn, "5.1.1");
      tt.match(of("nobody@example.net")?.text ?? "", /^host \S+ said: 550 5\.1\.1 <nobody@example\.net>: Recipient address rejected: User unknown \(in reply to RCPT TO command\)$/);
      for (const o of outcomes) tt.equal(o.relay, rig.relay);
      tt.match(rig.events.bounced, [{ queueId: id, recipient: "nobody@example.net", status: "bounced", code: 550, dsn: "5.1.1", relay: rig.relay }]);
      tt.equal(rig.events.bounced.length, 1, "one bounced event");
      tt.match(rig.events.deferred, [{ queueId: id, recipient: "busy@example.net", status: "deferred", code: 450, dsn: "4.2.0" }]);
      tt.equal(rig.events.deferred.length, 1, "one deferred event");
      const sentEvents = rig.events.sent.filter((e) => e.queueId !== dsnId);
      tt.match(sentEvents, [{ queueId: id, recipient: "ok@example.net", status: "sent", code: 250, dsn: "2.0.0" }]);
      tt.equal(sentEvents.length, 1, "one sent event of the message (the DSN's apart)");
      tt.notOk(rig.lines.some((l) => l.endsWith(`${id}: removed`)), "not removed yet");

      // Second flush: the server now accepts; only the pending recipient gets the message.
      rig.server.script = { pipelining: variant.pipelining };
      tt.match(await rig.flush(), { sent: 0, deferred: 0, messages: 0 }, "not due yet: a plain flush leaves it waiting");
      const second = await rig.flush(undefined, true);
      tt.match(second, { sent: 1, deferred: 0, bounced: 0, corrupt: 0, messages: 1, recipients: 1 }, "second flush, forced: sent");
      tt.same(rig.where(id), [], "the file is gone");
      tt.same(fs.readdirSync(path.join(rig.maildir, "deferred")), [], "no bookkeeping left behind either");
      tt.equal(rig.originals().length, 2, "two test messages accepted in all");
      tt.equal(rig.dsns().length, 1, "no further DSN: nothing failed in the second flush");
      tt.same(rig.originals()[1].to, ["busy@example.net"], "just that recipient");
      const header = (m: Message, name: string) => new RegExp(`^${name}: (.*)\r$`, "mi").exec(m.data.toString("latin1"))?.[1];
      const [m1, m2] = rig.originals();
      tt.equal(header(m2, "Date"), header(m1, "Date"), "the added Date: is the same in both attempts");
      tt.equal(header(m2, "From"), "a@example.org", "From: kept");
      tt.equal(header(m2, "Message-ID"), header(m1, "Message-ID"), "the added Message-ID: is the same in both attempts");
      tt.same(rig.server.sessions.flatMap((x) => rcptsOf(x)),
        ["RCPT TO:<busy@example.net>", "RCPT TO:<nobody@example.net>", "RCPT TO:<ok@example.net>", "RCPT TO:<busy@example.net>"],
        "the bounced and the sent recipients are not tried again");
      tt.same(rig.server.sessions.flatMap((x) => rcptsOf(x, true)), ["RCPT TO:<a@example.org>"], "and the DSN's one RCPT, to the sender");
      checkLog(tt, rig, { dsns: 1 });
      tt.ok(rig.lines.some((l) => l.endsWith(`${id}: removed`)), "removed");
    });
  }
});

t.test("4. all recipients refused: RSET, then the next message on the same connection", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(variant.name, async (tt) => {
      // Whichever test message comes first has every recipient refused; the second is accepted.
      // So is the DSN for the refused one: the refusal is keyed on the session's first test
      // transaction, never on one from <>.
      const rig = await setup(tt, {
        engine: { maxConnections: 1 },
        script: {
          pipelining: variant.pipelining,
          rcpt: (_a, s) => (inTestTransaction(s) && testMails(s).length === 1 ? "550 5.1.1 User unknown" : undefined),
        },
      });
      const files = {
        "one@example.org": simple("one@example.org", ["x1@example.net", "y1@example.net"]),
        "two@example.org": simple("two@example.org", ["x2@example.net", "y2@example.net"]),
      };
      const one = rig.drop(files["one@example.org"]);
      const two = rig.drop(files["two@example.org"]);
      const summary = await rig.flush();
      // The refused message (bounced), the next one (sent), and the refused one's DSN (sent, one recipient).
      tt.match(summary, { sent: 2, deferred: 0, bounced: 1, corrupt: 0, messages: 3, recipients: 5 });
      tt.same(rig.where(one), [], "first message gone");
      tt.same(rig.where(two), [], "second message gone");
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
      const s = rig.server.sessions[0];
      tt.equal(testMails(s).length, 2, "both test messages on the first connection");
      tt.ok(rig.server.sessions.slice(1).every((x) => testMails(x).length === 0), "no test message on another connection");
      tt.ok(rig.server.connections <= 2, `the DSN on that connection or on one more (${rig.server.connections} connection(s))`);
      const v = verbs(s);
      const mails = v.flatMap((verb, i) => (verb === "MAIL" && !/^MAIL FROM:<>/i.test(s.commands[i]) ? [i] : []));
      const rset = v.indexOf("RSET");
      tt.ok(rset > v.indexOf("RCPT") && rset < mails[1], `RSET between the refused and the next transaction: ${v.join(" ")}`);
      // Without PIPELINING no DATA may follow a transaction without recipients.
      if (!variant.pipelining) tt.same(v.slice(0, 5), ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"], "no DATA without recipients");
      for (const x of rig.server.sessions) tt.same(x.pipeliningViolations, [], `no pipelining violation (session ${x.id})`);
      tt.equal(rig.originals().length, 1, "the next message was delivered");
      const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
      tt.not(rig.originals()[0]?.from, refusedFrom, "the delivered one is the second transaction");
      const outcomes = checkLog(tt, rig, { dsns: 1 });
      tt.same(outcomes.filter((o) => o.status === "bounced").length, 2, "both refused recipients bounced");
      tt.same(outcomes.filter((o) => o.status === "sent").length, 2, "both recipients of the next message sent");
      tt.equal(outcomes.length, 4, "no other outcome of the test messages");
      expectDsn(tt, rig, {
        id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
        failed: ["x", "y"].map((p) => ({ rcpt: `${p}${refusedFrom === "one@example.org" ? 1 : 2}@example.net`, status: "5.1.1", diagnostic: "550 5.1.1 User unknown" })),
      });
    });
  }

  await tt.test("the server answers 354 to a pipelined DATA with no recipient accepted", async (tt) => {
    // RFC 2920: the client must then send an empty message (".") and must not count it.
    const first = (s: Session) => inTestTransaction(s) && testMails(s).length === 1;
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: {
        rcpt: (_a, s) => (first(s) ? "550 5.1.1 User unknown" : undefined),
        onCommand: (c, s) => (c === "DATA" && first(s) ? "354 go ahead anyway" : undefined),
        onData: (m) => (m.to.length === 0 ? "554 5.5.1 Error: no valid recipients" : undefined),
      },
    });
    const files = {
      "one@example.org": simple("one@example.org", ["x1@example.net"]),
      "two@example.org": simple("two@example.org", ["x2@example.net"]),
    };
    const one = rig.drop(files["one@example.org"]);
    const two = rig.drop(files["two@example.org"]);
    const summary = await rig.flush();
    // The refused one bounced, the other sent, and the DSN for the refused one sent.
    tt.match(summary, { sent: 2, deferred: 0, bounced: 1, messages: 3, recipients: 3 });
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const s = rig.server.sessions[0];
    tt.equal(s.unaccepted.length, 1, "one empty message");
    tt.equal(s.unaccepted[0]?.raw.toString("latin1"), ".\r\n", "just the terminator");
    tt.same(rig.server.sessions.slice(1).flatMap((x) => x.unaccepted), [], "no other unaccepted message");
    tt.equal(rig.originals().length, 1, "the next message delivered");
    tt.ok(verbs(s).includes("RSET"), "RSET after the empty message");
    checkLog(tt, rig, { dsns: 1 });
    const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
    tt.not(rig.originals()[0]?.from, refusedFrom, "the delivered one is the second transaction");
    expectDsn(tt, rig, {
      id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
      failed: [{ rcpt: refusedFrom === "one@example.org" ? "x1@example.net" : "x2@example.net", status: "5.1.1", diagnostic: "550 5.1.1 User unknown" }],
    });
  });
});

t.test("5. MAIL FROM refused", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(`with 5xx, ${variant.name}: bounced, RSET, the next message goes through`, async (tt) => {
      const rig = await setup(tt, {
        engine: { maxConnections: 1 },
        script: {
          pipelining: variant.pipelining,
          // The session's first test message is refused; a DSN's MAIL FROM:<> never is.
          mail: (a, s) => (a !== "" && testMails(s).length === 1 ? "553 5.7.1 Sender address rejected: not owned by user" : undefined),
        },
      });
      const files = {
        "one@example.org": simple("one@example.org", ["a@example.net", "b@example.net"]),
        "two@example.org": simple("two@example.org", ["c@example.net", "d@example.net"]),
      };
      const one = rig.drop(files["one@example.org"]);
      const two = rig.drop(files["two@example.org"]);
      const summary = await rig.flush();
      // The refused message (bounced), the next one (sent) and the refused one's DSN (sent, one recipient).
      tt.match(summary, { sent: 2, deferred: 0, bounced: 1, corrupt: 0, messages: 3, recipients: 5 });
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
      const s = rig.server.sessions[0];
      tt.equal(testMails(s).length, 2, "both test messages on the first connection");
      tt.ok(rig.server.sessions.slice(1).every((x) => testMails(x).length === 0), "no test message on another connection");
      tt.ok(rig.server.connections <= 2, `the DSN on that connection or on one more (${rig.server.connections} connection(s))`);
      const v = verbs(s);
      const mails = v.flatMap((verb, i) => (verb === "MAIL" && !/^MAIL FROM:<>/i.test(s.commands[i]) ? [i] : []));
      tt.ok(v.includes("RSET") && v.indexOf("RSET") > mails[0] && v.indexOf("RSET") < mails[1], `RSET before the next MAIL: ${v.join(" ")}`);
      if (!variant.pipelining) tt.same(v.slice(0, 3), ["EHLO", "MAIL", "RSET"], "no RCPT after a refused MAIL");
      for (const x of rig.server.sessions) tt.same(x.pipeliningViolations, [], `no pipelining violation (session ${x.id})`);
      tt.equal(rig.originals().length, 1, "the next message delivered");
      const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
      tt.not(rig.originals()[0]?.from, refusedFrom);
      const outcomes = checkLog(tt, rig, { dsns: 1 });
      const bounced = outcomes.filter((o) => o.status === "bounced");
      tt.equal(bounced.length, 2, "both recipients of the refused message bounced");
      for (const o of bounced) {
        tt.match(o.text, /^host \S+ said: 553 5\.7\.1 Sender address rejected: not owned by user \(in reply to MAIL FROM command\)$/);
        tt.equal(o.dsn, "5.7.1");
      }
      tt.equal(rig.events.bounced.length, 2, "two bounced events");
      tt.ok(rig.events.bounced.every((e) => e.code === 553), "bounced events carry code 553");
      const refused = refusedFrom === "one@example.org" ? ["a@example.net", "b@example.net"] : ["c@example.net", "d@example.net"];
      expectDsn(tt, rig, {
        id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
        failed: refused.map((rcpt) => ({ rcpt, status: "5.7.1", diagnostic: "553 5.7.1 Sender address rejected: not owned by user" })),
      });
    });
  }

  await tt.test("with 4xx: deferred, the file waits in deferred/", async (tt) => {
    const rig = await setup(tt, { script: { mail: () => "451 4.3.0 Temporary lookup failure" } });
    const id = rig.drop(simple("one@example.org", ["a@example.net", "b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0, messages: 1 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), simple("one@example.org", ["a@example.net", "b@example.net"]), "file unchanged");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.equal(o.dsn, "4.3.0");
      tt.match(o.text, /said: 451 4\.3\.0 Temporary lookup failure \(in reply to MAIL FROM command\)$/);
    }
    tt.equal(rig.server.messages.length + rig.server.sessions.flatMap((s) => s.unaccepted).length, 0, "no data sent");
  });
});

t.test("6. EHLO refused: HELO is used and delivery works", async (tt) => {
  for (const refusal of ["502 5.5.2 Error: command not recognized", "550 5.7.1 go away with your EHLO"]) {
    await tt.test(refusal.slice(0, 3), async (tt) => {
      const rig = await setup(tt, { script: { ehlo: refusal } });
      const id = rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"]));
      const summary = await rig.flush();
      tt.match(summary, { sent: 1, deferred: 0, bounced: 0 });
      tt.same(rig.where(id), []);
      const s = rig.server.sessions[0];
      tt.same(verbs(s).slice(0, 2), ["EHLO", "HELO"], "HELO after the refused EHLO");
      tt.equal(s.helo, "client.test");
      tt.notOk(s.esmtp);
      tt.same(s.pipeliningViolations, [], "no pipelining without EHLO");
      tt.notMatch(mailCommands(s)[0], /SIZE=|BODY=/, "no ESMTP parameters after HELO");
      tt.equal(rig.server.messages.length, 1);
      checkLog(tt, rig);
    });
  }
});

t.test("7. DATA refused, and the final reply after the dot", async (tt) => {
  await tt.test("DATA 554: bounced, removed", async (tt) => {
    // DATA of the test message is refused; that of its DSN (MAIL FROM:<>) is not.
    const rig = await setup(tt, { script: { onCommand: (c, s) => (c === "DATA" && inTestTransaction(s) ? "554 5.7.1 DATA refused by policy" : undefined) } });
    const file = simple("a@example.org", ["b@example.net", "c@example.net"]);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 3 });
    tt.same(rig.where(id), []);
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "bounced");
      tt.equal(o.dsn, "5.7.1");
      tt.match(o.text, /said: 554 5\.7\.1 DATA refused by policy \(in reply to DATA command\)$/);
    }
    tt.equal(rig.server.sessions.flatMap((s) => [...s.messages, ...s.unaccepted]).filter((m) => m.from !== "").length, 0, "no message data of the test message sent");
    tt.ok(verbs(rig.server.sessions[0]).includes("RSET"), "RSET after the refused DATA");
    expectDsn(tt, rig, {
      id, sender: "a@example.org", file,
      failed: ["b@example.net", "c@example.net"].map((rcpt) => ({ rcpt, status: "5.7.1", diagnostic: "554 5.7.1 DATA refused by policy" })),
    });
  });

  await tt.test("451 after the dot: deferred, in deferred/ unchanged", async (tt) => {
    const rig = await setup(tt, { script: { onData: () => "451 4.3.0 Error: queue file write error" } });
    const content = simple("a@example.org", ["b@example.net", "c@example.net"]);
    const id = rig.drop(content);
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content, "file unchanged");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.equal(o.dsn, "4.3.0");
      tt.match(o.text, /said: 451 4\.3\.0 Error: queue file write error \(in reply to end of DATA command\)$/);
    }
    tt.equal(rig.server.sessions[0].unaccepted.length, 1, "the data was sent and refused");
  });

  await tt.test("552 after the dot: bounced, removed", async (tt) => {
    // The test message is refused after the dot; its DSN (from <>) is accepted.
    const rig = await setup(tt, { script: { onData: (m) => (m.from !== "" ? "552 5.3.4 Message too big for you" : undefined) } });
    const file = simple("a@example.org", ["b@example.net"]);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 2 });
    tt.same(rig.where(id), []);
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 1);
    tt.match(outcomes[0], { status: "bounced", dsn: "5.3.4" });
    tt.match(outcomes[0].text, /said: 552 5\.3\.4 Message too big for you \(in reply to end of DATA command\)$/);
    tt.equal(rig.server.sessions.flatMap((s) => s.unaccepted).length, 1, "the test message's data was sent and refused");
    expectDsn(tt, rig, { id, sender: "a@example.org", file, failed: [{ rcpt: "b@example.net", status: "5.3.4", diagnostic: "552 5.3.4 Message too big for you" }] });
  });
});

t.test("8. 421 at greeting, MAIL, RCPT and after the dot: pending mail stays queued", async (tt) => {
  const cases: Array<{ name: string; script: Script; inReplyTo: RegExp }> = [
    { name: "greeting", script: { greeting: "421 4.3.2 scripted.test Service shutting down" }, inReplyTo: /\(in reply to the initial greeting\)/ },
    { name: "MAIL", script: { mail: () => "421 4.3.2 Service shutting down" }, inReplyTo: /\(in reply to MAIL FROM command\)/ },
    {
      name: "second RCPT",
      script: { rcpt: (_a, s) => (s.rcptTo.length === 1 ? "421 4.3.2 Service shutting down" : undefined) },
      inReplyTo: /\(in reply to RCPT TO command\)/,
    },
    { name: "after the dot", script: { onData: () => "421 4.3.2 Service shutting down" }, inReplyTo: /\(in reply to end of DATA command\)/ },
  ];
  for (const c of cases) {
    await tt.test(c.name, async (tt) => {
      const rig = await setup(tt, { script: c.script });
      const content = simple("a@example.org", ["b@example.net", "c@example.net"]);
      const id = rig.drop(content);
      const summary = await rig.flush();
      tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0 }, "deferred");
      tt.ok(summary.seconds < 5, `flush ended in ${summary.seconds} s`);
      tt.same(rig.where(id), ["deferred"], "still queued, in deferred/ only");
      tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content, "file unchanged");
      tt.same(rig.errors, [], "no error event");
      tt.same(rig.server.errors, [], "no script error");
      tt.equal(rig.server.messages.length, 0, "nothing accepted");
      tt.ok(rig.server.connections <= 2, `at most 2 connections (${rig.server.connections})`);
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 2, "a line for each recipient");
      for (const o of outcomes) {
        tt.equal(o.status, "deferred");
        tt.match(o.text, /421 4\.3\.2 .*Service shutting down/, "the server's words");
        tt.match(o.text, c.inReplyTo);
      }
      for (const e of rig.events.deferred) tt.equal(e.queueId, id);
    });
  }
});

t.test("9. disconnect mid-session", async (tt) => {
  await tt.test("server hangs up at DATA: deferred", async (tt) => {
    const rig = await setup(tt, { script: { onCommand: (c) => (c === "DATA" ? { action: "close" } : undefined) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 1);
    tt.equal(outcomes[0].status, "deferred");
    tt.match(outcomes[0].text, /^lost connection with 127\.0\.0\.1\[127\.0\.0\.1\] while sending DATA command/);
    tt.same(rig.errors, []);
  });

  await tt.test("server resets the connection at RCPT: deferred", async (tt) => {
    const rig = await setup(tt, { script: { pipelining: false, rcpt: () => ({ action: "reset" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2, "both recipients deferred");
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.match(o.text, /^lost connection with \S+ while sending RCPT TO \(Connection reset by peer\)$/);
    }
  });

  await tt.test("server hangs up after the message data, before its reply: deferred", async (tt) => {
    const rig = await setup(tt, { script: { onData: () => ({ action: "close" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(rig.server.sessions[0].unaccepted.length, 1, "the server had the data");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes[0]?.status, "deferred");
    tt.match(outcomes[0]?.text, /^lost connection with \S+ while sending end of data -- message may be sent more than once/);
  });

  await tt.test("server hangs up after the first of two messages: that one removed, the other deferred", async (tt) => {
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: { onCommand: (c, s) => (/^MAIL/i.test(c) && s.messages.length >= 1 ? { action: "close" } : undefined) },
    });
    const one = rig.drop(simple("one@example.org", ["a@example.net"]));
    const two = rig.drop(simple("two@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 1, deferred: 1, bounced: 0, messages: 2 });
    tt.equal(rig.server.messages.length, 1);
    const delivered = rig.server.messages[0].from === "one@example.org" ? one : two;
    const other = delivered === one ? two : one;
    tt.same(rig.where(delivered), [], "the finished one is removed");
    tt.same(rig.where(other), ["deferred"], "the unfinished one waits in deferred/");
    const outcomes = checkLog(tt, rig);
    tt.match(outcomes.find((o) => o.id === delivered), { status: "sent" });
    tt.match(outcomes.find((o) => o.id === other), { status: "deferred" });
    tt.match(outcomes.find((o) => o.id === other)?.text ?? "", /^lost connection with \S+ while sending MAIL FROM/);
  });
});

t.test("10. garbage and a reply split byte by byte", async (tt) => {
  await tt.test("garbage to MAIL: deferred with a protocol error", async (tt) => {
    const rig = await setup(tt, { script: { mail: () => ({ action: "raw", bytes: "hello world\r\n" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 1);
    tt.equal(outcomes[0].status, "deferred");
    tt.match(outcomes[0].text, /protocol/i, "a protocol error");
    tt.match(outcomes[0].text, /hello world/, "quoting what the server said");
    tt.same(rig.errors, []);
  });

  for (const variant of PIPELINING_VARIANTS) await tt.test(`greeting, EHLO, MAIL, RCPT and dot replies split byte by byte, ${variant.name}: delivered`, async (tt) => {
    const bytes = (text: string) => ({ action: "raw" as const, chunks: [...text], delayMs: 1 });
    const rig = await setup(tt, {
      script: {
        greeting: bytes("220 split.test ESMTP\r\n"),
        ehlo: bytes(`250-split.test\r\n${variant.pipelining ? "250-PIPELINING\r\n" : ""}250-SIZE 100000\r\n250 8BITMIME\r\n`),
        mail: () => bytes("250 2.1.0 Ok\r\n"),
        rcpt: () => bytes("250 2.1.5 Ok\r\n"),
        onData: () => bytes("250 2.0.0 Ok: queued as SPLIT\r\n"),
      },
    });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 1, deferred: 0, bounced: 0 });
    tt.same(rig.where(id), []);
    tt.equal(rig.server.messages.length, 1);
    const outcomes = checkLog(tt, rig);
    tt.match(outcomes[0], { status: "sent", dsn: "2.0.0", text: "250 2.0.0 Ok: queued as SPLIT" });
    tt.match(mailCommands(rig.server.sessions[0])[0], /SIZE=\d+/, "the split EHLO reply was understood (SIZE)");
    tt.same(rig.server.sessions[0].pipeliningViolations, [], "no pipelining violation");
  });
});

t.test("11. a stage that never answers: timed out, deferred", async (tt) => {
  const silentFrom = (verb: string): Script["onCommand"] => {
    let silent = false;
    return (c) => {
      if (new RegExp(`^${verb}\\b`, "i").test(c)) silent = true;
      return silent ? { action: "silence" } : undefined;
    };
  };
  const cases: Array<{ name: string; script: Script; label: RegExp }> = [
    { name: "greeting", script: { greeting: { action: "silence" } }, label: /timed out while receiving the initial server greeting/ },
    { name: "MAIL", script: { onCommand: silentFrom("MAIL") }, label: /timed out while sending MAIL FROM/ },
    { name: "DATA", script: { onCommand: silentFrom("DATA") }, label: /timed out while sending DATA command/ },
    { name: "dot", script: { onData: () => ({ action: "silence" }) }, label: /timed out while sending end of data -- message may be sent more than once/ },
  ];
  for (const c of cases) {
    await tt.test(c.name, async (tt) => {
      const rig = await setup(tt, { script: c.script });
      const content = simple("a@example.org", ["b@example.net"]);
      const id = rig.drop(content);
      const started = Date.now();
      const summary = await rig.flush();
      const took = (Date.now() - started) / 1000;
      tt.ok(took < 4.5, `flush ended in ${took} s`);
      tt.ok(took >= 0.9, `after the 1 s timeout (${took} s)`);
      tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
      tt.same(rig.where(id), ["deferred"], "in deferred/ only");
      tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content);
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 1);
      tt.equal(outcomes[0].status, "deferred");
      tt.match(outcomes[0].text, c.label);
      tt.same(rig.errors, []);
    });
  }
});

t.test("12. SIZE and 8BITMIME", async (tt) => {
  await tt.test("SIZE 10000, a 15000-byte message: bounced without MAIL", async (tt) => {
    // The limit leaves room for the DSN (a few kB), which goes through the same server.
    const rig = await setup(tt, { script: { size: 10000 } });
    const file = queueFile("a@example.org", ["b@example.net"], `Subject: big\n\n${`${"y".repeat(99)}\n`.repeat(150)}`);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 2 });
    tt.same(rig.where(id), [], "removed");
    tt.same(rig.server.sessions.flatMap(testMails), [], "no MAIL sent for the message");
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 1);
    tt.match(outcomes[0], { status: "bounced", dsn: "5.3.4", relay: rig.relay });
    tt.match(outcomes[0].text, /size limit 10000/, "names the size limit");
    tt.match(rig.events.bounced, [{ queueId: id, recipient: "b@example.net", code: 552, dsn: "5.3.4" }]);
    tt.equal(rig.events.bounced.length, 1, "one bounced event");
    // No server refused anything: the engine found the limit in the EHLO reply.
    expectDsn(tt, rig, { id, sender: "a@example.org", file, failed: [{ rcpt: "b@example.net", status: "5.3.4" }] });
  });

  await tt.test("SIZE: an oversized message pipelined behind a small one on the same connection", async (tt) => {
    // The big one is queued (send() while the flush runs) while the small one waits for its
    // 354, so the engine takes it in endOfData() and starts it pipelined behind the small
    // message's dot: the small message's dot reply must still be awaited and settled.
    let engine: MailEngine | null = null;
    let bigId = "";
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: {
        // Room for the DSN the big one makes, which goes through the same server.
        size: 10000,
        onCommand: async (c, s) => {
          if (c !== "DATA" || !inTestTransaction(s) || testMails(s).length !== 1 || !engine) return undefined;
          bigId = await engine.send({ from: "big@example.org", to: "b@example.net", subject: "big", text: "z".repeat(50000) });
          await sleep(300);
          return undefined;
        },
      },
    });
    engine = rig.engine;
    const small = rig.drop(simple("small@example.org", ["b@example.net"]));
    const summary = await rig.flush(4000).catch((err: Error) => {
      tt.fail(`flush did not end: ${err.message}; spool: ${JSON.stringify(Object.fromEntries(FOLDERS.map((f) => [f, rig.files(f)])))}; ` +
        `log: ${JSON.stringify(rig.lines)}; server: ${rig.server.transcripts()}`);
      return null;
    });
    tt.ok(bigId, "the big message was queued during the flush");
    tt.equal(rig.originals().length, 1, "the small message was accepted by the server");
    tt.equal(rig.originals()[0]?.from, "small@example.org");
    tt.match(rig.events.bounced, [{ queueId: bigId, dsn: "5.3.4" }], "the big one bounced on the size limit");
    tt.equal(rig.events.bounced.length, 1, "one bounced event");
    const dsnId = expectDsn(tt, rig, {
      id: bigId, sender: "big@example.org", failed: [{ rcpt: "b@example.net", status: "5.3.4" }],
      headerLines: [/^From: big@example\.org$/m, /^To: b@example\.net$/m, /^Subject: big$/m],
    });
    const sent = rig.events.sent.filter((e) => e.queueId !== dsnId);
    tt.match(sent, [{ queueId: small, recipient: "b@example.net" }], "the small one got its sent outcome");
    tt.equal(sent.length, 1, "one sent event besides the DSN's");
    tt.same(rig.where(small), [], "the small one, accepted by the server, left the queue");
    // The small one and the big one's DSN sent, the big one bounced.
    if (summary) tt.match(summary, { sent: 2, bounced: 1, deferred: 0, messages: 3 });
    stopTried.add(rig.engine);
    const stopped = await bounded(rig.engine.stop(), 2000, "engine.stop()").then(() => true, () => false);
    tt.ok(stopped, "stop() resolves");
    tt.same(rig.files("outgoing_active"), [], "nothing left in outgoing_active/ after stop()");
  });

  await tt.test("8BITMIME: BODY=8BITMIME for an 8-bit body when offered, not for 7-bit", async (tt) => {
    const rig = await setup(tt, { engine: { maxConnections: 1 } });
    const eight = rig.drop(Buffer.concat([Buffer.from("e8@example.org\nb@example.net\nSubject: 8\n\ncaf"), Buffer.from([0xc3, 0xa9]), Buffer.from(" \xff\n", "latin1")]));
    rig.drop(simple("s7@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 2, deferred: 0, bounced: 0 });
    const cmds = mailCommands(rig.server.sessions[0]);
    tt.match(cmds.find((c) => c.includes("<e8@")), /^MAIL FROM:<e8@example\.org> SIZE=\d+ BODY=8BITMIME$/);
    tt.notMatch(cmds.find((c) => c.includes("<s7@")), /BODY=/);
    const m8 = rig.server.messages.find((m) => m.from === "e8@example.org");
    tt.ok(m8?.data.includes(Buffer.from([0x63, 0x61, 0x66, 0xc3, 0xa9, 0x20, 0xff, 0x0d, 0x0a])), "8-bit bytes went through untouched");
    tt.same(rig.where(eight), []);
  });

  await tt.test("8BITMIME not offered: no BODY= parameter", async (tt) => {
    const rig = await setup(tt, { script: { withoutExtensions: ["8BITMIME"] } });
    rig.drop(Buffer.concat([Buffer.from("e8@example.org\nb@example.net\nSubject: 8\n\ncaf"), Buffer.from([0xc3, 0xa9, 0x0a])]));
    await rig.flush();
    tt.notMatch(mailCommands(rig.server.sessions[0])[0], /BODY=/);
  });
});

t.test("13. corrupt queue files go to corrupt/, the good ones are delivered", async (tt) => {
  const rig = await setup(tt);
  const noRcptLine = rig.drop("alice@example.org");
  const emptyRcpt = rig.drop("alice@example.org\n\nSubject: x\n\nbody\n");
  const notAddress = rig.drop("alice@example.org\nnot-an-address\nSubject: x\n\nbody\n");
  const control = rig.drop("alice@example.org\nok@example.net, bad\x01x@example.net\nSubject: x\n\nbody\n");
  const good1 = rig.drop(simple("a@example.org", ["b@example.net"]));
  const good2 = rig.drop(simple("c@example.org", ["d@example.net"]));
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, deferred: 0, bounced: 0, corrupt: 4 });
  for (const id of [noRcptLine, emptyRcpt, notAddress, control]) tt.same(rig.where(id), ["corrupt"], `${id} in corrupt/ only`);
  for (const id of [good1, good2]) tt.same(rig.where(id), [], `${id} delivered and removed`);
  tt.equal(rig.server.messages.length, 2);
  const reason = (id: string) => rig.lines.find((l) => l.includes(` mudmail/qmgr[`) && l.includes(`: ${id}: corrupt queue file moved to corrupt/${id}: `));
  tt.match(reason(noRcptLine), /no recipient line$/);
  tt.match(reason(emptyRcpt), /no recipients$/);
  tt.match(reason(notAddress), /bad recipient "not-an-address": not of the form addr@domain$/);
  tt.match(reason(control), /control character in address$/);
  tt.notMatch(reason(control) ?? "", /[\x00-\x1f]/, "no control byte in the log line");
  tt.equal(rig.errors.length, 4, "an error event per corrupt file");
  for (const e of rig.errors) tt.match(e, { name: "MailError", code: "ECORRUPT" });
  checkLog(tt, rig);
});

t.test("14. connect failures: nothing listening", async (tt) => {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const deadPort = (probe.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));

  // Count connection attempts and failures: wrap node:net's connect for the ESM importers too.
  const realConnect = net.connect;
  const seq: Array<"attempt" | "failure"> = [];
  (net as unknown as { connect: typeof net.connect }).connect = ((...args: Parameters<typeof net.connect>) => {
    const socket = realConnect(...args);
    const opts = args[0] as unknown as net.TcpNetConnectOpts;
    if (typeof opts === "object" && opts.port === deadPort) {
      seq.push("attempt");
      socket.once("error", () => seq.push("failure"));
    }
    return socket;
  }) as typeof net.connect;
  syncBuiltinESMExports();
  tt.teardown(() => {
    (net as unknown as { connect: typeof net.connect }).connect = realConnect;
    syncBuiltinESMExports();
  });

  const rig = await setup(tt, { relay: `127.0.0.1:${deadPort}` });
  const ids = Array.from({ length: 10 }, (_, i) => rig.drop(simple(`s${i}@example.org`, [`r${i}@example.net`, `q${i}@example.net`])));
  const started = Date.now();
  const summary = await rig.flush();
  const took = (Date.now() - started) / 1000;
  tt.ok(took < 2, `flush ended quickly (${took} s)`);
  tt.match(summary, { sent: 0, deferred: 10, bounced: 0, corrupt: 0, messages: 10, recipients: 20 });
  for (const id of ids) tt.same(rig.where(id), ["deferred"], `${id} waits in deferred/`);
  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.length, 20);
  for (const o of outcomes) {
    tt.equal(o.relay, "none", "relay=none");
    tt.equal(o.status, "deferred");
    tt.match(o.line, /status=deferred \(.*Connection refused.*\)$/);
  }
  const attempts = seq.filter((x) => x === "attempt").length;
  tt.comment(`connection attempts to the dead port: ${seq.join(", ")}`);
  tt.ok(attempts >= 2, `the spy saw the attempts (${attempts})`);
  const secondFailure = seq.indexOf("failure", seq.indexOf("failure") + 1);
  tt.ok(secondFailure > 0, "two failures");
  tt.notOk(seq.slice(secondFailure).includes("attempt"), "no connection attempt after the second failure");
  tt.equal(attempts, 2, `two failed connects end the tick (${attempts} attempts for 10 messages)`);
});

t.test("15. recipient limit: 120 recipients in 3 transactions of at most 50", async (tt) => {
  const rig = await setup(tt, { engine: { maxConnections: 1 } });
  const rcpts = Array.from({ length: 120 }, (_, i) => `r${i}@example.net`);
  const id = rig.drop(simple("a@example.org", rcpts));
  const summary = await rig.flush();
  tt.match(summary, { sent: 1, deferred: 0, bounced: 0, messages: 1, recipients: 120 });
  tt.same(rig.where(id), []);
  const sessions = rig.server.sessions;
  tt.equal(sessions.flatMap(mailCommands).length, 3, "three MAIL commands");
  tt.same(rig.server.messages.map((m) => m.to.length).sort((x, y) => x - y), [20, 50, 50], "50 + 50 + 20 recipients");
  tt.same(rig.server.messages.flatMap((m) => m.to).sort(), [...rcpts].sort(), "every recipient once");
  const data = rig.server.messages.map((m) => m.data.toString("latin1"));
  tt.ok(data.every((d) => d === data[0]), "the same data in each transaction");
  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.filter((o) => o.status === "sent").length, 120);
});

t.test("16. events carry their fields; an error without listener never throws", async (tt) => {
  await tt.test("sent / deferred / bounced events", async (tt) => {
    const rig = await setup(tt, {
      script: { rcpt: (a) => (a.startsWith("later") ? "452 4.5.3 Too many recipients" : a.startsWith("never") ? "553 5.1.3 Bad address" : undefined) },
    });
    const file = simple("a@example.org", ["now@example.net", "later@example.net", "never@example.net"]);
    const id = rig.drop(file);
    await rig.flush();
    // never@'s 553 makes a DSN to a@example.org, sent in the same flush: its "sent" event is checked apart.
    const dsnId = expectDsn(tt, rig, {
      id, sender: "a@example.org", file, failed: [{ rcpt: "never@example.net", status: "5.1.3", diagnostic: "553 5.1.3 Bad address" }],
    });
    // Issue 4 (7): the events carry the enhanced status under that name, and the server's reply alone.
    const keys = ["queueId", "recipient", "status", "code", "dsn", "enhanced", "text", "reply", "relay"];
    for (const [status, rcpt, code, dsn, reply] of [
      ["sent", "now", 250, "2.0.0", /^250 2\.0\.0 Ok: queued as \d+$/],
      ["deferred", "later", 452, "4.5.3", "452 4.5.3 Too many recipients"],
      ["bounced", "never", 553, "5.1.3", "553 5.1.3 Bad address"],
    ] as const) {
      const list = rig.events[status].filter((e) => e.queueId !== dsnId);
      tt.equal(list.length, 1, `one ${status} event`);
      tt.same(Object.keys(list[0]).sort(), [...keys].sort(), `${status} event fields`);
      tt.match(list[0], { queueId: id, recipient: `${rcpt}@example.net`, status, code, dsn, enhanced: dsn, reply, relay: rig.relay });
      tt.ok(list[0].text.length > 0, "with text");
    }
    checkLog(tt, rig, { dsns: 1 });
  });

  await tt.test("a corrupt file with no error listener", async (tt) => {
    const rig = await setup(tt, { errorListener: false });
    tt.equal(rig.engine.listenerCount("error"), 0);
    const bad = rig.drop("nobody-here\n");
    const good = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { corrupt: 1, sent: 1 }, "flush resolves, counts the corrupt file");
    tt.same(rig.where(bad), ["corrupt"]);
    tt.same(rig.where(good), []);
    tt.ok(rig.lines.some((l) => l.includes(`${bad}: corrupt queue file moved to corrupt/`)), "logged");
  });

  await tt.test("with a listener: a MailError with code and queue id", async (tt) => {
    const rig = await setup(tt);
    const bad = rig.drop("x@example.org\nnot-an-address\n\n");
    await rig.flush();
    tt.equal(rig.errors.length, 1);
    tt.ok(rig.errors[0] instanceof MailError);
    tt.match(rig.errors[0], { code: "ECORRUPT", details: { queueId: bad } });
  });
});

t.test("17. a message from the null sender that fails for good: bounced, never answered with a DSN", async (tt) => {
  const rig = await setup(tt, {
    script: { rcpt: (a) => (a === "gone@example.net" ? "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown" : undefined) },
  });
  // Line 1 "<>": a message from the null sender (a DSN of another system, say).
  const file = queueFile("<>", ["gone@example.net"], SIMPLE_BODY.replace("From: a@example.org", "From: MAILER-DAEMON@example.org"));
  const id = rig.drop(file);
  const summary = await rig.flush();
  tt.match(summary, { sent: 0, deferred: 0, bounced: 1, corrupt: 0, messages: 1, recipients: 1 }, "bounced, and no DSN queued or sent");
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: nothing queued for the null sender`);

  const outcomes = checkLog(tt, rig, { dsns: 0 });
  tt.equal(outcomes.length, 1, "one outcome line");
  tt.match(outcomes[0], { id, to: "gone@example.net", status: "bounced", dsn: "5.1.1", relay: rig.relay });
  tt.match(outcomes[0]?.text ?? "", /^host \S+ said: 550 5\.1\.1 <gone@example\.net>: Recipient address rejected: User unknown \(in reply to RCPT TO command\)$/);
  tt.match(rig.events.bounced, [{ queueId: id, recipient: "gone@example.net", status: "bounced", code: 550, dsn: "5.1.1" }]);
  tt.equal(rig.events.bounced.length, 1, "one bounced event");
  tt.same(rig.events.sent, [], "no sent event: no DSN went anywhere");
  tt.same(rig.events.deferred, []);
  tt.equal(rig.lines.filter((l) => droppedLine(id).test(l)).length, 1, "logged: dropped, not bounced");
  tt.notOk(rig.lines.some((l) => NOTIFICATION_LINE.test(l)), "no sender non-delivery notification line");
  tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), "removed");
  tt.same(rig.errors, [], "no error event");

  // The server saw the one transaction, MAIL FROM:<>, refused at RCPT, and nothing after it.
  const check = (when: string) => {
    tt.same(rig.server.sessions.flatMap(mailCommands).map((c) => c.replace(/^(MAIL FROM:<[^>]*>).*$/i, "$1")), ["MAIL FROM:<>"], `one MAIL, from <> (${when})`);
    tt.same(rig.server.sessions.flatMap((s) => rcptsOf(s, true)), ["RCPT TO:<gone@example.net>"], `one RCPT (${when})`);
    tt.same(rig.server.messages, [], `no message accepted (${when})`);
    tt.same(rig.server.sessions.flatMap((s) => s.unaccepted), [], `no message data sent (${when})`);
  };
  check("after the flush");
  await sleep(300);
  check("a moment later");
  tt.match(await rig.flush(), { sent: 0, deferred: 0, bounced: 0, messages: 0 }, "a second flush finds nothing to send");
  check("after a second flush");
});

t.test("18. 452 4.5.3 too many recipients: the rest go in a new transaction at once", async (tt) => {
  const tooMany = "452 4.5.3 Error: too many recipients";
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(`2 recipients a transaction, ${variant.name}: 5 recipients in 3 transactions on one connection`, async (tt) => {
      const rig = await setup(tt, {
        script: { pipelining: variant.pipelining, rcpt: (_a, s) => (s.rcptTo.length >= 2 ? tooMany : undefined) },
      });
      const rcpts = Array.from({ length: 5 }, (_, i) => `r${i}@example.net`);
      const id = rig.drop(simple("a@example.org", rcpts));
      const summary = await rig.flush();
      tt.match(summary, { sent: 1, deferred: 0, bounced: 0, corrupt: 0, messages: 1, recipients: 5 }, "delivered to all in one flush");
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: nothing deferred`);
      tt.equal(rig.server.connections, 1, "one connection");
      const s = rig.server.sessions[0];
      await rig.server.waitFor(() => s.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
      tt.equal(mailCommands(s).length, 3, "three transactions");
      tt.same(rig.server.messages.map((m) => m.to), [["r0@example.net", "r1@example.net"], ["r2@example.net", "r3@example.net"], ["r4@example.net"]],
        "2 + 2 + 1 recipients, in order");
      tt.same(rig.server.messages.flatMap((m) => m.to).sort(), rcpts, "every recipient accepted once");
      const data = rig.server.messages.map((m) => m.data.toString("latin1"));
      tt.ok(data.every((d) => d === data[0]), "the same data in each transaction");
      tt.same(s.pipeliningViolations, [], "no pipelining violation");
      tt.equal(s.commands.at(-1), "QUIT", "QUIT is the last command");
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 5, "one outcome line per recipient: no deferred line for the 452s");
      tt.same(outcomes.map((o) => o.to).sort(), rcpts);
      for (const o of outcomes) tt.match(o, { id, status: "sent", dsn: "2.0.0", relay: rig.relay });
      tt.same(rig.events.deferred, [], "no deferred event");
      tt.same(rig.events.bounced, [], "no bounced event");
      tt.equal(rig.events.sent.length, 5);
      tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), "removed");
    });
  }

  await tt.test("452 4.5.3 to the very first RCPT: no progress, deferred, no endless loop", async (tt) => {
    const rig = await setup(tt, { script: { rcpt: () => tooMany } });
    const file = simple("a@example.org", ["r0@example.net", "r1@example.net"]);
    const id = rig.drop(file);
    const before = Date.now();
    const summary = await rig.flush(5000);
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0, messages: 1, recipients: 2 }, "deferred");
    tt.same(rig.where(id), ["deferred"], "in deferred/ only");
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), file, "file unchanged");
    const book = JSON.parse(fs.readFileSync(path.join(rig.maildir, "deferred", `.${id}`), "utf8")) as Record<string, unknown>;
    tt.equal(book.attempts, 1, "bookkeeping: one attempt");
    tt.ok(typeof book.nextAttempt === "number" && book.nextAttempt >= before + 300_000, `bookkeeping: next attempt after the 300 s minimum backoff (${book.nextAttempt})`);
    tt.match(String(book.lastError), /452 4\.5\.3 Error: too many recipients/, "bookkeeping: the last error");
    tt.equal(rig.server.sessions.flatMap(mailCommands).length, 1, "one transaction: none more without progress");
    tt.equal(rig.server.connections, 1, "one connection");
    tt.same(rig.server.sessions.flatMap((s) => [...s.messages, ...s.unaccepted]), [], "no message data sent");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2, "both recipients deferred");
    for (const o of outcomes) {
      tt.match(o, { id, status: "deferred", dsn: "4.5.3", relay: rig.relay });
      tt.match(o.text, /said: 452 4\.5\.3 Error: too many recipients \(in reply to RCPT TO command\)$/);
    }
    tt.equal(rig.events.deferred.length, 2);
    tt.ok(rig.events.deferred.every((e) => e.code === 452), "deferred events carry code 452");
    tt.match(await rig.flush(), { sent: 0, deferred: 0, messages: 0 }, "not due yet: a plain flush leaves it waiting");
    tt.equal(rig.server.connections, 1, "and does not connect");
  });
});
