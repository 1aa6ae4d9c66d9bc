/*
 * NAME
 *   mail.ts - the mudmail engine: connection slots, the SMTP stage machine, the CLI
 *
 * SYNOPSIS
 *   const mail = new MailEngine({ maildir: "maildir", relay: "smtp.example.org:587" });
 *   const id = await mail.send({ from, to, subject, text });
 *   mail.tick();           // check_smtp(): from the host's own one-minute loop, or
 *   mail.start();          // the engine's own timer; await mail.flush(); await mail.stop();
 *
 *   node dist/mail.js [--flush [--force] | --queue [--json] | --send -f FROM RCPT...] [OPTIONS]
 *
 * DESCRIPTION
 *   The talker's mail subsystem in one event loop. A tick (every 60 s, and at once when
 *   mail is queued through the engine) reads outgoing/ once, and opens connections into a
 *   fixed number of slots while slots are free and mail is waiting, giving up for the tick
 *   after two failed connects. Each Slot is the talker's miscconn: one socket, a Stage that
 *   only moves forward (0 banner, 1 EHLO/HELO, 2 MAIL, 3 RCPT, 4 DATA, 5 body, then back to
 *   2 for the next message on the same connection), a timer armed on entering each stage,
 *   and a queue of the replies it waits for, so pipelined commands and their replies pair up
 *   whatever the packet boundaries. A Delivery is one claimed queue file: its recipients and
 *   the outcome of each; a Job is the part of a delivery that goes to one destination in
 *   one transaction.
 *
 *   Data walks one way: queue file -> claim -> Job -> Slot (stages) -> outcome per recipient
 *   -> Spool (complete | rewrite + release | quarantine) -> log line and event.
 *
 * DIAGNOSTICS
 *   One log line per recipient outcome, shaped like Postfix's smtp(8) lines; events "sent",
 *   "deferred", "bounced" for the host program, and "error" (only when it has a listener).
 *   A message that cannot be parsed is moved to corrupt/ with the reason logged. A session
 *   that fails defers what it was carrying; a message is never lost and never in two folders.
 *
 * BUGS
 *   TLS and AUTH options are parsed and checked but not used yet: mail goes in plaintext.
 *   Postfix's rarer controls (fallback relay, loop detection, DSN parameters) likewise.
 */

import { EventEmitter } from "node:events";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import {
  MailError, STAGE_TIMEOUTS, xtext, classify, dsnStatus, printable, replyText,
  type Extensions, type Reply,
} from "./smtp-codes.js";
import { Router, type Hop, type Route } from "./route.js";
import { vrfy, expn, help } from "./client.js";
import { SmtpConnection, STEPS, type ConnectionOptions, type Credentials, type Hello, type Step, type TlsMode } from "./smtp-connection.js";
import { startServer, checkServerOptions, type ServerOptions } from "./receiver.js";
import { composeBounce, composeNotice } from "./bounce.js";
import { loadDkimKeys, signByFrom, generateDkimKey, dnsRecord, spfRecord, dmarcRecord, checkDomain, formatCheck, DkimConfigError, type DkimKey } from "./dkim.js";
import {
  Spool, CorruptMessageError, SpoolError, addressProblem, measureWire, wireChunks, errno,
  type Bookkeeping, type DsnRequest, type HeaderFacts, type QueuedMessage, type Wire,
} from "./queue.js";

export const VERSION = "0.1.0";

// The receiver (--serve) and the direct client (scsh's sendmail, VRFY, EXPN, HELP) are part of the library entry.
export { startServer } from "./receiver.js";
export type { ServerOptions, ServerHandle, StoredMessage } from "./receiver.js";
export { sendmail, vrfy, expn, help, smtpTransactions, SmtpSession } from "./client.js";
export type { Answer, Loser, SendmailResult, SendmailOptions, ClientOptions } from "./client.js";

/* ------------------------------------------------------------------------------------ */
/* Options                                                                               */

export type { TlsMode };
export { MailError };
export type { MailErrorDetails } from "./smtp-codes.js";

/** Every flag of SPEC section 3 in camelCase; later issues give the rest their behaviour. */
export interface MailOptions {
  maildir?: string;
  relay?: string | null;
  port?: number;
  resolver?: string | null;
  maxConnections?: number;
  helo?: string;
  tls?: TlsMode;
  tlsCa?: string | null;
  /** Implicit TLS from the first byte (SMTPS, port 465); a relay on port 465 implies it. */
  tlsWrapper?: boolean;
  /** USER:PASS for SMTP AUTH to the relay (MUDMAIL_AUTH on the command line). */
  auth?: string | null;
  /** An OAuth 2.0 bearer token for AUTH XOAUTH2 (MUDMAIL_XOAUTH2 on the command line). */
  xoauth2Token?: string | null;
  /** A file to append log lines to, or a function that takes each line; default stderr. */
  log?: string | ((line: string) => void) | null;
  connectTimeout?: number;
  heloTimeout?: number;
  mailTimeout?: number;
  rcptTimeout?: number;
  dataInitTimeout?: number;
  dataXferTimeout?: number;
  dataDoneTimeout?: number;
  quitTimeout?: number;
  minBackoff?: number;
  maxBackoff?: number;
  maxQueueLifetime?: number;
  fallbackRelay?: string | null;
  inetInterfaces?: string[] | null;
  bestMxRelay?: string | null;
  ignoreMxLookupError?: boolean;
  disableDnsLookups?: boolean;
  skipQuitResponse?: boolean;
  notifyClasses?: string[];
  postmaster?: string | null;
  debugPeer?: string[];
  delayWarning?: number | null;
  /** Recipients per transaction (smtp_destination_recipient_limit). */
  recipientLimit?: number;
  /** Connections per destination (default_destination_concurrency_limit). */
  destinationConcurrencyLimit?: number;
  /** Seconds between ticks when the engine keeps its own timer. */
  tickInterval?: number;
  /** fsync queue files when they are written (default true). */
  fsync?: boolean;
  /** Seconds a DNS query may take per try (two tries); an embedding option, no flag. */
  dnsTimeout?: number;
  /** DKIM signing: one key (--dkim-domain, --dkim-selector, --dkim-key) or a key table (--dkim-keys). */
  dkimDomain?: string | null;
  dkimSelector?: string | null;
  dkimKey?: string | null;
  dkimKeys?: string | null;
}

type Resolved = Required<Omit<MailOptions, "log">> & { log: MailOptions["log"] };

const DEFAULTS: Resolved = {
  maildir: "./maildir", relay: null, port: 25, resolver: null, maxConnections: 5,
  helo: os.hostname(), tls: "may", tlsCa: null, tlsWrapper: false, auth: null, xoauth2Token: null, log: null,
  connectTimeout: STAGE_TIMEOUTS.connect, heloTimeout: STAGE_TIMEOUTS.helo, mailTimeout: STAGE_TIMEOUTS.mail,
  rcptTimeout: STAGE_TIMEOUTS.rcpt, dataInitTimeout: STAGE_TIMEOUTS.dataInit, dataXferTimeout: STAGE_TIMEOUTS.dataXfer,
  dataDoneTimeout: STAGE_TIMEOUTS.dataDone, quitTimeout: STAGE_TIMEOUTS.quit,
  minBackoff: 300, maxBackoff: 4000, maxQueueLifetime: 432000,
  fallbackRelay: null, inetInterfaces: null, bestMxRelay: null, ignoreMxLookupError: false,
  disableDnsLookups: false, skipQuitResponse: true, notifyClasses: ["resource", "software"],
  postmaster: null, debugPeer: [], delayWarning: null,
  recipientLimit: 50, destinationConcurrencyLimit: 20, tickInterval: 60, fsync: true, dnsTimeout: 5,
  dkimDomain: null, dkimSelector: null, dkimKey: null, dkimKeys: null,
};

/** A bad option: names the flag, exits 2 from the command line. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

function checkOptions(input: MailOptions): Resolved {
  const o = { ...DEFAULTS } as Resolved;
  for (const [key, value] of Object.entries(input)) if (value !== undefined) (o as Record<string, unknown>)[key] = value;
  const positive = (key: keyof MailOptions, flag: string, max = 1e9) => {
    const v = o[key] as unknown;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0 || v > max) {
      throw new UsageError(`${flag}: expected a positive number${max < 1e9 ? ` up to ${max}` : ""}, got ${JSON.stringify(v)}`);
    }
  };
  positive("maxConnections", "--max-connections", 1000);
  if (!Number.isInteger(o.maxConnections)) throw new UsageError(`--max-connections: expected a whole number, got ${o.maxConnections}`);
  positive("port", "--port", 65535);
  for (const [key, flag] of TIMEOUT_FLAGS) positive(key, flag);
  positive("minBackoff", "--min-backoff");
  positive("maxBackoff", "--max-backoff");
  positive("maxQueueLifetime", "--max-queue-lifetime");
  positive("recipientLimit", "recipientLimit");
  positive("destinationConcurrencyLimit", "destinationConcurrencyLimit");
  positive("tickInterval", "tickInterval");
  positive("dnsTimeout", "dnsTimeout");
  if (o.maxBackoff < o.minBackoff) throw new UsageError(`--max-backoff (${o.maxBackoff}) is less than --min-backoff (${o.minBackoff})`);
  if (!["none", "may", "encrypt", "verify"].includes(o.tls)) throw new UsageError(`--tls: expected none, may, encrypt or verify, got ${JSON.stringify(o.tls)}`);
  for (const [key, flag] of [["relay", "--relay"], ["fallbackRelay", "--fallback-relay"], ["bestMxRelay", "--best-mx-relay"]] as const) {
    if (o[key] != null) parseHostPort(String(o[key]), flag, 25);
  }
  if (o.resolver != null) parseHostPort(o.resolver, "--resolver", 53, true);
  for (const entry of o.inetInterfaces ?? []) {
    if (!["all", "loopback-only"].includes(entry) && !net.isIP(entry)) {
      throw new UsageError(`--inet-interfaces: expected all, loopback-only or IP addresses, got ${JSON.stringify(entry)}`);
    }
  }
  if (o.delayWarning != null) positive("delayWarning", "--delay-warning");
  if (!o.helo || /[\s<>\x00-\x1f]/.test(o.helo)) throw new UsageError(`--helo: not a host name: ${JSON.stringify(o.helo)}`);
  if (o.postmaster != null && addressProblem(o.postmaster)) throw new UsageError(`--postmaster: ${addressProblem(o.postmaster)}`);
  const classes = ["bounce", "delay", "protocol", "resource", "software", "policy"];
  for (const c of o.notifyClasses) if (!classes.includes(c)) throw new UsageError(`--notify-classes: unknown class ${JSON.stringify(c)} (expected ${classes.join(", ")})`);
  if (o.auth != null && !o.auth.includes(":")) throw new UsageError("--auth: expected USER:PASS");
  if ((o.auth != null || o.xoauth2Token != null) && !o.relay) throw new UsageError("--auth needs --relay: credentials go to a relay, never to MX hosts");
  if (o.xoauth2Token != null && !o.auth) throw new UsageError("XOAUTH2 needs the user name: --auth USER: or MUDMAIL_AUTH=USER: with the token in MUDMAIL_XOAUTH2");
  // With credentials, the default is to check the relay's certificate (SPEC section 3).
  if ((o.auth != null || o.xoauth2Token != null) && input.tls === undefined) o.tls = "verify";
  if (o.tlsCa != null) {
    try {
      fs.accessSync(o.tlsCa, fs.constants.R_OK);
    } catch (err) {
      throw new UsageError(`--tls-ca: cannot read ${o.tlsCa}: ${(err as Error).message}`);
    }
  }
  if (o.disableDnsLookups && !o.relay) throw new UsageError("--disable-dns-lookups needs --relay: without DNS, mail can only go to a relay");
  return o;
}

const TIMEOUT_FLAGS: ReadonlyArray<readonly [keyof MailOptions, string]> = [
  ["connectTimeout", "--connect-timeout"], ["heloTimeout", "--helo-timeout"], ["mailTimeout", "--mail-timeout"],
  ["rcptTimeout", "--rcpt-timeout"], ["dataInitTimeout", "--data-init-timeout"], ["dataXferTimeout", "--data-xfer-timeout"],
  ["dataDoneTimeout", "--data-done-timeout"], ["quitTimeout", "--quit-timeout"],
];

/** HOST[:PORT] or [IPv6]:PORT. */
export function parseHostPort(text: string, flag: string, defaultPort: number, ipOnly = false): { host: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s\[\]]+))(?::(\d{1,5}))?$/.exec(text) ?? /^([0-9A-Fa-f:]+:[0-9A-Fa-f:]*)$/.exec(text);
  if (!m) throw new UsageError(`${flag}: expected HOST[:PORT], got ${JSON.stringify(text)}`);
  const host = m[1] ?? m[2];
  const port = m[3] ? Number(m[3]) : defaultPort;
  if (!(port >= 1 && port <= 65535)) throw new UsageError(`${flag}: port out of range in ${JSON.stringify(text)}`);
  if (ipOnly && !net.isIP(host)) throw new UsageError(`${flag}: expected an IP address, got ${JSON.stringify(host)}`);
  if (!ipOnly && !net.isIP(host) && !/^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$/.test(host)) {
    throw new UsageError(`${flag}: not a host name: ${JSON.stringify(host)}`);
  }
  return { host, port };
}

/* ------------------------------------------------------------------------------------ */
/* Errors and outcomes                                                                   */

/**
 * inet_interfaces: the addresses this machine receives mail on, so an MX list that leads
 * back here is cut. "all" (the default) is every interface's address; "loopback-only" is
 * 127.0.0.1 and ::1; anything else is a list of addresses.
 */
function ownAddresses(setting: string[] | null): Set<string> {
  const list = setting ?? ["all"];
  if (list.length === 1 && list[0] === "loopback-only") return new Set(["127.0.0.1", "::1"]);
  if (list.length === 1 && list[0] === "all") {
    return new Set(Object.values(os.networkInterfaces()).flatMap((addrs) => (addrs ?? []).map((a) => a.address)));
  }
  return new Set(list);
}

/** Every form a credential could take on the wire, so none of them is ever logged. */
function secretForms(c: Credentials | null): string[] {
  if (!c) return [];
  const b64 = (text: string) => Buffer.from(text, "utf8").toString("base64");
  const forms = [c.password, b64(c.password), b64(`\0${c.user}\0${c.password}`)];
  if (c.token) forms.push(c.token, b64(`user=${c.user}\x01auth=Bearer ${c.token}\x01\x01`));
  return forms;
}

export type Status = "sent" | "deferred" | "bounced";

/** What happened to one recipient in one attempt; the payload of the sent/deferred/bounced events. */
export interface Outcome {
  queueId: string;
  recipient: string;
  status: Status;
  /** SMTP reply code, or 0 when no server said anything (connect failure, timeout). */
  code: number;
  /** RFC 3463 status, "2.0.0", "4.4.1", ... (the log line's dsn=). */
  dsn: string;
  /** The same enhanced status code, under the name the events promise. */
  enhanced: string;
  /** The server's words or our reason, as in the log line. */
  text: string;
  /** The server's reply alone ("550 5.1.1 <u@d>: Recipient address rejected"), null when no server said anything. */
  reply: string | null;
  relay: string;
}

/** An outcome as the code that finds it out knows it; the engine fills in the rest. */
type OutcomeInput = Omit<Outcome, "enhanced" | "reply"> & { reply?: string | null };

export interface FlushSummary {
  sent: number;
  deferred: number;
  bounced: number;
  corrupt: number;
  /** Messages and recipients handled in the pass. */
  messages: number;
  recipients: number;
  seconds: number;
}

/* ------------------------------------------------------------------------------------ */
/* The log                                                                               */

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/** Postfix-shaped log lines: "<Mmm dd hh:mm:ss> <host> mudmail/<proc>[<pid>]: <text>". */
class MailLog {
  private readonly sink: (line: string) => void;
  private readonly stream: fs.WriteStream | null = null;
  private readonly host = os.hostname().split(".")[0];
  private stampSecond = -1;
  private stamp = "";

  constructor(target: MailOptions["log"]) {
    if (typeof target === "function") {
      this.sink = target;
    } else if (typeof target === "string") {
      const stream = fs.createWriteStream(target, { flags: "a", mode: 0o600 });
      stream.on("error", (err) => process.stderr.write(`mudmail: cannot write log ${target}: ${err.message}\n`));
      this.stream = stream;
      this.sink = this.batched((text) => stream.write(text));
    } else {
      this.sink = this.batched((text) => process.stderr.write(text));
    }
  }

  private pending: string[] = [];

  /** Lines written in one turn of the event loop go out in one write: three lines a message add up. */
  private batched(write: (text: string) => void): (line: string) => void {
    return (line) => {
      if (this.pending.length === 0) setImmediate(() => this.flushLines(write));
      this.pending.push(line);
    };
  }

  private flushLines(write: (text: string) => void): void {
    const text = this.pending.join("\n") + "\n";
    this.pending = [];
    write(text);
  }

  /** Words that must never reach the log (the password, the token, their base64 forms). */
  private secrets: string[] = [];

  redact(secrets: string[]): void {
    this.secrets = secrets.filter((x) => x.length >= 3);
  }

  write(proc: "smtp" | "qmgr", line: string): void {
    let text = line;
    for (const secret of this.secrets) if (text.includes(secret)) text = text.split(secret).join("<redacted>");
    const now = Date.now();
    const second = Math.floor(now / 1000);
    if (second !== this.stampSecond) {
      const d = new Date(now);
      const pad = (n: number) => String(n).padStart(2, "0");
      this.stamp = `${MONTHS[d.getMonth()]} ${String(d.getDate()).padStart(2, " ")} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
      this.stampSecond = second;
    }
    this.sink(`${this.stamp} ${this.host} mudmail/${proc}[${process.pid}]: ${text}`);
  }

  /** Lines still batched for this turn go out; the file stays open for a later start(). */
  async flush(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    // An empty write's callback runs once every write before it is on disk.
    if (this.stream && !this.stream.destroyed) await new Promise<void>((resolve) => this.stream!.write("", () => resolve()));
  }
}

/** Postfix's delay format: two significant decimals below 10 s, fewer above. */
function seconds(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s >= 100) return String(Math.round(s));
  if (s >= 10) return String(Math.round(s * 10) / 10);
  if (s < 0.01) return "0";
  return String(Math.round(s * 100) / 100);
}

/* ------------------------------------------------------------------------------------ */
/* Stages                                                                                */

/** The seed's stages, in the order a session walks them; only RSET and QUIT come back. */
export enum Stage { Connect = -1, Banner = 0, Helo = 1, Mail = 2, Rcpt = 3, Data = 4, Body = 5, Dot = 6, Rset = 7, Quit = 8 }

/** Per stage, the step of the conversation it is: its timeout, its label for errors (as Postfix's smtp_proto.c names them). */
const STAGES: Record<Stage, Step> = {
  [Stage.Connect]: STEPS.connect, [Stage.Banner]: STEPS.greeting, [Stage.Helo]: STEPS.ehlo, [Stage.Mail]: STEPS.mail,
  [Stage.Rcpt]: STEPS.rcpt, [Stage.Data]: STEPS.data, [Stage.Body]: STEPS.body, [Stage.Dot]: STEPS.dot,
  [Stage.Rset]: STEPS.rset, [Stage.Quit]: STEPS.quit,
};

/* ------------------------------------------------------------------------------------ */
/* Deliveries and jobs                                                                   */

/** One claimed queue file and what has become of each of its recipients in this attempt. */
class Delivery {
  readonly outcomes = new Map<string, Outcome>();
  openJobs = 0;
  /** settle() has begun: it runs once per delivery. */
  settling = false;
  /** Recipients delivered to a server that did not offer DSN (for NOTIFY=SUCCESS: "relayed"). */
  readonly sentWithoutDsn = new Set<string>();
  /** What settling decided, made once; its steps are done once each, retried until done. */
  settlement: Settlement | null = null;
  constructor(
    readonly msg: QueuedMessage,
    readonly wire: Wire,
    readonly prefix: Buffer,
    readonly claimedAt: number,
    readonly book: Bookkeeping | null,
    /** The folder it was claimed from, where an untried stop puts it back. */
    readonly from: "outgoing" | "deferred",
  ) {}
}

/**
 * The fate of a delivery, decided once when its last job is done: the reports still to queue
 * (each queued once), then the message leaves the queue, waits in deferred/ with `book`, or
 * goes back untried. A step that fails is tried again at the next tick, from where it stopped.
 */
interface Settlement {
  fate: "complete" | "defer" | "putBack";
  /** Recipients still to deliver (the queue file's line 2 after settling). */
  pending: string[];
  reports: Array<{ outcomes: Outcome[]; action: "failed" | "delayed" | "relayed" }>;
  /** For "defer": the bookkeeping to write; `warned` is filled by the "delayed" report. */
  book: Bookkeeping | null;
  bounced: boolean;
  /** Failed tries so far, for the log. */
  tries: number;
}

/** Deferred messages by the time they are due: a binary min-heap, so a tick takes only what is due. */
class DueHeap {
  private readonly items: Array<{ id: string; due: number }> = [];

  get size(): number {
    return this.items.length;
  }

  push(id: string, due: number): void {
    const items = this.items;
    items.push({ id, due });
    for (let i = items.length - 1; i > 0;) {
      const parent = (i - 1) >> 1;
      if (items[parent].due <= items[i].due) break;
      [items[parent], items[i]] = [items[i], items[parent]];
      i = parent;
    }
  }

  /** Removes and returns the earliest entry due at or before `now`, or null. */
  popDue(now: number): string | null {
    const items = this.items;
    if (items.length === 0 || items[0].due > now) return null;
    const top = items[0];
    const last = items.pop()!;
    if (items.length > 0) {
      items[0] = last;
      for (let i = 0; ;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < items.length && items[l].due < items[m].due) m = l;
        if (r < items.length && items[r].due < items[m].due) m = r;
        if (m === i) break;
        [items[m], items[i]] = [items[i], items[m]];
        i = m;
      }
    }
    return top.id;
  }
}

/** The recipients of one delivery that go to one destination in one transaction. */
class Job {
  /** When a slot began its transaction, and how long that slot took to connect and greet. */
  startedAt = 0;
  setupMs = 0;
  constructor(readonly delivery: Delivery, readonly destination: Destination, readonly recipients: string[]) {}
}

/** Where jobs go: the relay, or a domain's mail exchangers. Its counters live for one tick. */
class Destination {
  readonly jobs: Job[] = [];
  readonly waiters: Array<(job: Job | null) => void> = [];
  slots = 0;
  /** Slots that reached the MAIL stage; until one has, connect one at a time. */
  readySlots = 0;
  /** Connections that got no greeting from any address, this tick: at 2 the tick gives up on it. */
  failures = 0;
  /** Set for the rest of the tick once connecting failed twice: its jobs are deferred. */
  deadReason: string | null = null;
  lastError: string | null = null;
  /** The route, looked up once per tick; null until asked, "pending" while DNS answers. */
  route: Route | "pending" | null = null;
  constructor(readonly key: string) {}

  get hops(): Hop[] {
    return this.route && this.route !== "pending" && this.route.ok ? this.route.hops : [];
  }

  /** A new tick: route and failures are found out afresh. */
  reset(): void {
    this.failures = 0;
    this.deadReason = null;
    this.lastError = null;
    this.route = null;
  }
}

/** A transaction in flight on a slot. */
class Txn {
  readonly accepted: string[] = [];
  mailOk = false;
  /** The DATA reply was 354 and the body has been (or is being) sent. */
  inBody = false;
  /** The final dot went out: from now on the server may have the message (qmail's flagcritical). */
  dotSent = false;
  settled = false;
  /** Recipients the server had no room for (452 4.5.3): a new transaction takes them at once. */
  readonly overflow: string[] = [];
  overflowReply: Reply | null = null;
  constructor(readonly job: Job) {}
}

/** RFC 6531: a transaction whose envelope has an address that is not ASCII must say SMTPUTF8. */
function needsSmtpUtf8Address(sender: string, recipients: string[]): boolean {
  const ascii = (a: string) => /^[\x00-\x7f]*$/.test(a);
  return !ascii(sender) || recipients.some((r) => !ascii(r));
}

function needsSmtpUtf8(job: Job): boolean {
  return needsSmtpUtf8Address(job.delivery.msg.sender, job.recipients);
}

/** RFC 5321 section 4.5.3.1.10: "452 too many recipients" asks for another transaction, not a retry later. */
function tooManyRecipients(reply: Reply): boolean {
  return reply.code === 452 && (reply.enhanced === "4.5.3" || /too many recipients/i.test(reply.lines.join(" ")));
}

/* ------------------------------------------------------------------------------------ */
/* The slot: the talker's miscconn                                                       */

/** How a slot talks to one hop: decided by the engine from its options and what it remembers of the hop. */
interface Session {
  /** The connection's options but the transcript callback (TLS mode for this hop, timeouts, ...). */
  connection: Omit<ConnectionOptions, "onLine">;
  /** --debug-peer: every line is logged. */
  debug: boolean;
  /** notify_classes protocol: the last lines are kept for a postmaster notice. */
  transcript: boolean;
  /** AUTH to the relay, or null. */
  credentials: Credentials | null;
  /** smtp_skip_quit_response off: QUIT waits for its reply. */
  waitForQuit: boolean;
}

/** What a Slot needs of the engine, and all it may touch. */
interface SlotHost {
  readonly stopping: boolean;
  readonly spool: Spool;
  session(hop: Hop): Session;
  /* The scheduler: jobs for this slot's destination. */
  jobFor(dest: Destination, give: (job: Job | null) => void): void;
  jobNow(dest: Destination): Job | null;
  jobReturned(job: Job): void;
  retryNow(job: Job, recipients: string[]): void;
  jobDone(job: Job): void;
  slotReady(slot: Slot): void;
  slotFailedEarly(slot: Slot, reason: string): void;
  slotClosed(slot: Slot): void;
  /* What the session found out. */
  recordOutcome(job: Job, outcome: OutcomeInput): void;
  note(text: string): void;
  protocolNotice(peer: string, reason: string, transcript: string[]): void;
  tlsFailed(hop: Hop): void;
  plaintextUsed(hop: Hop): void;
  authRefused(reason: string, hop: Hop, reply: Reply): void;
}

/**
 * One connection slot: the talker's miscconn. It walks the stages of a session on an
 * SmtpConnection (which carries the bytes, replies, timers and TLS) and turns what the
 * server says into outcomes for the jobs it carries; what it needs of the engine is its
 * SlotHost.
 */
class Slot {
  stage: Stage = Stage.Connect;
  /** The seed's ready flag: the slot may write its next command. */
  ready = false;
  /** host[ip]:port, for log lines; "none" until connected. */
  relay = "none";
  delivered = 0;
  /** The engine counted this slot as ready (it reached the MAIL stage once). */
  wasReady = false;
  #conn: SmtpConnection | null = null;
  readonly #txns: Txn[] = [];
  #closed = false;
  #peer = "";
  #connectedAt = 0;
  #setupMs = 0;
  #hops: Hop[] = [];
  #hop: Hop = { host: "", address: "", port: 0 };
  /** The last lines of the conversation, when a protocol error would send them to the postmaster. */
  #transcript: string[] | null = null;
  /** The peer is in --debug-peer: every line of the conversation is logged. */
  #debug = false;
  #lastError = "no address to connect to";
  #authenticated = false;
  #session: Session | null = null;

  constructor(private readonly host: SlotHost, readonly destination: Destination) {}

  /**
   * do_smtp_connect(): connects to each hop of the route in turn until one greets. A refused
   * connection, a 4xx or 5xx greeting, a drop or a timeout before the greeting move to the
   * next hop; once a server has greeted, no error does (the seed's rule, Postfix's too).
   */
  open(): void {
    this.#connectedAt = Date.now();
    this.#hops = [...this.destination.hops];
    this.#connectNext();
  }

  #connectNext(): void {
    const hop = this.#hops.shift();
    if (!hop || this.host.stopping) {
      this.#closed = true;
      this.host.slotFailedEarly(this, this.#lastError);
      return;
    }
    this.#hop = hop;
    this.#peer = `${hop.host}[${hop.address}]`;
    this.#session = this.host.session(hop);
    this.#debug = this.#session.debug;
    this.#transcript = this.#session.transcript ? [] : null;
    this.stage = Stage.Connect;
    this.relay = "none";
    const conn = new SmtpConnection({
      ...this.#session.connection,
      onLine: this.#transcript || this.#debug ? (direction, line) => this.#said(direction, line) : undefined,
    }, (err, reply) => this.#failed(conn, err, reply));
    this.#conn = conn;
    conn.open(this.#on(Stage.Banner, (reply) => this.#onBanner(reply)));
  }

  /**
   * Every reply passes here first: a 421 ends the session whatever it answers, and a reply
   * that is not one (600) is a protocol error. The rest goes to the stage's handler.
   */
  #on(stage: Stage, handler: (reply: Reply) => void): (reply: Reply) => void {
    return (reply) => {
      if (this.#closed) return;
      if (reply.code >= 600) return this.#conn!.abort(`host ${this.#peer} broke the protocol: ${printable(replyText(reply))} (in reply to ${STAGES[stage].command} command)`, "EPROTOCOL", reply);
      if (reply.code === 421 && stage !== Stage.Quit) return this.#conn!.abort(`host ${this.#peer} said: ${printable(replyText(reply))} (${STAGES[stage].inReplyTo})`, "ESERVER", reply);
      handler(reply);
    };
  }

  #onBanner(reply: Reply): void {
    this.relay = this.#conn!.relay;
    if (classify(reply) !== "ok") return this.#conn!.abort(`host ${this.#peer} refused to talk to me: ${printable(replyText(reply))}`, "ESERVER", reply);
    this.stage = Stage.Helo;
    if (this.#session!.connection.tls === "none") this.host.plaintextUsed(this.#hop);
    this.#conn!.hello((hello) => this.#on(Stage.Helo, () => this.#afterHello(hello))(hello.reply));
  }

  /** After EHLO (or HELO) and STARTTLS: TLS policy, then AUTH to a relay, then mail. */
  #afterHello(hello: Hello): void {
    const conn = this.#conn!;
    if (classify(hello.reply) !== "ok") {
      const command = hello.helo ? "HELO" : "EHLO";
      return conn.abort(`host ${this.#peer} refused to talk to me: ${printable(replyText(hello.reply))} (in reply to ${command} command)`, "ESERVER", hello.reply);
    }
    if (hello.tlsProblem) return conn.abort(hello.tlsProblem, "ETLS", hello.reply.code === 250 ? null : hello.reply);
    const credentials = this.#session!.credentials;
    if (!credentials || this.#authenticated) return this.#sessionReady();
    conn.authenticate(credentials, ({ reply, problem }) => {
      if (problem) return conn.abort(problem, "EAUTH");
      if (reply!.code === 235) {
        this.#authenticated = true;
        return this.#sessionReady();
      }
      const reason = `SASL authentication failed; server ${this.#peer} said: ${printable(replyText(reply!))}`;
      if (reply!.code === 535 || reply!.code === 534 || classify(reply!) === "permanent") this.host.authRefused(reason, this.#hop, reply!);
      conn.abort(reason, "EAUTH", reply);
    });
  }

  #sessionReady(): void {
    this.#setupMs = Date.now() - this.#connectedAt;
    if (this.#hop.via) this.host.note(`${this.destination.key}: delivering through the ${this.#hop.via} ${this.relay}`);
    this.host.slotReady(this);
    this.#nextJob();
  }

  get #ext(): Extensions | null {
    return this.#conn?.ext ?? null;
  }

  /* Stage 2: the next message on this connection, or QUIT when there is none. */

  #nextJob(): void {
    this.stage = Stage.Mail;
    this.ready = true;
    this.host.jobFor(this.destination, (job) => {
      if (this.#closed) {
        if (job) this.host.jobReturned(job);
        return;
      }
      if (job) this.#startTxn(job);
      else this.#quit();
    });
  }

  #startTxn(job: Job): void {
    const txn = new Txn(job);
    const { delivery } = job;
    const limit = this.#ext?.size;
    if (limit && delivery.wire.size > limit) {
      this.#settleAll(txn, this.#outcome(job, "bounced", 552, "5.3.4",
        `message size ${delivery.wire.size} exceeds size limit ${limit} of server ${this.#peer}`));
      // Behind a pipelined dot the reply still to come moves the slot on; otherwise move on now.
      if (this.#txns.length === 0) this.#nextJob();
      return;
    }
    if (needsSmtpUtf8(job) && !this.#ext?.smtpUtf8) {
      // RFC 6531: an address that is not ASCII needs SMTPUTF8; a server without it cannot take it.
      this.#settleAll(txn, this.#outcome(job, "bounced", 553, "5.6.7", `SMTPUTF8 is required, but was not offered by host ${this.#peer}`));
      if (this.#txns.length === 0) this.#nextJob();
      return;
    }
    this.ready = false;
    this.#txns.push(txn);
    job.startedAt = Date.now();
    job.setupMs = this.#setupMs;
    this.#setupMs = 0;
    const conn = this.#conn!;
    const mail = this.#mailCommand(delivery);
    if (this.#ext?.pipelining) {
      conn.command([mail, ...job.recipients.map((r) => this.#rcptCommand(delivery, r)), "DATA\r\n"].join(""));
      conn.expect(STAGES[Stage.Mail], this.#on(Stage.Mail, (r) => this.#onMail(txn, r)));
      for (const rcpt of job.recipients) conn.expect(STAGES[Stage.Rcpt], this.#on(Stage.Rcpt, (r) => this.#onRcpt(txn, rcpt, r)));
      conn.expect(STAGES[Stage.Data], this.#on(Stage.Data, (r) => this.#onData(txn, r)));
    } else {
      conn.send(mail, STAGES[Stage.Mail], this.#on(Stage.Mail, (r) => this.#onMail(txn, r)));
    }
  }

  #mailCommand(delivery: Delivery): string {
    let params = "";
    const ext = this.#ext;
    if (ext?.size != null) params += ` SIZE=${delivery.wire.size}`;
    if (delivery.wire.eightBit && ext?.eightBitMime) params += " BODY=8BITMIME";
    if (ext?.smtpUtf8 && needsSmtpUtf8Address(delivery.msg.sender, delivery.msg.recipients)) params += " SMTPUTF8";
    const dsn = delivery.book?.dsn;
    if (dsn && ext?.dsn) {
      if (dsn.ret) params += ` RET=${dsn.ret.toUpperCase()}`;
      if (dsn.envid) params += ` ENVID=${xtext(dsn.envid)}`;
    }
    return `MAIL FROM:<${delivery.msg.sender}>${params}\r\n`;
  }

  /** RCPT TO, with RFC 3461's NOTIFY and ORCPT when the sender asked and the server offers DSN. */
  #rcptCommand(delivery: Delivery, rcpt: string): string {
    const notify = delivery.book?.dsn?.notify;
    // RFC 6533: an address that is not ASCII goes as utf-8, with \x{HEX} for each such character.
    const orcpt = /^[\x20-\x7e]*$/.test(rcpt) ? `rfc822;${xtext(rcpt)}`
      : `utf-8;${xtext([...rcpt].map((c) => (c.codePointAt(0)! > 0x7e ? `\\x{${c.codePointAt(0)!.toString(16).toUpperCase()}}` : c)).join(""))}`;
    const params = notify && this.#ext?.dsn ? ` NOTIFY=${notify.map((n) => n.toUpperCase()).join(",")} ORCPT=${orcpt}` : "";
    return `RCPT TO:<${rcpt}>${params}\r\n`;
  }

  #onMail(txn: Txn, reply: Reply): void {
    if (classify(reply) === "ok") {
      txn.mailOk = true;
      this.stage = Stage.Rcpt;
      if (!this.#ext?.pipelining) this.#sendRcpt(txn, txn.job.recipients[0]);
      return;
    }
    this.#settleAll(txn, this.#replyOutcome(txn.job, reply, Stage.Mail));
    if (!this.#ext?.pipelining) this.#rset();
  }

  #sendRcpt(txn: Txn, rcpt: string): void {
    this.#conn!.send(this.#rcptCommand(txn.job.delivery, rcpt), STAGES[Stage.Rcpt], this.#on(Stage.Rcpt, (r) => this.#onRcpt(txn, rcpt, r)));
  }

  #onRcpt(txn: Txn, rcpt: string, reply: Reply): void {
    if (txn.mailOk) {
      if (classify(reply) === "ok") txn.accepted.push(rcpt);
      else if (tooManyRecipients(reply)) {
        txn.overflow.push(rcpt);
        txn.overflowReply = reply;
      } else this.#settleOne(txn, rcpt, this.#replyOutcome(txn.job, reply, Stage.Rcpt));
    }
    if (this.#ext?.pipelining) return;
    const rest = txn.job.recipients.slice(txn.job.recipients.indexOf(rcpt) + 1);
    // Without pipelining, a full server is not asked again in this transaction.
    if (txn.overflow.length > 0) txn.overflow.push(...rest.splice(0));
    const next = rest[0];
    if (next !== undefined) this.#sendRcpt(txn, next);
    else if (txn.accepted.length > 0) this.#conn!.send("DATA\r\n", STAGES[Stage.Data], this.#on(Stage.Data, (r) => this.#onData(txn, r)));
    else {
      this.#finishTxn(txn);
      this.#rset();
    }
  }

  #onData(txn: Txn, reply: Reply): void {
    const sendable = txn.mailOk && txn.accepted.length > 0;
    if (reply.code !== 354) {
      // DATA refused: the recipients it had accepted share the refusal.
      if (!txn.settled) this.#settleAll(txn, this.#replyOutcome(txn.job, reply, Stage.Data));
      return this.#rset();
    }
    const conn = this.#conn!;
    if (!sendable) {
      // RFC 2920: DATA was accepted although no recipient was; send an empty message and reset.
      this.#finishTxn(txn);
      conn.send(".\r\n", STAGES[Stage.Dot], this.#on(Stage.Dot, () => this.#rset()));
      return;
    }
    txn.inBody = true;
    this.stage = Stage.Body;
    const wire = txn.job.delivery.wire;
    if (wire.bytes) {
      // The body, its dot and the next envelope leave in one packet: a server that answers
      // each part in its own write would otherwise wait on our delayed ACK (Nagle, 40 ms).
      conn.cork();
      conn.write(wire.bytes);
      this.#endOfData(txn);
      conn.uncork();
      return;
    }
    // A large message, piece by piece from its file: each stuffed piece is handed to the
    // kernel before the next is made in the same buffer, so a 50 MB message costs two
    // buffers of memory, whatever the server's speed (the data-xfer timer bounds a stall).
    const { delivery } = txn.job;
    conn.writeBody(wireChunks(this.host.spool, delivery.msg, delivery.prefix, { reuse: true })).then(
      (written) => { if (written && !this.#closed) this.#endOfData(txn); },
      (err: Error) => conn.abort(`error reading queue file ${delivery.msg.id}: ${err.message}`, "EQUEUE"),
    );
  }

  /** The terminator is on its way: wait for the reply, and with PIPELINING send the next envelope behind it. */
  #endOfData(txn: Txn): void {
    txn.dotSent = true;
    this.stage = Stage.Dot;
    this.#conn!.expect(STAGES[Stage.Dot], this.#on(Stage.Dot, (r) => this.#onDot(txn, r)));
    if (this.#ext?.pipelining) {
      const job = this.host.jobNow(this.destination);
      if (job) this.#startTxn(job);
    }
  }

  #onDot(txn: Txn, reply: Reply): void {
    if (classify(reply) === "ok") {
      this.delivered++;
      // A server without DSN cannot send the success report the sender asked for: we will.
      if (!this.#ext?.dsn) for (const rcpt of txn.accepted) txn.job.delivery.sentWithoutDsn.add(rcpt);
      const words = printable(replyText(reply));
      this.#settleAccepted(txn, this.#outcome(txn.job, "sent", reply.code, dsnStatus(reply), words, words));
    } else {
      this.#settleAccepted(txn, this.#replyOutcome(txn.job, reply, Stage.Dot));
    }
    if (this.#txns.length === 0 && !this.#conn!.awaiting) this.#nextJob();
  }

  #rset(): void {
    this.stage = Stage.Rset;
    this.#conn!.send("RSET\r\n", STAGES[Stage.Rset], this.#on(Stage.Rset, (reply) => {
      if (classify(reply) !== "ok") return this.#conn!.abort(`host ${this.#peer} said: ${printable(replyText(reply))} (in reply to RSET command)`, "ESERVER", reply);
      this.#nextJob();
    }));
  }

  #quit(): void {
    this.stage = Stage.Quit;
    this.#conn!.quit(this.#session!.waitForQuit, () => this.#close());
  }

  /**
   * The conversation, line by line with its direction: the last 100 lines kept for a
   * postmaster notice (notify_classes protocol), every line logged for a debug peer.
   * Message bodies never pass through here.
   */
  #said(direction: ">" | "<", line: string): void {
    const entry = `${direction} ${printable(line, 1000)}`;
    if (this.#transcript) {
      this.#transcript.push(entry);
      if (this.#transcript.length > 100) this.#transcript.shift();
    }
    if (this.#debug) this.host.note(`${this.#peer}: ${entry}`);
  }

  /* Outcomes */

  #outcome(job: Job, status: Status, code: number, dsn: string, text: string, reply: string | null = null): Omit<OutcomeInput, "recipient"> {
    return { queueId: job.delivery.msg.id, status, code, dsn, text, relay: this.relay, reply };
  }

  #replyOutcome(job: Job, reply: Reply, stage: Stage): Omit<OutcomeInput, "recipient"> {
    const cls = classify(reply);
    const status: Status = cls === "permanent" ? "bounced" : cls === "ok" ? "sent" : "deferred";
    const words = printable(replyText(reply));
    return this.#outcome(job, status, reply.code, dsnStatus(reply), `host ${this.#peer} said: ${words} (${STAGES[stage].inReplyTo})`, words);
  }

  #settleOne(txn: Txn, rcpt: string, outcome: Omit<OutcomeInput, "recipient">): void {
    this.host.recordOutcome(txn.job, { ...outcome, recipient: rcpt });
  }

  #settleAccepted(txn: Txn, outcome: Omit<OutcomeInput, "recipient">): void {
    for (const rcpt of txn.accepted) this.#settleOne(txn, rcpt, outcome);
    this.#finishTxn(txn);
  }

  /** Every recipient of the job not yet settled gets this outcome; the job is done. */
  #settleAll(txn: Txn, outcome: Omit<OutcomeInput, "recipient">): void {
    for (const rcpt of txn.job.recipients) {
      if (!txn.job.delivery.outcomes.has(rcpt) && !txn.overflow.includes(rcpt)) this.#settleOne(txn, rcpt, outcome);
    }
    this.#finishTxn(txn);
  }

  #finishTxn(txn: Txn): void {
    if (txn.settled) return;
    txn.settled = true;
    const i = this.#txns.indexOf(txn);
    if (i >= 0) this.#txns.splice(i, 1);
    const overflow = txn.overflow.filter((r) => !txn.job.delivery.outcomes.has(r));
    if (overflow.length > 0) {
      // Progress was made (someone was accepted): the rest go in a new transaction at once.
      // No progress: the server is full for now, and they wait like any 4xx.
      if (txn.accepted.length > 0) this.host.retryNow(txn.job, overflow);
      else for (const rcpt of overflow) this.#settleOne(txn, rcpt, this.#replyOutcome(txn.job, txn.overflowReply!, Stage.Rcpt));
    }
    this.host.jobDone(txn.job);
  }

  /* The end of a session */

  /**
   * The conversation failed (the connection says why: a timeout, a drop, TLS, a protocol
   * error, or a refusal we ended it for). Before any server greeted, the next hop is tried
   * quietly; after, every transaction in flight is deferred with the reason.
   */
  #failed(conn: SmtpConnection, err: MailError, reply: Reply | null): void {
    if (this.#closed || conn !== this.#conn) return;
    if (err.code === "ETLS") this.host.tlsFailed(this.#hop);
    if (this.stage <= Stage.Banner && this.#hops.length > 0 && !this.host.stopping) {
      this.#lastError = err.message;
      return this.#connectNext();
    }
    if (err.code === "EPROTOCOL" && this.#transcript) this.host.protocolNotice(this.#peer, err.message, this.#transcript);
    if (conn.connected && this.relay === "none") this.relay = conn.relay;
    this.#end(err.message, reply);
  }

  /** Every transaction in flight is deferred with the reason; the slot is free. */
  #end(reason: string, reply: Reply | null): void {
    const failedEarly = this.stage <= Stage.Helo && this.delivered === 0;
    this.#closed = true;
    const code = reply && reply.code < 600 ? reply.code : 0;
    const dsn = reply && reply.code < 600 && classify(reply) === "temporary" ? dsnStatus(reply) : "4.4.2";
    for (const txn of [...this.#txns]) {
      for (const rcpt of txn.job.recipients) {
        if (!txn.job.delivery.outcomes.has(rcpt)) this.#settleOne(txn, rcpt, this.#outcome(txn.job, "deferred", code, dsn, reason));
      }
      this.#finishTxn(txn);
    }
    if (failedEarly) this.host.slotFailedEarly(this, reason);
    else this.host.slotClosed(this);
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#conn?.close();
    this.host.slotClosed(this);
  }

  /**
   * stop(): abandon the session. A transaction whose final dot went out unanswered was an
   * attempt (the server may have the message); the others were never tried, and their
   * recipients go back to the queue with no outcome at all.
   */
  abort(): void {
    if (this.#closed) return;
    for (const txn of [...this.#txns]) {
      if (txn.dotSent) continue;
      txn.overflow.length = 0;
      this.#finishTxn(txn);
    }
    const reason = "delivery stopped: mudmail is shutting down";
    if (this.#conn && !this.#conn.ended) this.#conn.abort(reason);
    else this.#end(reason, null);
  }
}

/* ------------------------------------------------------------------------------------ */
/* The engine                                                                            */

export interface SendMessage {
  from: string;
  to: string | string[];
  cc?: string | string[];
  subject?: string;
  text?: string;
  /** Extra header fields, added as given. */
  headers?: Record<string, string>;
  /** A complete message (header lines, blank line, body) instead of subject/text. */
  raw?: string | Buffer;
  /** Delivery status notifications (RFC 3461): which reports the sender wants, and what they carry. */
  dsn?: { notify?: Array<"never" | "success" | "failure" | "delay">; ret?: "full" | "hdrs"; envid?: string };
}

/** Checks RFC 3461 parameters as a sender gives them; the message names the flag. */
export function checkDsn(dsn: SendMessage["dsn"]): DsnRequest | undefined {
  if (!dsn) return undefined;
  const notify = dsn.notify?.map((n) => String(n).toLowerCase());
  if (notify) {
    const known = ["never", "success", "failure", "delay"];
    const bad = notify.find((n) => !known.includes(n));
    if (bad) throw new UsageError(`--notify: unknown value ${JSON.stringify(bad)} (expected never, or any of success,failure,delay)`);
    if (notify.includes("never") && notify.length > 1) throw new UsageError("--notify: never stands alone");
    if (notify.length === 0) throw new UsageError("--notify: expected never, or any of success,failure,delay");
  }
  if (dsn.ret !== undefined && dsn.ret !== "full" && dsn.ret !== "hdrs") throw new UsageError(`--ret: expected full or hdrs, got ${JSON.stringify(dsn.ret)}`);
  // RFC 3461 section 4.4: printable US-ASCII, at most 100 characters once xtext-encoded.
  if (dsn.envid !== undefined && (!/^[\x20-\x7e]*$/.test(dsn.envid) || xtext(dsn.envid).length > 100)) {
    throw new UsageError("envid: printable US-ASCII, at most 100 characters as xtext");
  }
  return { ...(notify ? { notify } : {}), ...(dsn.ret ? { ret: dsn.ret } : {}), ...(dsn.envid ? { envid: dsn.envid } : {}) };
}

export interface MailEngineEvents {
  sent: [Outcome];
  deferred: [Outcome];
  bounced: [Outcome];
  error: [MailError];
}

export class MailEngine extends EventEmitter {
  readonly options: Resolved;
  readonly spool: Spool;
  stopping = false;
  private readonly log: MailLog;
  private readonly slots = new Set<Slot>();
  private readonly destinations = new Map<string, Destination>();
  /** Queue ids read from outgoing/ (or queued here) and not yet claimed. */
  private backlog: string[] = [];
  private backlogHead = 0;
  /** Ids waiting in the backlog or claimed: a scan or a watch event must not take them again. */
  private readonly known = new Set<string>();
  /** Ids tried and put back in this pass: tried again in the next one, not in this one. */
  private tried = new Set<string>();
  /** Backlog ids that wait in deferred/, not outgoing/. */
  private readonly fromDeferred = new Set<string>();
  /** When each deferred message is due. */
  private readonly due = new DueHeap();
  private readonly router: Router;
  private preparing = 0;
  private queuedJobs = 0;
  private scanning: Promise<void> | null = null;
  private lastScan = 0;
  private initialized: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private watcher: fs.FSWatcher | null = null;
  private tickScheduled = false;
  private active = false;
  private counts: FlushSummary = emptySummary();
  private idleWaiters: Array<() => void> = [];
  private spoolReady: Promise<void> | null = null;

  constructor(options: MailOptions = {}) {
    super();
    this.options = checkOptions(options);
    this.spool = new Spool(this.options.maildir, { fsync: this.options.fsync });
    const o = this.options;
    this.router = new Router({
      relay: o.relay ? parseHostPort(o.relay, "--relay", 25) : null,
      port: o.port,
      resolver: o.resolver ? parseHostPort(o.resolver, "--resolver", 53, true) : null,
      dnsTimeout: o.dnsTimeout * 1000,
      fallbackRelay: o.fallbackRelay ? parseHostPort(o.fallbackRelay, "--fallback-relay", 25) : null,
      bestMxRelay: o.bestMxRelay ? parseHostPort(o.bestMxRelay, "--best-mx-relay", 25) : null,
      ownAddresses: ownAddresses(o.inetInterfaces),
      ignoreMxLookupError: o.ignoreMxLookupError,
    });
    this.log = new MailLog(this.options.log);
    this.log.redact(secretForms(this.credentials()));
    this.dkimKeys = loadDkimKeys({ domain: o.dkimDomain, selector: o.dkimSelector, keyFile: o.dkimKey, keysFile: o.dkimKeys });
  }

  private readonly dkimKeys: DkimKey[];

  /** Queues a message (get_mailqueue_file + compose); delivery starts at once when the engine runs. */
  async send(message: SendMessage): Promise<string> {
    const content = composeMessage(message, this.options.helo);
    const dsn = checkDsn(message.dsn);
    this.spoolReady ??= this.spool.init().then(() => undefined);
    await this.spoolReady;
    const id = await this.spool.create(content, dsn ? { attempts: 0, nextAttempt: null, lastError: null, dsn } : undefined);
    if (this.active && !this.stopping) {
      this.enqueue(id);
      this.scheduleTick();
    }
    return id;
  }

  /** check_smtp(): read outgoing/ once and open connections into free slots. */
  tick(): void {
    this.active = true;
    this.runTick().catch((err) => this.reportError(err as Error));
  }

  /** Keeps the engine's own timer (every tickInterval seconds) and watches outgoing/ for drops. */
  start(): void {
    if (this.timer) return;
    this.stopping = false;
    this.tick();
    this.timer = setInterval(() => this.tick(), this.options.tickInterval * 1000);
    this.timer.unref?.();
    this.init().then(() => { if (this.timer && !this.watcher) this.watch(); }, () => undefined);
  }

  /** One pass: send everything waiting, wait for every slot to finish, resolve with the counts. */
  async flush(options: { force?: boolean } = {}): Promise<FlushSummary> {
    const started = Date.now();
    this.stopping = false;
    this.counts = emptySummary();
    this.active = true;
    await this.runTick(options.force ?? false);
    await this.idle();
    const summary = { ...this.counts, seconds: (Date.now() - started) / 1000 };
    if (!this.timer) this.active = false;
    return summary;
  }

  /** Graceful stop: no new connections; active sessions are abandoned and their messages go back to outgoing/. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.watcher?.close();
    this.watcher = null;
    // An init still running would take the lock after we let it go: let it finish first.
    await this.initialized?.catch(() => undefined);
    for (const slot of [...this.slots]) slot.abort();
    for (const dest of this.destinations.values()) this.dropJobs(dest, null);
    await this.idle();
    await this.retryStranded();
    this.active = false;
    this.releaseLock();
    await this.log.flush();
  }

  /** Live numbers for a progress line. */
  get progress(): FlushSummary & { busySlots: number; waiting: number } {
    return { ...this.counts, busySlots: this.slots.size, waiting: this.backlog.length - this.backlogHead + this.queuedJobs };
  }

  override emit(event: string | symbol, ...args: unknown[]): boolean {
    // An "error" nobody listens to must not throw inside the host's event loop, and a
    // listener that throws must not leave a session half-way: its error is logged instead.
    if (event === "error" && this.listenerCount("error") === 0) return false;
    try {
      return super.emit(event, ...args);
    } catch (err) {
      this.log.write("qmgr", `warning: a "${String(event)}" listener threw: ${printable(String((err as Error)?.message ?? err))}`);
      return true;
    }
  }

  /* Ticks and scans */

  private async runTick(force = false): Promise<void> {
    await this.init();
    if (this.stopping) return;
    this.pass++;
    for (const [key, dest] of this.destinations) {
      // A destination with nothing going on is forgotten; the others start the tick afresh.
      if (dest.slots === 0 && dest.jobs.length === 0 && dest.waiters.length === 0) this.destinations.delete(key);
      else if (dest.route !== "pending") {
        dest.reset();
        if (dest.jobs.length > 0) this.lookUpRoute(dest);
      }
    }
    this.forgetTried();
    await this.retryStranded();
    this.takeDue(force ? Infinity : Date.now());
    await this.scan();
    this.pump();
    this.fillSlots();
  }

  /** Deferred messages whose time has come join the backlog (all of them with --force). */
  private takeDue(now: number): void {
    for (let id = this.due.popDue(now); id !== null; id = this.due.popDue(now)) {
      this.fromDeferred.add(id);
      this.enqueue(id);
    }
  }

  /** At start: the schedule of deferred/, from each message's bookkeeping (due now when it has none). */
  private async loadDeferred(): Promise<void> {
    const { ids } = await this.spool.scan("deferred");
    for (let i = 0; i < ids.length; i += 64) {
      const batch = ids.slice(i, i + 64);
      const books = await Promise.all(batch.map((id) => this.spool.readBookkeeping(id, "deferred")));
      batch.forEach((id, j) => this.due.push(id, books[j]?.nextAttempt ?? 0));
    }
  }

  private init(): Promise<void> {
    this.initialized ??= (async () => {
      // A failed start (the spool is locked, a folder cannot be made) is tried again next tick.
      try {
        await this.initOnce();
      } catch (err) {
        this.initialized = null;
        throw err;
      }
    })();
    return this.initialized;
  }

  private async initOnce(): Promise<void> {
    {
      await this.spool.init();
      this.spool.lock();
      const { recovered } = await this.spool.init({ recover: true });
      for (const id of recovered) this.log.write("qmgr", `${id}: requeued from outgoing_active/ after an unclean stop`);
      await this.loadDeferred();
      await this.loadTlsFallback();
    }
  }

  private scheduleTick(): void {
    if (this.tickScheduled) return;
    this.tickScheduled = true;
    setImmediate(() => {
      this.tickScheduled = false;
      this.pump();
      this.fillSlots();
    });
  }

  /** One read of outgoing/: new names join the backlog; names already seen this pass are skipped. */
  private scan(): Promise<void> {
    this.scanning ??= (async () => {
      this.lastScan = Date.now();
      try {
        const { ids, badNames } = await this.spool.scan("outgoing");
        for (const id of ids) this.enqueue(id);
        for (const name of badNames) await this.quarantine(name, "outgoing", "file name is not a queue id");
      } finally {
        this.scanning = null;
        this.checkIdle();
      }
    })();
    return this.scanning;
  }

  private enqueue(id: string): void {
    if (this.known.has(id) || this.tried.has(id)) return;
    this.known.add(id);
    this.backlog.push(id);
  }

  /** A new pass: ids tried and put back in the last one may be tried again. */
  private forgetTried(): void {
    this.tried = new Set();
  }

  /** A claimed message leaves the engine's hands: gone, quarantined, or put back as `putBack`. */
  private forget(id: string, putBack?: string): void {
    this.known.delete(id);
    this.inFlight.delete(id);
    if (putBack !== undefined) this.tried.add(putBack);
  }

  private readonly inFlight = new Set<string>();

  private watch(): void {
    try {
      this.watcher = fs.watch(path.join(this.options.maildir, "outgoing"), (_event, name) => {
        if (!name || name.startsWith(".") || this.known.has(String(name)) || this.tried.has(String(name))) return;
        this.rescanSoon();
      });
      this.watcher.on("error", () => { this.watcher?.close(); this.watcher = null; });
      this.watcher.unref?.();
    } catch {
      // No watching (some file systems): the tick still finds what other programs drop in.
    }
  }

  private rescanTimer: NodeJS.Timeout | null = null;

  private rescanSoon(): void {
    if (this.rescanTimer || this.stopping) return;
    this.rescanTimer = setTimeout(() => {
      this.rescanTimer = null;
      this.scan().catch((err) => this.reportError(err as Error)).finally(() => { this.pump(); this.fillSlots(); });
    }, 100);
    this.rescanTimer.unref?.();
  }

  /* Preparing jobs: claim, read the envelope, measure, split by destination */

  private get readahead(): number {
    return this.options.maxConnections * 4 + 8;
  }

  /** Keeps a few jobs ready ahead of the slots, so a slot never waits on the disk between messages. */
  private pump(): void {
    while (!this.stopping && !this.authFailure && this.backlogHead < this.backlog.length && this.preparing + this.queuedJobs < this.readahead) {
      const id = this.backlog[this.backlogHead++];
      if (this.backlogHead > 4096 && this.backlogHead * 2 > this.backlog.length) {
        this.backlog = this.backlog.slice(this.backlogHead);
        this.backlogHead = 0;
      }
      this.preparing++;
      this.prepare(id)
        .catch((err) => this.reportError(err as Error))
        .finally(() => {
          this.preparing--;
          this.pump();
          this.fillSlots();
          this.checkIdle();
        });
    }
    if (this.backlogHead >= this.backlog.length && this.preparing === 0 && !this.scanning) this.noMoreJobs();
  }

  private async prepare(queued: string): Promise<void> {
    const from = this.fromDeferred.delete(queued) ? "deferred" : "outgoing";
    let claimed: { id: string; booked: boolean } | null;
    try {
      claimed = await this.spool.claim(queued, from);
    } catch (err) {
      this.known.delete(queued);
      throw new MailError(`${queued}: cannot claim queue file: ${(err as Error).message}`, "EQUEUE", { queueId: queued });
    }
    if (claimed?.id !== queued) this.known.delete(queued);
    if (claimed === null) return;
    const { id } = claimed;
    this.known.add(id);
    this.inFlight.add(id);
    const claimedAt = Date.now();
    let msg: QueuedMessage;
    let wire: Wire;
    let prefix: Buffer = Buffer.alloc(0);
    const stored = claimed.booked ? await this.spool.readBookkeeping(id, "outgoing_active") : null;
    try {
      msg = await this.spool.open(id);
      // A prefix made (and signed) at an earlier attempt is used again as it was: one
      // signature per message, valid whatever the clock or the queue id says now.
      const kept = stored?.prefix ? Buffer.from(stored.prefix, "base64") : null;
      wire = await measureWire(this.spool, msg, (facts) => (prefix = kept ?? addedHeaders(facts, msg, this.options.helo)));
      if (!kept && this.dkimKeys.length > 0) ({ prefix, wire } = await this.sign(msg, prefix, wire));
    } catch (err) {
      if (err instanceof CorruptMessageError) {
        this.forget(id);
        return this.quarantine(id, "outgoing_active", err.reason);
      }
      this.forget(id, await this.spool.release(id, from).catch(() => id));
      throw new MailError(`${id}: cannot read queue file: ${(err as Error).message}`, "EQUEUE", { queueId: id });
    }
    const book = stored;
    const delivery = new Delivery(msg, wire, prefix, claimedAt, book, from);
    this.log.write("qmgr", `${id}: from=<${msg.sender}>, size=${msg.size}, nrcpt=${msg.recipients.length} (queue active)`);
    this.counts.messages++;
    this.counts.recipients += msg.recipients.length;
    // Count every job before queueing any: a job can finish at once (a dead destination, a
    // failed route), and the delivery must not settle while its other jobs wait to be queued.
    const jobs = this.splitJobs(delivery);
    delivery.openJobs = jobs.length;
    for (const job of jobs) this.queueJob(job);
  }

  /** DKIM: signs what will go on the wire (our added headers, then the message) and prepends the signature. */
  private async sign(msg: QueuedMessage, prefix: Buffer, wire: Wire): Promise<{ prefix: Buffer; wire: Wire }> {
    const content = (async function* (spool: Spool) {
      yield prefix;
      yield* spool.content(msg);
    })(this.spool);
    try {
      const result = await signByFrom(content, this.dkimKeys);
      if (result.skipped) {
        this.log.write("qmgr", `${msg.id}: ${result.skipped}`);
        return { prefix, wire };
      }
      const fields = Buffer.from(result.fields);
      return {
        prefix: Buffer.concat([fields, prefix]),
        wire: { ...wire, size: wire.size + fields.length, bytes: wire.bytes ? Buffer.concat([fields, wire.bytes]) : null },
      };
    } catch (err) {
      this.log.write("qmgr", `warning: ${msg.id}: not DKIM-signed: ${printable((err as Error).message)}`);
      return { prefix, wire };
    }
  }

  private splitJobs(delivery: Delivery): Job[] {
    const byDestination = new Map<Destination, string[]>();
    for (const rcpt of delivery.msg.recipients) {
      const dest = this.destinationOf(rcpt);
      const list = byDestination.get(dest);
      if (list) list.push(rcpt);
      else byDestination.set(dest, [rcpt]);
    }
    const jobs: Job[] = [];
    const limit = this.options.recipientLimit;
    for (const [dest, rcpts] of byDestination) {
      for (let i = 0; i < rcpts.length; i += limit) jobs.push(new Job(delivery, dest, rcpts.slice(i, i + limit)));
    }
    return jobs;
  }

  private destinationOf(rcpt: string): Destination {
    const key = this.options.relay ? `relay:${this.options.relay}` : rcpt.slice(rcpt.lastIndexOf("@") + 1).toLowerCase();
    let dest = this.destinations.get(key);
    if (!dest) {
      dest = new Destination(key);
      this.destinations.set(key, dest);
    }
    return dest;
  }

  private queueJob(job: Job): void {
    const dest = job.destination;
    if (this.stopping || this.authFailure) return this.jobDone(job);
    if (dest.deadReason) return this.deferUnsent(job, `delivery temporarily suspended: ${dest.deadReason}`);
    if (dest.route && dest.route !== "pending" && !dest.route.ok) return this.routeFailed(job, dest.route);
    const waiter = dest.waiters.shift();
    if (waiter) return waiter(job);
    dest.jobs.push(job);
    this.queuedJobs++;
    if (dest.route === null) this.lookUpRoute(dest);
  }

  /** Once per tick and destination: where its mail goes. Its jobs wait in its queue meanwhile. */
  private lookUpRoute(dest: Destination): void {
    dest.route = "pending";
    this.router.route(dest.key.startsWith("relay:") ? "" : dest.key).then((route) => {
      dest.route = route;
      if (!route.ok) {
        const jobs = dest.jobs.splice(0);
        this.queuedJobs -= jobs.length;
        for (const job of jobs) this.routeFailed(job, route);
      }
      this.fillSlots();
    }, (err) => {
      dest.route = { ok: false, permanent: false, dsn: "4.4.3", reason: `cannot look up ${dest.key}: ${(err as Error).message}` };
      this.fillSlots();
    });
  }

  /** A destination DNS says does not exist bounces its jobs; one it cannot tell about now defers them. */
  private routeFailed(job: Job, route: Extract<Route, { ok: false }>): void {
    job.startedAt = Date.now();
    for (const rcpt of job.recipients) {
      this.recordOutcome(job, {
        queueId: job.delivery.msg.id, recipient: rcpt, status: route.permanent ? "bounced" : "deferred",
        code: 0, dsn: route.dsn, text: route.reason, relay: "none",
      });
    }
    this.jobDone(job);
  }

  /** The next job for a slot of this destination, now or when one is ready; null when there will be none. */
  jobFor(dest: Destination, give: (job: Job | null) => void): void {
    const job = this.jobNow(dest);
    if (job) return give(job);
    if (this.stopping || (this.backlogHead >= this.backlog.length && this.preparing === 0 && !this.scanning && !this.mayRescan())) return give(null);
    // Every slot taken and mail waiting for a destination without one: this slot, with
    // nothing to do, gives way (QUIT) instead of waiting for its own destination's next job.
    if (this.slots.size >= this.options.maxConnections && this.starving(dest)) return give(null);
    dest.waiters.push(give);
    this.pump();
  }

  /** Another destination has jobs that no slot of its own will take. */
  private starving(except: Destination): boolean {
    for (const d of this.destinations.values()) {
      if (d !== except && d.jobs.length > d.slots && d.failures < 2 && d.route !== null && d.route !== "pending" && d.route.ok) return true;
    }
    return false;
  }

  /** While the backlog ran dry, files may have been dropped in: read outgoing/ again, at most once a second. */
  private mayRescan(): boolean {
    if (this.stopping || Date.now() - this.lastScan < 1000) return false;
    this.scan().catch((err) => this.reportError(err as Error)).finally(() => { this.pump(); this.fillSlots(); });
    return true;
  }

  jobNow(dest: Destination): Job | null {
    const job = dest.jobs.shift() ?? null;
    if (job) {
      this.queuedJobs--;
      this.pump();
    }
    return job;
  }

  private noMoreJobs(): void {
    for (const dest of this.destinations.values()) {
      for (const waiter of dest.waiters.splice(0)) waiter(null);
    }
  }

  /** Recipients a server had no room for in this transaction: a new job, first in line. */
  retryNow(job: Job, recipients: string[]): void {
    const next = new Job(job.delivery, job.destination, recipients);
    job.delivery.openJobs++;
    job.destination.jobs.unshift(next);
    this.queuedJobs++;
  }

  /** A job a closing slot could not start goes back to the front of its destination's queue. */
  jobReturned(job: Job): void {
    job.destination.jobs.unshift(job);
    this.queuedJobs++;
    this.fillSlots();
  }

  /* Slots */

  /** check_misc_connects(): open connections while slots are free and jobs wait, until two connects fail. */
  private fillSlots(): void {
    if (this.stopping || this.authFailure) return this.checkIdle();
    for (const dest of this.destinations.values()) {
      if (dest.route === null || dest.route === "pending") continue;
      while (
        this.slots.size < this.options.maxConnections && dest.failures < 2 &&
        dest.slots < this.options.destinationConcurrencyLimit && dest.jobs.length > dest.slots &&
        // Until a server of this destination has greeted, probe with one connection, as the
        // C code's one blocking connect at a time did: a dead host costs two attempts, not five.
        (dest.readySlots > 0 || dest.slots === 0)
      ) {
        const slot = new Slot(this, dest);
        this.slots.add(slot);
        dest.slots++;
        slot.open();
      }
      if (dest.jobs.length > dest.slots && this.slots.size >= this.options.maxConnections && dest.failures < 2) this.makeRoom();
      if (dest.failures >= 2 && dest.slots === 0 && (dest.jobs.length > 0 || dest.waiters.length > 0)) {
        // The tick gave up connecting: what waits for this destination is deferred until the next one.
        dest.deadReason ??= dest.lastError ?? "too many failed connections";
        this.dropJobs(dest, `delivery temporarily suspended: ${dest.deadReason}`);
      }
    }
    this.checkIdle();
  }

  /**
   * Every slot is taken and mail waits for a destination without one: a slot that sits
   * idle waiting for its own destination's next job gives way (QUIT), so one domain's
   * connections cannot starve the others.
   */
  private makeRoom(): void {
    for (const dest of this.destinations.values()) {
      if (dest.jobs.length === 0 && dest.waiters.length > 0) {
        dest.waiters.shift()!(null);
        return;
      }
    }
  }

  slotReady(slot: Slot): void {
    // do_smtp_connect() succeeded: the C code resets its tries here.
    slot.destination.failures = 0;
    slot.wasReady = true;
    slot.destination.readySlots++;
    this.fillSlots();
  }

  slotFailedEarly(slot: Slot, reason: string): void {
    slot.destination.failures++;
    slot.destination.lastError = reason;
    this.slotClosed(slot);
  }

  slotClosed(slot: Slot): void {
    if (!this.slots.delete(slot)) return;
    slot.destination.slots--;
    if (slot.wasReady) slot.destination.readySlots--;
    this.fillSlots();
  }

  /** Jobs queued for a destination no slot will serve now are deferred (or, on stop, put back untried). */
  private dropJobs(dest: Destination, reason: string | null): void {
    const jobs = dest.jobs.splice(0);
    this.queuedJobs -= jobs.length;
    for (const job of jobs) {
      if (reason) this.deferUnsent(job, reason);
      else this.jobDone(job);
    }
    for (const waiter of dest.waiters.splice(0)) waiter(null);
  }

  private deferUnsent(job: Job, reason: string): void {
    job.startedAt = Date.now();
    for (const rcpt of job.recipients) {
      if (!job.delivery.outcomes.has(rcpt)) {
        this.recordOutcome(job, { queueId: job.delivery.msg.id, recipient: rcpt, status: "deferred", code: 0, dsn: "4.4.1", text: reason, relay: "none" });
      }
    }
    this.jobDone(job);
  }

  /** An information line of the smtp process. */
  note(text: string): void {
    this.log.write("smtp", text);
  }

  /* Postfix's debug_peer_list and notify_classes */

  private debugPeers: net.BlockList | null = null;

  /** --debug-peer: a host name (or its parent domain), an address, or a CIDR block. */
  isDebugPeer(hop: Hop): boolean {
    const list = this.options.debugPeer;
    if (list.length === 0) return false;
    if (!this.debugPeers) {
      this.debugPeers = new net.BlockList();
      for (const entry of list) {
        const [address, bits] = entry.split("/");
        const family = net.isIPv6(address) ? "ipv6" : "ipv4";
        if (!net.isIP(address)) continue;
        if (bits) this.debugPeers.addSubnet(address, Number(bits), family);
        else this.debugPeers.addAddress(address, family);
      }
    }
    const host = hop.host.toLowerCase();
    if (list.some((e) => !net.isIP(e.split("/")[0]) && (host === e.toLowerCase() || host.endsWith(`.${e.toLowerCase()}`)))) return true;
    return net.isIP(hop.address) ? this.debugPeers.check(hop.address, net.isIPv6(hop.address) ? "ipv6" : "ipv4") : false;
  }

  get wantsTranscripts(): boolean {
    return this.options.notifyClasses.includes("protocol");
  }

  private get postmaster(): string {
    return this.options.postmaster ?? `postmaster@${this.options.helo}`;
  }

  /** The last time a notice of each class went out: at most one a minute per class. */
  private readonly noticeSent = new Map<string, number>();

  /** Postfix's smtp_chat_notify: the session transcript to the postmaster, AUTH redacted, no bodies. */
  protocolNotice(peer: string, reason: string, transcript: string[]): void {
    const text = `Transcript of session follows.\n\n${transcript.map((l) => (l.startsWith(">") ? ` Out: ${l.slice(2)}` : ` In:  ${l.slice(2)}`)).join("\n")}\n\nFor other details, see the local mail logfile.\n\nThe error: ${reason}\n`;
    this.queueNotice("protocol", `Postmaster Copy: mudmail SMTP client: errors from ${peer}`, text);
  }

  private queueNotice(kind: string, subject: string, text: string): void {
    const last = this.noticeSent.get(kind) ?? 0;
    if (Date.now() - last < 60_000) return;
    this.noticeSent.set(kind, Date.now());
    const content = composeNotice({ to: this.postmaster, subject, text, reportingMta: this.options.helo });
    this.spool.create(content).then((id) => {
      this.log.write("qmgr", `${id}: postmaster notice (${kind}): ${printable(subject)}`);
      if (this.active && !this.stopping) {
        this.enqueue(id);
        this.scheduleTick();
      }
    }, (err) => this.log.write("qmgr", `warning: cannot queue a postmaster notice: ${printable((err as Error).message)}`));
  }

  /* Transport security: what each session is allowed and required to do */

  /** Hosts whose TLS handshake failed under "may": the next attempt goes in plaintext, once. */
  /** Address -> the pass its handshake failed in (-1: an earlier run, read from the spool). */
  private readonly plaintextOnce = new Map<string, number>();
  private authFailure: string | null = null;
  /** Counts ticks: "the next attempt" of a host is one in a later pass. */
  private pass = 0;

  /** How a slot talks to this hop: TLS mode (with its plaintext-once memory), timeouts, AUTH, transcripts. */
  session(hop: Hop): Session {
    const o = this.options;
    return {
      connection: {
        host: hop.host, address: hop.address, port: hop.port, helo: o.helo,
        tls: this.tlsModeFor(hop),
        tlsWrapper: o.tls !== "none" && (o.tlsWrapper || (o.relay !== null && hop.port === 465)),
        ca: this.extraCa,
        timeouts: {
          connect: o.connectTimeout, helo: o.heloTimeout, mail: o.mailTimeout, rcpt: o.rcptTimeout, dataInit: o.dataInitTimeout,
          dataXfer: o.dataXferTimeout, dataDone: o.dataDoneTimeout, quit: o.quitTimeout,
        },
      },
      debug: this.isDebugPeer(hop),
      transcript: this.options.notifyClasses.includes("protocol"),
      credentials: this.credentials(),
      waitForQuit: !o.skipQuitResponse,
    };
  }

  /** The TLS policy for this hop: the option, except once, in a later pass, after a failed "may" handshake. */
  private tlsModeFor(hop: Hop): TlsMode {
    const failedIn = this.plaintextOnce.get(hop.address);
    if (this.options.tls === "may" && failedIn !== undefined && failedIn < this.pass) return "none";
    return this.options.tls;
  }

  private extraCaRead = false;
  private extraCaText: string | null = null;
  private get extraCa(): string | null {
    if (!this.extraCaRead && this.options.tlsCa) this.extraCaText = fs.readFileSync(this.options.tlsCa, "utf8");
    this.extraCaRead = true;
    return this.extraCaText;
  }

  /** A handshake failed: under "may", that host gets one plaintext attempt next time (and it is said). */
  tlsFailed(hop: Hop): void {
    if (this.options.tls !== "may") return;
    if (this.plaintextOnce.has(hop.address)) return;
    this.plaintextOnce.set(hop.address, this.pass);
    this.saveTlsFallback();
    this.log.write("smtp", `warning: TLS handshake with ${hop.host}[${hop.address}]:${hop.port} failed; the next attempt to it goes in plaintext (--tls may)`);
  }

  /** Called when a plaintext session under "may" began: the one plaintext attempt is used up. */
  plaintextUsed(hop: Hop): void {
    if (this.plaintextOnce.delete(hop.address)) this.saveTlsFallback();
  }

  /** The hosts owed a plaintext attempt outlive the process: a --flush run is one pass. */
  private saveTlsFallback(): void {
    this.spool.writeState("tls-plaintext", [...this.plaintextOnce.keys()]).catch(() => undefined);
  }

  private async loadTlsFallback(): Promise<void> {
    const saved = await this.spool.readState("tls-plaintext");
    if (Array.isArray(saved)) for (const address of saved) if (typeof address === "string") this.plaintextOnce.set(address, -1);
  }

  private credentials(): Credentials | null {
    const { auth, xoauth2Token } = this.options;
    if (!this.options.relay || (auth == null && xoauth2Token == null)) return null;
    const colon = (auth ?? "").indexOf(":");
    return {
      user: colon >= 0 ? auth!.slice(0, colon) : (auth ?? ""),
      password: colon >= 0 ? auth!.slice(colon + 1) : "",
      token: xoauth2Token,
    };
  }

  /**
   * The relay refused our credentials (535): a permanent failure for this run, reported
   * once. Nothing more is tried; every message stays queued as it was.
   */
  authRefused(reason: string, hop: Hop, reply: Reply): void {
    if (this.authFailure) return;
    this.authFailure = reason;
    this.log.write("smtp", `error: ${reason}; no mail is sent in this run, the queue is kept`);
    this.emit("error", new MailError(reason, "EAUTH", { host: hop.host, stage: STEPS.auth.label, command: "AUTH", response: replyText(reply) }));
    this.backlog = [];
    this.backlogHead = 0;
    for (const dest of this.destinations.values()) this.dropJobs(dest, null);
  }

  /* Outcomes: log line, event, and the queue file's fate */

  recordOutcome(job: Job, input: OutcomeInput): void {
    const outcome: Outcome = { ...input, enhanced: input.dsn, reply: input.reply ?? null };
    const delivery = job.delivery;
    delivery.outcomes.set(outcome.recipient, outcome);
    const now = Date.now();
    const started = job.startedAt || now;
    // Postfix's delays=a/b/c/d: before the queue manager, in it, connection setup, transmission.
    const a = delivery.claimedAt - delivery.msg.arrival;
    const b = started - delivery.claimedAt;
    const c = job.setupMs;
    const d = now - started;
    this.log.write("smtp",
      `${outcome.queueId}: to=<${outcome.recipient}>, relay=${outcome.relay}, delay=${seconds(now - delivery.msg.arrival)}, ` +
      `delays=${seconds(a)}/${seconds(b)}/${seconds(c)}/${seconds(d)}, dsn=${outcome.dsn}, status=${outcome.status} (${outcome.text})`);
    this.emit(outcome.status, outcome);
  }

  jobDone(job: Job): void {
    const delivery = job.delivery;
    if (--delivery.openJobs > 0 || delivery.settling) return this.pump();
    delivery.settling = true;
    // The unlink after a 250 goes first: every moment before it is a window for a duplicate.
    const settled = this.settle(delivery);
    this.pump();
    settled.then(
      (putBack) => this.forget(delivery.msg.id, putBack ?? undefined),
      (err) => this.strand(delivery, err as Error),
    ).finally(() => this.checkIdle());
  }

  /** Deliveries whose settling failed (EIO, ENOSPC, a folder replaced by a file): still ours, tried again each tick. */
  private readonly stranded = new Set<Delivery>();

  /**
   * A settle step failed. The message stays in outgoing_active/, held by this engine (a scan
   * never takes it, the summary counts it as deferred), and the next tick, or stop(), tries
   * the rest of its settlement again.
   */
  private strand(delivery: Delivery, err: Error): void {
    const plan = delivery.settlement;
    if (plan) plan.tries++;
    if (!this.stranded.has(delivery)) this.counts.deferred++;
    this.stranded.add(delivery);
    this.inFlight.delete(delivery.msg.id);
    const error = new MailError(`${delivery.msg.id}: cannot settle the queue file (${plan ? `${plan.fate}, try ${plan.tries}` : "deciding"}): ` +
      `${(err as Error).message}; it stays in outgoing_active/ ${this.stopping ? "until the next start puts it back in outgoing/" : "and is tried again at the next tick"}`,
      "EQUEUE", { queueId: delivery.msg.id });
    this.reportError(error);
  }

  /** Each tick, and at stop(): stranded settlements are tried again from where they stopped. */
  private async retryStranded(): Promise<void> {
    for (const delivery of [...this.stranded]) {
      this.stranded.delete(delivery);
      this.inFlight.add(delivery.msg.id);
      try {
        const putBack = await this.settle(delivery);
        this.log.write("qmgr", `${delivery.msg.id}: settled after ${delivery.settlement?.tries ?? 0} failed tries`);
        this.forget(delivery.msg.id, putBack ?? undefined);
      } catch (err) {
        this.strand(delivery, err as Error);
      }
    }
    this.checkIdle();
  }

  /**
   * All jobs of a delivery are done: bounce what failed for good (a DSN to the sender), then
   * remove the message, or put it in deferred/ with the recipients still pending and the time
   * of its next attempt, or, past --max-queue-lifetime, give those up too. Returns the id it
   * was put back under, or null when it left the queue. Each step is done once: called again
   * after a failure, it goes on from the step that failed.
   */
  private async settle(delivery: Delivery): Promise<string | null> {
    const { msg } = delivery;
    const plan = (delivery.settlement ??= this.planSettlement(delivery));
    while (plan.reports.length > 0) {
      const { outcomes, action } = plan.reports[0];
      const queued = await this.report(delivery, outcomes, action);
      if (action === "delayed" && plan.book) plan.book.warned = queued;
      plan.reports.shift();
    }
    if (plan.fate === "complete") {
      await this.spool.complete(msg.id, delivery.book !== null);
      this.log.write("qmgr", `${msg.id}: removed`);
      if (plan.bounced) this.counts.bounced++;
      else this.counts.sent++;
      return null;
    }
    if (plan.pending.length < msg.recipients.length) await this.spool.rewriteRecipients(msg, plan.pending);
    if (plan.fate === "putBack") return this.putBack(delivery);
    const id = await this.spool.release(msg.id, "deferred", plan.book!);
    this.due.push(id, plan.book!.nextAttempt ?? 0);
    this.counts.deferred++;
    return id;
  }

  /** The decision of settle(), made once (it reads the clock): nothing here touches a file. */
  private planSettlement(delivery: Delivery): Settlement {
    const { msg } = delivery;
    const outcomes = [...delivery.outcomes.values()];
    const pending = msg.recipients.filter((r) => delivery.outcomes.get(r)?.status === "deferred" || !delivery.outcomes.has(r));
    const lastDeferral = outcomes.filter((o) => o.status === "deferred").pop();
    const age = Date.now() - msg.arrival;
    // Nothing went wrong in this attempt, but some recipients were never tried (the engine
    // is stopping, or the relay refused our credentials): no attempt is counted for them.
    const untried = pending.length > 0 && !lastDeferral;
    const expired = pending.length > 0 && !untried && age >= this.options.maxQueueLifetime * 1000;
    const failed = outcomes.filter((o) => o.status === "bounced");
    if (expired) {
      for (const rcpt of pending) {
        const last = delivery.outcomes.get(rcpt) ?? lastDeferral;
        const text = `message expired after ${formatAge(age)} in the queue: ${last?.text ?? "not delivered"}`;
        const outcome: Outcome = { queueId: msg.id, recipient: rcpt, status: "bounced", code: last?.code ?? 0, dsn: last?.dsn ?? "4.4.7",
          enhanced: last?.dsn ?? "4.4.7", text, reply: last?.reply ?? null, relay: last?.relay ?? "none" };
        failed.push(outcome);
        this.emit("bounced", outcome);
      }
      this.log.write("qmgr", `${msg.id}: from=<${msg.sender}>, status=expired, returned to sender`);
    }
    const reports: Settlement["reports"] = [];
    if (failed.length > 0) reports.push({ outcomes: failed, action: "failed" });
    const relayed = outcomes.filter((o) => o.status === "sent" && delivery.sentWithoutDsn.has(o.recipient));
    if (relayed.length > 0 && delivery.book?.dsn?.notify?.includes("success")) reports.push({ outcomes: relayed, action: "relayed" });
    const base = { reports, bounced: failed.length > 0, tries: 0 };
    if (pending.length === 0 || expired) return { fate: "complete", pending: [], book: null, ...base };
    if (!lastDeferral) return { fate: "putBack", pending, book: null, ...base };
    const attempts = (delivery.book?.attempts ?? 0) + 1;
    const book: Bookkeeping = { attempts, nextAttempt: Date.now() + this.backoff(attempts), lastError: lastDeferral.text };
    if (delivery.book?.dsn) book.dsn = delivery.book.dsn;
    if (this.dkimKeys.length > 0) book.prefix = delivery.prefix.toString("base64");
    if (delivery.book?.warned) book.warned = true;
    else if (this.options.delayWarning !== null && age >= this.options.delayWarning * 3600_000) {
      const delayed = pending.map((r) => delivery.outcomes.get(r)).filter((o): o is Outcome => o !== undefined);
      reports.push({ outcomes: delayed, action: "delayed" });
    }
    return { fate: "defer", pending, book, ...base };
  }

  /**
   * A message (or what is left of it) that was not tried: with its bookkeeping unchanged, back
   * to outgoing/ when the engine stops (SPEC section 3), or where it came from after the relay
   * refused our credentials, to wait for a later run.
   */
  private async putBack(delivery: Delivery): Promise<string> {
    const to = this.stopping ? "outgoing" : delivery.from;
    const id = await this.spool.release(delivery.msg.id, to);
    if (this.authFailure) this.counts.deferred++;
    if (to === "deferred") this.due.push(id, delivery.book?.nextAttempt ?? 0);
    return id;
  }

  /** Postfix's backoff: --min-backoff after the first failure, doubling up to --max-backoff. */
  private backoff(attempts: number): number {
    const { minBackoff, maxBackoff } = this.options;
    return Math.min(maxBackoff, minBackoff * 2 ** Math.min(attempts - 1, 30)) * 1000;
  }

  /**
   * A delivery status notification (RFC 3464) to the sender: "failed" for what bounced,
   * "delayed" for the one --delay-warning asks for, "relayed" for NOTIFY=SUCCESS through a
   * server without DSN. The sender's RFC 3461 wishes rule: NOTIFY says which reports it
   * wants (none with NEVER), RET=FULL returns the message (up to 50 kB, as Postfix's
   * bounce_size_limit), ENVID comes back. Never to the null sender (no mail loops). A copy
   * of the headers-only report goes to the postmaster for the classes --notify-classes
   * names. Returns whether the sender's report was queued.
   */
  private async report(delivery: Delivery, outcomes: Outcome[], action: "failed" | "delayed" | "relayed"): Promise<boolean> {
    const { msg } = delivery;
    const dsn = delivery.book?.dsn;
    const wanted = action === "failed" ? "failure" : action === "delayed" ? "delay" : "success";
    const senderWants = msg.sender !== "" && (dsn?.notify ? dsn.notify.includes(wanted) : action !== "relayed");
    const postmasterClass = action === "failed" ? "bounce" : action === "delayed" ? "delay" : null;
    const postmasterWants = postmasterClass !== null && this.options.notifyClasses.includes(postmasterClass);
    if (!senderWants) {
      if (action === "failed") {
        this.log.write("qmgr", msg.sender === ""
          ? `${msg.id}: undeliverable mail from the null sender is dropped, not bounced (no mail loops)`
          : `${msg.id}: no non-delivery notification: the sender asked for NOTIFY=${(dsn?.notify ?? []).join(",").toUpperCase()}`);
      }
      if (!postmasterWants) return false;
    }
    const now = new Date();
    const headers = await this.spool.headerBlock(msg);
    const full = dsn?.ret === "full" && msg.size <= 50_000;
    const body = full ? await this.bodyOf(msg, headers.length) : undefined;
    const base = {
      queueId: msg.id,
      arrival: new Date(msg.arrival),
      reportingMta: this.options.helo,
      recipients: outcomes.map((o) => ({
        recipient: o.recipient,
        action,
        status: o.dsn,
        remoteMta: o.relay === "none" ? undefined : o.relay.replace(/\[.*$/, ""),
        diagnostic: o.reply ?? o.text,
        reason: o.text,
        lastAttempt: now,
        willRetryUntil: action === "delayed" ? new Date(msg.arrival + this.options.maxQueueLifetime * 1000) : undefined,
      })),
      originalHeaders: headers,
      ...(dsn?.envid ? { envid: dsn.envid } : {}),
      now,
    };
    const kind = action === "failed" ? "non-delivery" : action === "delayed" ? "delay" : "success";
    if (senderWants) {
      const content = composeBounce({ ...base, sender: msg.sender, ...(body ? { returnContent: "full" as const, originalBody: body } : {}) });
      await this.queueReport(content, `${msg.id}: sender ${kind} notification`);
    }
    if (postmasterWants) {
      await this.queueReport(composeBounce({ ...base, sender: this.postmaster }), `${msg.id}: postmaster ${kind} notification`);
    }
    return senderWants;
  }

  private async queueReport(content: Buffer, what: string): Promise<void> {
    const id = await this.spool.create(content);
    this.log.write("qmgr", `${what}: ${id}`);
    if (this.active && !this.stopping) {
      this.enqueue(id);
      this.scheduleTick();
    }
  }

  /** The body of a small message (after its header block), for RET=FULL. */
  private async bodyOf(msg: QueuedMessage, headerLength: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const chunk of this.spool.content(msg)) parts.push(chunk);
    const whole = Buffer.concat(parts);
    const rest = whole.subarray(headerLength);
    // Skip the blank line that separates headers and body.
    const skip = rest[0] === 0x0d && rest[1] === 0x0a ? 2 : rest[0] === 0x0a ? 1 : 0;
    return rest.subarray(skip);
  }

  private async quarantine(id: string, from: "outgoing" | "outgoing_active", reason: string): Promise<void> {
    const moved = await this.spool.quarantine(id, from, reason);
    this.log.write("qmgr", `${printable(id)}: corrupt queue file moved to corrupt/${printable(moved)}: ${printable(reason)}`);
    this.counts.corrupt++;
    this.emit("error", new MailError(`${id}: corrupt queue file: ${reason}`, "ECORRUPT", { queueId: id }));
  }

  private reportError(err: Error): void {
    const error = err instanceof MailError ? err : new MailError(err.message, "EINTERNAL");
    this.log.write("qmgr", `warning: ${printable(error.message, 1000)}`);
    this.emit("error", error);
    // notify_classes: a file system problem is "resource", anything else "software".
    const kind = error.code === "EQUEUE" || errno(err) !== undefined ? "resource" : "software";
    if (this.options.notifyClasses.includes(kind) && !this.stopping) {
      this.queueNotice(kind, `Postmaster Copy: mudmail ${kind} problem`, `The mail system on ${this.options.helo} had a ${kind} problem:\n\n${error.message}\n`);
    }
  }

  /* Idle: the pass is over when nothing waits, nothing is read ahead, no slot is busy */

  private isIdle(): boolean {
    return this.slots.size === 0 && this.preparing === 0 && this.inFlight.size === 0 && !this.scanning &&
      (this.stopping || (this.backlogHead >= this.backlog.length && this.queuedJobs === 0));
  }

  private checkIdle(): void {
    if (!this.isIdle()) return;
    for (const waiter of this.idleWaiters.splice(0)) waiter();
  }

  private idle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private releaseLock(): void {
    this.spool.unlock();
    this.initialized = null;
  }
}

function emptySummary(): FlushSummary {
  return { sent: 0, deferred: 0, bounced: 0, corrupt: 0, messages: 0, recipients: 0, seconds: 0 };
}

/* ------------------------------------------------------------------------------------ */
/* Composing                                                                             */

/** RFC 5322 date: "Mon, 23 Nov 2026 15:44:09 +0000" in local time. */
export function rfc5322Date(date = new Date()): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const pad = (n: number) => String(n).padStart(2, "0");
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  const abs = Math.abs(offset);
  return `${days[date.getDay()]}, ${date.getDate()} ${MONTHS[date.getMonth()]} ${date.getFullYear()} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())} ${sign}${pad(Math.floor(abs / 60))}${pad(abs % 60)}`;
}

/** "2d 3h", "5h 12m", "40m": how long a message has waited, for people. */
function formatAge(ms: number): string {
  const m = Math.floor(ms / 60000);
  const d = Math.floor(m / 1440), h = Math.floor((m % 1440) / 60), min = m % 60;
  return d > 0 ? `${d}d ${h}h` : h > 0 ? `${h}h ${min}m` : `${min}m`;
}

/** 20261123154409: the arrival time in a Message-ID, as Postfix writes it. */
function compactDate(d: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getUTCFullYear()}${pad(d.getUTCMonth() + 1)}${pad(d.getUTCDate())}${pad(d.getUTCHours())}${pad(d.getUTCMinutes())}${pad(d.getUTCSeconds())}`;
}

/** The header fields SPEC section 2 has the engine add when the message lacks them. */
function addedHeaders(facts: HeaderFacts, msg: QueuedMessage, helo: string): Buffer {
  let text = "";
  if (!facts.hasDate) text += `Date: ${rfc5322Date(new Date(msg.arrival))}\r\n`;
  // Derived from the queue id alone, so every attempt (and every recipient) sees the same one.
  if (!facts.hasMessageId) text += `Message-ID: <${compactDate(new Date(msg.arrival))}.${msg.id}@${helo}>\r\n`;
  if (!facts.hasFrom) text += `From: ${msg.sender === "" ? `MAILER-DAEMON@${helo}` : msg.sender}\r\n`;
  if (!facts.startsWithHeader) text += "\r\n";
  return Buffer.from(text);
}

function addressList(value: string | string[] | undefined): string[] {
  if (value === undefined) return [];
  return (Array.isArray(value) ? value : [value]).flatMap((v) => v.split(/[,\s]+/)).filter(Boolean);
}

/** Encodes a header value as an RFC 2047 word when it is not plain ASCII. */
function headerValue(value: string): string {
  // eslint-disable-next-line no-control-regex
  const clean = value.replace(/[\r\n]+/g, " ");
  // eslint-disable-next-line no-control-regex
  return /^[\x20-\x7e]*$/.test(clean) ? clean : `=?UTF-8?B?${Buffer.from(clean).toString("base64")}?=`;
}

/** A queue file for send(): envelope lines, then a complete message. */
export function composeMessage(message: SendMessage, helo: string): Buffer {
  const to = addressList(message.to);
  const cc = addressList(message.cc);
  const from = message.from.replace(/^<|>$/g, "");
  if (from !== "" && addressProblem(from)) throw new MailError(`bad sender ${JSON.stringify(message.from)}: ${addressProblem(from)}`, "EENVELOPE");
  if (to.length + cc.length === 0) throw new MailError("no recipients", "EENVELOPE");
  for (const rcpt of [...to, ...cc]) {
    const problem = addressProblem(rcpt);
    if (problem) throw new MailError(`bad recipient ${JSON.stringify(rcpt)}: ${problem}`, "EENVELOPE");
  }
  const envelope = `${from === "" ? "<>" : from}\n${[...to, ...cc].map((r) => r.replace(/^<|>$/g, "")).join(", ")}\n`;
  if (message.raw !== undefined) return Buffer.concat([Buffer.from(envelope), Buffer.from(message.raw)]);
  const text = message.text ?? "";
  const eightBit = /[^\x00-\x7f]/.test(text);
  const headers = [
    `From: ${from || `MAILER-DAEMON@${helo}`}`,
    `To: ${to.join(", ")}`,
    ...(cc.length ? [`Cc: ${cc.join(", ")}`] : []),
    `Subject: ${headerValue(message.subject ?? "")}`,
    `Date: ${rfc5322Date()}`,
    `Message-ID: <${Date.now()}.${randomBytes(8).toString("hex")}@${helo}>`,
    "MIME-Version: 1.0",
    `Content-Type: text/plain; charset=${eightBit ? "utf-8" : "us-ascii"}`,
    `Content-Transfer-Encoding: ${eightBit ? "8bit" : "7bit"}`,
    ...Object.entries(message.headers ?? {}).map(([k, v]) => `${k.replace(/[^\x21-\x39\x3b-\x7e]/g, "")}: ${headerValue(v)}`),
  ];
  const body = text.replace(/\r?\n/g, "\n");
  return Buffer.from(`${envelope}${headers.join("\n")}\n\n${body}${body.endsWith("\n") || body === "" ? "" : "\n"}`);
}

/* ------------------------------------------------------------------------------------ */
/* The command line                                                                      */

type FlagKind = "bool" | "int" | "string" | "list";
interface FlagSpec { kind: FlagKind; key?: keyof MailOptions; help: string; arg?: string }

const MODE_FLAGS: Record<string, FlagSpec> = {
  "--flush": { kind: "bool", help: "one pass: send every message that is due, wait, print a summary, exit" },
  "--force": { kind: "bool", help: "with --flush: deferred messages count as due" },
  "--queue": { kind: "bool", help: "list the queue like mailq" },
  "--json": { kind: "bool", help: "with --queue: the JSON listing" },
  "--send": { kind: "bool", help: "compose a message from standard input and queue it; prints the queue id" },
  "-f": { kind: "string", arg: "FROM", help: "with --send: the envelope sender and From:" },
  "-s": { kind: "string", arg: "SUBJECT", help: "with --send: the Subject:" },
  "--notify": { kind: "string", arg: "LIST", help: "with --send: DSN NOTIFY, never or success,failure,delay" },
  "--ret": { kind: "string", arg: "full|hdrs", help: "with --send: DSN RET" },
  "--serve": { kind: "bool", help: "run the built-in SMTP receiver for the local mailboxes in users/" },
  "--demo": { kind: "bool", help: "on loopback only: receiver, queue, flush, show where it landed" },
  "--help": { kind: "bool", help: "this text" },
  "--version": { kind: "bool", help: "the version" },
  "--listen": { kind: "string", arg: "HOST:PORT", help: "--serve: where to listen (127.0.0.1:2525)" },
  "--hostname": { kind: "string", arg: "NAME", help: "--serve: the name in the greeting" },
  "--max-size": { kind: "int", arg: "BYTES", help: "--serve: message size limit (10 MB)" },
  "--max-recipients": { kind: "int", arg: "N", help: "--serve: recipients per message, 100..1000 (100)" },
  "--tls-cert": { kind: "string", arg: "FILE", help: "--serve: certificate for STARTTLS" },
  "--tls-key": { kind: "string", arg: "FILE", help: "--serve: key for STARTTLS" },
  "--dkim-keygen": { kind: "bool", help: "write a new DKIM key and print its DNS record" },
  "--dkim-algorithm": { kind: "string", arg: "ed25519|rsa", help: "DKIM key type for --dkim-keygen" },
  "--dkim-print-dns": { kind: "bool", help: "print the DNS record of an existing DKIM key" },
  "--check-domain": { kind: "string", arg: "D", help: "check MX, SPF, DMARC, DKIM of a domain" },
  "--source-ip": { kind: "string", arg: "IP", help: "with --check-domain: check this address's PTR" },
  "--vrfy": { kind: "string", arg: "ADDRESS", help: "ask --relay to verify an address" },
  "--expn": { kind: "string", arg: "NAME", help: "ask --relay to expand a list" },
  "--help-server": { kind: "string", arg: "[TOPIC]", help: "ask --relay for HELP" },
};

const OPTION_FLAGS: Record<string, FlagSpec> = {
  "--maildir": { kind: "string", key: "maildir", arg: "DIR", help: "the spool (./maildir)" },
  "--relay": { kind: "string", key: "relay", arg: "HOST[:PORT]", help: "send everything through this smarthost, no MX lookup" },
  "--port": { kind: "int", key: "port", arg: "N", help: "TCP port for hosts found by MX/A lookup (25)" },
  "--resolver": { kind: "string", key: "resolver", arg: "IP[:PORT]", help: "DNS server for MX/A lookups (the system's)" },
  "--max-connections": { kind: "int", key: "maxConnections", arg: "N", help: "connection slots (5)" },
  "--helo": { kind: "string", key: "helo", arg: "NAME", help: "name sent in EHLO/HELO (the host name)" },
  "--tls": { kind: "string", key: "tls", arg: "MODE", help: "none, may, encrypt or verify (may; verify with --auth)" },
  "--tls-ca": { kind: "string", key: "tlsCa", arg: "FILE", help: "extra CA bundle for --tls verify" },
  "--tls-wrapper": { kind: "bool", key: "tlsWrapper", help: "implicit TLS from the first byte (SMTPS; a relay on port 465 implies it)" },
  "--auth": { kind: "string", key: "auth", arg: "USER:PASS", help: "SMTP AUTH to the relay; MUDMAIL_AUTH is preferred (MUDMAIL_XOAUTH2: a bearer token)" },
  "--log": { kind: "string", key: "log", arg: "FILE", help: "where log lines go (standard error)" },
  "--connect-timeout": { kind: "int", key: "connectTimeout", arg: "S", help: "smtp_connect_timeout (30)" },
  "--helo-timeout": { kind: "int", key: "heloTimeout", arg: "S", help: "smtp_helo_timeout (300)" },
  "--mail-timeout": { kind: "int", key: "mailTimeout", arg: "S", help: "smtp_mail_timeout (300)" },
  "--rcpt-timeout": { kind: "int", key: "rcptTimeout", arg: "S", help: "smtp_rcpt_timeout (300)" },
  "--data-init-timeout": { kind: "int", key: "dataInitTimeout", arg: "S", help: "smtp_data_init_timeout (120)" },
  "--data-xfer-timeout": { kind: "int", key: "dataXferTimeout", arg: "S", help: "smtp_data_xfer_timeout (180)" },
  "--data-done-timeout": { kind: "int", key: "dataDoneTimeout", arg: "S", help: "smtp_data_done_timeout (600)" },
  "--quit-timeout": { kind: "int", key: "quitTimeout", arg: "S", help: "smtp_quit_timeout (300)" },
  "--min-backoff": { kind: "int", key: "minBackoff", arg: "S", help: "minimal_backoff_time (300)" },
  "--max-backoff": { kind: "int", key: "maxBackoff", arg: "S", help: "maximal_backoff_time (4000)" },
  "--max-queue-lifetime": { kind: "int", key: "maxQueueLifetime", arg: "S", help: "maximal_queue_lifetime (432000)" },
  "--fallback-relay": { kind: "string", key: "fallbackRelay", arg: "HOST[:PORT]", help: "fallback_relay" },
  "--inet-interfaces": { kind: "list", key: "inetInterfaces", arg: "LIST", help: "inet_interfaces, for mail-loop detection" },
  "--best-mx-relay": { kind: "string", key: "bestMxRelay", arg: "HOST[:PORT]", help: "best_mx_transport" },
  "--ignore-mx-lookup-error": { kind: "bool", key: "ignoreMxLookupError", help: "ignore_mx_lookup_error" },
  "--disable-dns-lookups": { kind: "bool", key: "disableDnsLookups", help: "disable_dns_lookups (needs --relay)" },
  "--skip-quit-response": { kind: "bool", key: "skipQuitResponse", help: "smtp_skip_quit_response (on)" },
  "--no-skip-quit-response": { kind: "bool", help: "wait for the reply to QUIT" },
  "--notify-classes": { kind: "list", key: "notifyClasses", arg: "LIST", help: "notify_classes (resource,software)" },
  "--postmaster": { kind: "string", key: "postmaster", arg: "ADDRESS", help: "error_notice_recipient" },
  "--debug-peer": { kind: "list", key: "debugPeer", arg: "HOST|IP|CIDR", help: "debug_peer_list (repeatable)" },
  "--delay-warning": { kind: "int", key: "delayWarning", arg: "HOURS", help: "delay_warning_time (off)" },
  "--dkim-domain": { kind: "string", key: "dkimDomain", arg: "D", help: "DKIM: sign mail From this domain (or a subdomain)" },
  "--dkim-selector": { kind: "string", key: "dkimSelector", arg: "S", help: "DKIM: the selector (S._domainkey.D)" },
  "--dkim-key": { kind: "string", key: "dkimKey", arg: "FILE", help: "DKIM: the private key (PEM; RSA >= 2048 bits or Ed25519)" },
  "--dkim-keys": { kind: "string", key: "dkimKeys", arg: "FILE", help: "DKIM: a JSON table of From domains to selector and key" },
};

export function usage(): string {
  const rows = (table: Record<string, FlagSpec>) => Object.entries(table)
    .map(([flag, spec]) => `  ${`${flag}${spec.arg ? ` ${spec.arg}` : ""}`.padEnd(34)} ${spec.help}`).join("\n");
  return `mudmail ${VERSION} - an outgoing-mail engine for programs that live in one event loop

Usage: node dist/mail.js [MODE] [OPTIONS]
  (no mode)                          run: flush now, then every 60 s and when mail is queued;
                                     SIGINT/SIGTERM stop gracefully
  --send -f FROM [-s SUBJECT] RCPT...  compose from standard input and queue

Modes and their flags:
${rows(MODE_FLAGS)}

Options:
${rows(OPTION_FLAGS)}

Exit status: 0 when the run or pass worked (deferred and bounced mail is a normal outcome),
2 for a usage or configuration error, 1 for anything else.
`;
}

interface Parsed { modes: Record<string, string | boolean>; options: MailOptions; rest: string[] }

export function parseArgs(argv: string[]): Parsed {
  const modes: Record<string, string | boolean> = {};
  const options: Record<string, unknown> = {};
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let inline: string | undefined;
    const eq = arg.indexOf("=");
    if (arg.startsWith("--") && eq > 0) {
      inline = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const spec = MODE_FLAGS[arg] ?? OPTION_FLAGS[arg];
    if (!spec) {
      if (arg.startsWith("-") && arg !== "-") throw new UsageError(`unknown flag ${arg} (see --help)`);
      rest.push(arg);
      continue;
    }
    let value: string | boolean = true;
    if (spec.kind !== "bool") {
      const next = argv[i + 1];
      const nextIsFlag = next !== undefined && (next in MODE_FLAGS || next in OPTION_FLAGS || next.split("=")[0] in OPTION_FLAGS);
      if (inline !== undefined) value = inline;
      else if (arg === "--help-server" && (next === undefined || next.startsWith("-"))) value = "";
      else if (next !== undefined && !nextIsFlag) value = argv[++i];
      else throw new UsageError(`${arg}: missing value ${spec.arg ?? ""}`.trim());
    } else if (inline !== undefined) {
      throw new UsageError(`${arg} takes no value`);
    }
    if (arg === "--no-skip-quit-response") { options.skipQuitResponse = false; continue; }
    if (!spec.key) {
      if (spec.kind === "int") value = String(intValue(arg, String(value)));
      modes[arg] = value;
      continue;
    }
    if (spec.kind === "int") options[spec.key] = intValue(arg, String(value));
    else if (spec.kind === "list") {
      const list = String(value).split(/[,\s]+/).filter(Boolean);
      options[spec.key] = spec.key === "debugPeer" ? [...((options[spec.key] as string[]) ?? []), ...list] : list;
    } else options[spec.key] = value;
  }
  return { modes, options: options as MailOptions, rest };
}

function intValue(flag: string, text: string): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`${flag}: expected a whole number, got ${JSON.stringify(text)}`);
  return Number(text);
}

async function readStdin(): Promise<Buffer> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Uint8Array);
  return Buffer.concat(chunks);
}

/** `node dist/mail.js ...`: returns the exit status. */
export async function main(argv: string[]): Promise<number> {
  let parsed: Parsed;
  let engine: MailEngine;
  try {
    parsed = parseArgs(argv);
    const { modes, options } = parsed;
    if (modes["--help"]) { process.stdout.write(usage()); return 0; }
    if (modes["--version"]) { process.stdout.write(`mudmail ${VERSION}\n`); return 0; }
    if (options.auth != null) process.stderr.write("mudmail: warning: --auth shows the password in the process table; prefer MUDMAIL_AUTH\n");
    else if (process.env.MUDMAIL_AUTH) options.auth = process.env.MUDMAIL_AUTH;
    if (process.env.MUDMAIL_XOAUTH2) options.xoauth2Token = process.env.MUDMAIL_XOAUTH2;
    if (modes["--max-recipients"] !== undefined) {
      const n = Number(modes["--max-recipients"]);
      if (n < 100 || n > 1000) throw new UsageError(`--max-recipients: expected 100..1000, got ${n}`);
    }
    for (const flag of ["--force", "--json", "--notify", "--ret", "-f", "-s"]) {
      const needs = flag === "--force" ? "--flush" : flag === "--json" ? "--queue" : "--send";
      if (modes[flag] && !modes[needs]) throw new UsageError(`${flag} goes with ${needs}`);
    }
    const chosen = ["--flush", "--queue", "--send", "--serve", "--demo", "--dkim-keygen", "--dkim-print-dns", "--check-domain", "--vrfy", "--expn", "--help-server"]
      .filter((m) => modes[m] !== undefined);
    if (chosen.length > 1) throw new UsageError(`choose one mode, not ${chosen.join(" and ")}`);
    if (!modes["--send"] && parsed.rest.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(parsed.rest[0])}`);
    const mode = chosen[0];
    // Modes that do not send from the spool come first: --dkim-keygen's --dkim-key is a file still to be made.
    if (mode === "--dkim-keygen") return await dkimKeygen(modes, options);
    if (mode === "--dkim-print-dns") return printDkimDns(options);
    if (mode === "--check-domain") return await checkDomainMode(String(modes["--check-domain"]), modes, options);
    if (mode === "--vrfy" || mode === "--expn" || mode === "--help-server") return await ask(mode, String(modes[mode]), options);
    if (mode === "--serve") return await serve(serverOptions(modes, options));
    engine = new MailEngine(options);
    if (mode === "--demo") return await demo(modes, options);
    if (mode === "--send") {
      if (typeof modes["-f"] !== "string") throw new UsageError("--send needs -f FROM");
      if (parsed.rest.length === 0) throw new UsageError("--send needs at least one recipient");
      for (const rcpt of parsed.rest) {
        const problem = addressProblem(rcpt);
        if (problem) throw new UsageError(`--send: bad recipient ${JSON.stringify(rcpt)}: ${problem}`);
      }
      const sender = modes["-f"];
      if (sender !== "" && sender !== "<>" && addressProblem(sender)) throw new UsageError(`-f: bad sender ${JSON.stringify(sender)}: ${addressProblem(sender)}`);
      const dsn = modes["--notify"] !== undefined || modes["--ret"] !== undefined ? {
        ...(typeof modes["--notify"] === "string" ? { notify: modes["--notify"].split(",").map((n) => n.trim()) as Array<"never"> } : {}),
        ...(typeof modes["--ret"] === "string" ? { ret: modes["--ret"].toLowerCase() as "full" } : {}),
      } : undefined;
      checkDsn(dsn);
      const text = (await readStdin()).toString("utf8");
      const id = await engine.send({ from: sender === "<>" ? "" : sender, to: parsed.rest, subject: typeof modes["-s"] === "string" ? modes["-s"] : "", text, dsn });
      process.stdout.write(`${id}\n`);
      return 0;
    }
  } catch (err) {
    if (err instanceof UsageError || err instanceof DkimConfigError) {
      process.stderr.write(`mudmail: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const { modes } = parsed;
  if (modes["--queue"]) return listQueue(engine, Boolean(modes["--json"]));
  if (modes["--flush"]) return flushOnce(engine, Boolean(modes["--force"]));
  await engine.spool.init(); // an unusable spool stops the daemon now, not at its first tick
  return runDaemon(engine);
}

/** The receiver's options from the command line; checked, so a bad one exits 2 naming its flag. */
function serverOptions(modes: Record<string, string | boolean>, options: MailOptions): ServerOptions {
  const value = (flag: string) => (typeof modes[flag] === "string" ? (modes[flag] as string) : undefined);
  const number = (flag: string) => (value(flag) === undefined ? undefined : Number(value(flag)));
  const serve: ServerOptions = {
    maildir: options.maildir ?? DEFAULTS.maildir,
    listen: value("--listen"),
    hostname: value("--hostname") ?? options.helo,
    maxSize: number("--max-size"),
    maxRecipients: number("--max-recipients"),
    tlsCert: value("--tls-cert") ?? null,
    tlsKey: value("--tls-key") ?? null,
    ...(typeof options.log === "string" ? { log: appendLine(options.log) } : {}),
  };
  checkServerOptions(serve);
  return serve;
}

function appendLine(file: string): (line: string) => void {
  const stream = fs.createWriteStream(file, { flags: "a", mode: 0o600 });
  return (line) => stream.write(line + "\n");
}

/** --serve: the receiver until SIGINT or SIGTERM. */
async function serve(options: ServerOptions): Promise<number> {
  const server = await startServer(options).catch((err: NodeJS.ErrnoException) => {
    // An address that cannot be had is a configuration error: exit 2, naming the flag.
    if (err.syscall === "listen" || err.syscall === "getaddrinfo" || err.code === "ENOTFOUND") {
      throw new UsageError(`--listen: cannot listen on ${options.listen ?? "127.0.0.1:2525"}: ${err.message}`);
    }
    throw err;
  });
  process.stderr.write(`mudmail: receiving mail for ${path.join(options.maildir, "users")}/<address>/ on ${server.address.host}:${server.address.port}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => { process.off("SIGINT", stop); process.off("SIGTERM", stop); resolve(); };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
  });
  await server.close();
  return 0;
}

/**
 * --demo: the whole path on loopback, in a fresh spool: the receiver on a free port with a
 * demo user, a message queued through the engine, flushed through the relay at the receiver,
 * then the log lines and the mailbox it landed in.
 */
async function demo(modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const maildir = options.maildir ?? path.join(await fs.promises.mkdtemp(path.join(os.tmpdir(), "mudmail-demo-")), "maildir");
  const user = "demo@localhost";
  await new Spool(maildir).init();
  await fs.promises.mkdir(path.join(maildir, "users", user), { recursive: true, mode: 0o700 });
  const journal: string[] = [];
  const server = await startServer({ maildir, listen: "127.0.0.1:0", hostname: "localhost", log: (line) => journal.push(line) });
  const stored = new Promise<string[]>((resolve) => server.once("message", (m: { mailboxes: string[] }) => resolve(m.mailboxes)));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.address.port}`, tls: "may", helo: "localhost", log: (l) => lines.push(l) });
  try {
    const say = (text: string) => process.stdout.write(`${text}\n`);
    say(`mudmail demo: a receiver on 127.0.0.1:${server.address.port} with the user ${user}, the spool in ${maildir}`);
    const id = await engine.send({ from: "talker@localhost", to: user, subject: "Welcome to the talker", text: "Hello from mudmail!\n.\nThis line follows a line with a lone dot.\n" });
    say(`queued ${id}; flushing through the relay at the receiver...\n`);
    const summary = await engine.flush();
    await engine.stop();
    for (const l of lines) say(l);
    say(`\nmudmail: flush: ${summary.sent} sent, ${summary.deferred} deferred, ${summary.bounced} bounced, ${summary.corrupt} corrupt`);
    const [mailbox] = await Promise.race([stored, new Promise<string[]>((_, reject) => setTimeout(() => reject(new Error("the receiver stored nothing")), 10_000))]);
    say(`\nThe receiver's journal:`);
    for (const l of journal) say(`  ${l}`);
    say(`\nIt landed in ${mailbox}:\n`);
    say((await fs.promises.readFile(mailbox, "utf8")).replace(/\n$/, ""));
    return summary.sent === 1 ? 0 : 1;
  } finally {
    await engine.stop();
    await server.close();
  }
}

/** --dkim-keygen: a new private key (0600) and the TXT record to publish, with SPF and DMARC starters. */
async function dkimKeygen(modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const domain = options.dkimDomain;
  const selector = options.dkimSelector;
  if (!domain) throw new UsageError("--dkim-keygen needs --dkim-domain D");
  if (!selector) throw new UsageError("--dkim-keygen needs --dkim-selector S");
  const algorithm = typeof modes["--dkim-algorithm"] === "string" ? modes["--dkim-algorithm"] : "ed25519";
  if (algorithm !== "ed25519" && algorithm !== "rsa") throw new UsageError(`--dkim-algorithm: expected ed25519 or rsa, got ${JSON.stringify(algorithm)}`);
  const file = options.dkimKey ?? `${selector}.${domain}.${algorithm}.key`;
  const key = await generateDkimKey(algorithm, file, { domain, selector });
  process.stdout.write(`Wrote the private key to ${file} (mode 0600). Publish:\n\n`);
  printRecords(key, options, modes);
  return 0;
}

function printRecords(key: DkimKey, options: MailOptions, modes: Record<string, string | boolean>): void {
  const record = dnsRecord(key);
  const out: string[] = [`; DKIM (${key.algorithm}, selector ${key.selector})`, record.zone, `; ${record.note}`];
  const ip = typeof modes["--source-ip"] === "string" ? modes["--source-ip"] : null;
  if (ip) {
    const spf = spfRecord(key.domain, ip);
    out.push("", "; SPF: the address mail leaves from", spf.zone, `; ${spf.note}`);
  } else {
    out.push("", "; SPF: give --source-ip ADDRESS for a record naming the address mail leaves from");
  }
  const dmarc = dmarcRecord(key.domain);
  out.push("", "; DMARC starter", dmarc.zone, `; ${dmarc.note}`);
  process.stdout.write(out.join("\n") + "\n");
  void options;
}

/** --dkim-print-dns: the TXT record of each configured key. */
function printDkimDns(options: MailOptions): number {
  const keys = loadDkimKeys({ domain: options.dkimDomain, selector: options.dkimSelector, keyFile: options.dkimKey, keysFile: options.dkimKeys });
  if (keys.length === 0) throw new UsageError("--dkim-print-dns needs --dkim-domain, --dkim-selector and --dkim-key, or --dkim-keys");
  for (const key of keys) printRecords(key, options, {});
  return 0;
}

/** --check-domain: MX, SPF, DMARC, DKIM and PTR in one table; a published key that is not ours exits 2. */
async function checkDomainMode(domain: string, modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const keys = loadDkimKeys({ domain: options.dkimDomain, selector: options.dkimSelector, keyFile: options.dkimKey, keysFile: options.dkimKeys });
  const rows = await checkDomain(domain, {
    resolver: options.resolver ?? null,
    keys,
    sourceIp: typeof modes["--source-ip"] === "string" ? modes["--source-ip"] : null,
  });
  process.stdout.write(formatCheck(rows) + "\n");
  const mismatch = rows.find((r) => r.error);
  if (mismatch?.error) throw mismatch.error;
  return 0;
}

/** --vrfy, --expn, --help-server: one question to --relay, its reply printed as the server gave it. */
async function ask(mode: string, what: string, options: MailOptions): Promise<number> {
  if (!options.relay) throw new UsageError(`${mode} needs --relay HOST[:PORT]: the server to ask`);
  const { host, port } = parseHostPort(options.relay, "--relay", 25);
  const client = { host, port, helo: options.helo, tls: options.tls ?? "may", tlsWrapper: options.tlsWrapper };
  const call = mode === "--vrfy" ? vrfy : mode === "--expn" ? expn : help;
  try {
    const reply = await call(what, client);
    const lines = reply.text.length ? reply.text : [""];
    process.stdout.write(lines.map((l, i) => `${reply.code}${i < lines.length - 1 ? "-" : " "}${l}`).join("\n") + "\n");
    return 0;
  } catch (err) {
    process.stderr.write(`mudmail: ${(err as Error).message}\n`);
    return 1;
  }
}

async function flushOnce(engine: MailEngine, force: boolean): Promise<number> {
  const live = process.stderr.isTTY ? setInterval(() => {
    const p = engine.progress;
    process.stderr.write(`\rmudmail: ${p.sent} sent, ${p.deferred} deferred, ${p.bounced} bounced, ${p.corrupt} corrupt; ${p.busySlots} connections, ${p.waiting} waiting `);
  }, 200) : null;
  const stopOnSignal = () => { void engine.stop(); };
  process.once("SIGINT", stopOnSignal);
  process.once("SIGTERM", stopOnSignal);
  try {
    const s = await engine.flush({ force });
    if (live) { clearInterval(live); process.stderr.write("\r\x1b[K"); }
    await engine.stop(); // the last log lines go out before the summary
    process.stdout.write(`mudmail: flush: ${s.sent} sent, ${s.deferred} deferred, ${s.bounced} bounced, ${s.corrupt} corrupt ` +
      `(${s.messages} messages, ${s.recipients} recipients, ${s.seconds.toFixed(2)} s)\n`);
    return 0;
  } finally {
    if (live) clearInterval(live);
    process.off("SIGINT", stopOnSignal);
    process.off("SIGTERM", stopOnSignal);
  }
}

async function runDaemon(engine: MailEngine): Promise<number> {
  engine.on("error", () => undefined); // already logged
  engine.start();
  // The engine's own timer is unref'd (an embedder's process may exit); the daemon stays up.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off("SIGINT", stop);
      process.off("SIGTERM", stop);
      void engine.stop().then(resolve);
    };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
  });
  clearInterval(keepAlive);
  return 0;
}

export interface QueueEntry {
  id: string;
  state: "queued" | "active" | "deferred" | "corrupt";
  sender: string | null;
  recipients: string[];
  size: number;
  queuedAt: string;
  attempts: number;
  nextAttempt: string | null;
  lastError: string | null;
}

/** Every message in the spool, oldest first: the data of --queue and --queue --json. */
export async function queueEntries(spool: Spool): Promise<QueueEntry[]> {
  await spool.init();
  const states = [["outgoing", "queued"], ["outgoing_active", "active"], ["deferred", "deferred"], ["corrupt", "corrupt"]] as const;
  const entries: QueueEntry[] = [];
  for (const [folder, state] of states) {
    const { ids, badNames } = await spool.scan(folder);
    for (const id of [...ids, ...(folder === "corrupt" ? badNames : [])]) {
      const book = await spool.readBookkeeping(id, folder);
      const base = { id, state, attempts: book?.attempts ?? 0, nextAttempt: book?.nextAttempt ? new Date(book.nextAttempt).toISOString() : null, lastError: book?.lastError ?? null };
      try {
        const msg = await spool.open(id, folder);
        entries.push({ ...base, sender: msg.sender, recipients: msg.recipients, size: msg.size, queuedAt: new Date(msg.arrival).toISOString() });
      } catch (err) {
        if (errno(err) === "ENOENT") continue; // sent or moved while we listed
        const st = await fs.promises.stat(spool.pathOf(folder, id)).catch(() => null);
        if (!st) continue;
        entries.push({ ...base, sender: null, recipients: [], size: st.size, queuedAt: new Date(st.mtimeMs).toISOString(),
          lastError: base.lastError ?? (err as Error).message });
      }
    }
  }
  return entries.sort((a, b) => a.queuedAt.localeCompare(b.queuedAt) || compareIds(a.id, b.id));
}

function compareIds(a: string, b: string): number {
  const [as, asub] = a.split(".").map(Number);
  const [bs, bsub] = b.split(".").map(Number);
  return as - bs || asub - bsub || a.localeCompare(b);
}

async function listQueue(engine: MailEngine, json: boolean): Promise<number> {
  const entries = await queueEntries(engine.spool);
  if (json) {
    process.stdout.write(JSON.stringify(entries, null, 2) + "\n");
    return 0;
  }
  if (entries.length === 0) {
    process.stdout.write("Mail queue is empty\n");
    return 0;
  }
  // mailq's marks: * active, ! held (here: corrupt, kept for a human).
  const mark = { queued: " ", active: "*", deferred: " ", corrupt: "!" } as const;
  let out = "-Queue ID-        --Size-- ---Arrival Time--- -Sender/Recipient-------\n";
  let bytes = 0;
  const now = Date.now();
  for (const e of entries) {
    bytes += e.size;
    const d = new Date(e.queuedAt);
    const when = `${d.toString().slice(0, 10)} ${d.toTimeString().slice(0, 8)}`;
    out += `${(e.id + mark[e.state]).padEnd(17)} ${String(e.size).padStart(8)} ${when}  ${e.sender === null ? "?" : e.sender || "MAILER-DAEMON"}\n`;
    // One line of state: what it is, how old, how often tried, when next, and why not yet.
    const next = e.nextAttempt ? Date.parse(e.nextAttempt) - now : null;
    const facts = [
      e.state,
      `age ${formatAge(now - d.getTime())}`,
      ...(e.attempts ? [`attempts ${e.attempts}`] : []),
      ...(next !== null ? [next > 0 ? `next in ${formatAge(next)}` : "due now"] : []),
    ];
    out += `${" ".repeat(18)}(${facts.join(", ")}${e.lastError ? `: ${printable(e.lastError, 200)}` : ""})\n`;
    for (const r of e.recipients) out += `${" ".repeat(46)}${r}\n`;
    out += "\n";
  }
  out += `-- ${Math.ceil(bytes / 1024)} Kbytes in ${entries.length} Request${entries.length === 1 ? "" : "s"}.\n`;
  process.stdout.write(out);
  return 0;
}

function isMain(): boolean {
  if (!process.argv[1]) return false;
  try {
    return fs.realpathSync(process.argv[1]) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

/** Set by build.mjs in dist/mail.js only: a program that bundles this file never runs the CLI. */
declare const MUDMAIL_CLI: boolean | undefined;

if (typeof MUDMAIL_CLI !== "undefined" && MUDMAIL_CLI && isMain()) {
  main(process.argv.slice(2)).then(
    (status) => { process.exitCode = status; },
    (err: Error) => {
      process.stderr.write(`mudmail: ${err.message}\n`);
      // A spool that cannot be used is a configuration error, like a bad flag.
      const unusableSpool = err instanceof SpoolError && err.code === "EUNSAFE";
      process.exitCode = err instanceof UsageError || unusableSpool || err instanceof DkimConfigError ? 2 : 1;
    },
  );
}
