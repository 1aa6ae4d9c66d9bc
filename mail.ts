/*
 * NAME
 *   mail.ts - the mudmail engine: MailEngine, connection slots, the stage machine, the scheduler
 *
 * SYNOPSIS
 *   const mail = new MailEngine({ maildir: "maildir", relay: "smtp.example.org:587" });
 *   const id = await mail.send({ from, to, subject, text });
 *   mail.tick();           // check_smtp(): from the host's own one-minute loop, or
 *   mail.start();          // the engine's own timer; await mail.flush(); await mail.stop();
 *   mail.on("sent" | "deferred" | "bounced" | "error", handler); await mail.queue();
 *   await mail.metrics();  // what --metrics serves (metrics.ts), as an object
 *
 * DESCRIPTION
 *   The talker's mail subsystem in one event loop. A tick (every 60 s, and at once when
 *   mail is queued through the engine) reads outgoing/ once, and opens connections into a
 *   fixed number of slots while slots are free and mail is waiting, giving up for the tick
 *   after two failed connects. Each Slot is the talker's miscconn: a Stage that only moves
 *   forward (0 banner, 1 EHLO/HELO, 2 MAIL, 3 RCPT, 4 DATA, 5 body, 6 dot, then back to 2
 *   for the next message on the same connection) over an SmtpConnection, which carries the
 *   bytes, pairs replies with the commands they answer whatever the packet boundaries, arms
 *   the timer of each stage, and does TLS and AUTH. A Delivery is one claimed queue file:
 *   its recipients and the outcome of each; a Job is the part of a delivery that goes to one
 *   destination in one transaction. The scheduler decides, in one place, which slot carries
 *   which job, when a slot opens, and when it gives way to another destination.
 *
 *   Data walks one way: queue file -> claim -> Job -> Slot (stages) -> outcome per recipient
 *   -> Spool (complete | rewrite + release | quarantine) -> log line and event.
 *
 * DIAGNOSTICS
 *   One log line per recipient outcome, shaped like Postfix's smtp(8) lines (log.ts); events
 *   "sent", "deferred", "bounced" for the host program, and "error" (only when it has a
 *   listener). A message that cannot be parsed is moved to corrupt/ with the reason logged.
 *   A session that fails defers what it was carrying; a message is never lost and never in
 *   two folders. Success of a pass means every message due was tried, not delivered.
 *
 *   For MX delivery, a destination's TLS policy (MTA-STS, DANE: tls-policy.ts) is found with
 *   its route, once per tick: hops the policy forbids are left out, and each session knows
 *   what its certificate must prove; the log line names the policy that applied. Each
 *   session's TLS outcome is counted for TLS-RPT (tls-report.ts), whose daily reports are
 *   queued like the engine's other reports.
 *
 *   The delivery policy (policy.ts) is applied by the scheduler alone, from the state as it
 *   is: each destination's group (a provider known by its MX names, a domain, the relay) has
 *   a connection limit, messages per connection and a pace; an idle slot takes a job only as
 *   they allow, and a timer wakes the scheduler when a paced message may start.
 *
 *   metrics() answers from what the engine counts itself (outcomes, the delivery delay, the
 *   slots open, the suspensions) and from the spool's thread (messages per folder): asking
 *   does no file work on the host's loop.
 *
 * BUGS
 *   One engine per spool (a lock); a process that wants to flush it asks the holder (cli.ts). Mail that
 *   waits for its destination's pace is read ahead up to READAHEAD_MAX jobs; past that, other
 *   mail waits behind it. A message put back untried when the engine stops gets its pickup
 *   line again from the next run (log readers count it received twice); one put back for a
 *   suspension or a throttle is marked in its bookkeeping and does not.
 */

import { EventEmitter } from "node:events";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import {
  MailError, classify, dsnStatus, printable, replyText, xtext,
  type Extensions, type Reply,
} from "./smtp-codes.js";
import { Router, type Hop, type Route } from "./route.js";
import { SmtpConnection, STEPS, type ConnectionOptions, type Credentials, type Hello, type Step, type TlsMode } from "./smtp-connection.js";
import { composeBounce, composeNotice } from "./bounce.js";
import { checkDsn, composeMessage, formatAge, type SendMessage } from "./compose.js";
import { CONTROL_DONE, MailLog, resumedLine, seconds, secretForms, suspendedLine } from "./log.js";
import { checkOptions, credentialsOf, parseHostPort, type MailOptions, type Resolved } from "./options.js";
import { loadDkimKeys, type DkimKey } from "./dkim.js";
import { TlsPolicies, type DomainTls, type ReportPolicy, type TlsResult } from "./tls-policy.js";
import { TlsReports } from "./tls-report.js";
import { Spool, addressProblem, errno, type Bookkeeping, type ControlResult, type QueueEntry, type Wire } from "./queue.js";
import { SpoolThread, type MessageInfo, type Prepared } from "./spool-worker.js";
import { Shaper, type Group, type Policy, type ReplyRule } from "./policy.js";
import { DelayHistogram, LoopDelay, type Metrics } from "./metrics.js";

export const VERSION = "0.1.0";

// What a host program uses: the engine, its options, events and errors; the receiver
// (--serve) and the direct client (scsh's sendmail, VRFY, EXPN, HELP).
export type { MailOptions, SendMessage, QueueEntry, TlsMode, Policy };
export { MailError };
export { UsageError } from "./options.js";
export { SpoolError } from "./queue.js";
export type { MailErrorDetails } from "./smtp-codes.js";
export type { Metrics };
export { startServer } from "./receiver.js";
export type { ServerOptions, ServerHandle, StoredMessage } from "./receiver.js";
export { sendmail, vrfy, expn, help, smtpTransactions, SmtpSession } from "./client.js";
export type { Answer, Loser, SendmailResult, SendmailOptions, ClientOptions } from "./client.js";

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

/** An outcome as the code that finds it out knows it; the engine fills in the rest (and logs the TLS policy that applied). */
type OutcomeInput = Omit<Outcome, "enhanced" | "reply"> & { reply?: string | null; tlsPolicy?: string | null; session?: Slot };

/** What a pass did. sent, deferred, bounced and corrupt count messages (a message of which one recipient bounced and the others were delivered is "bounced"); byRecipient counts recipients. */
export interface FlushSummary {
  sent: number;
  deferred: number;
  bounced: number;
  corrupt: number;
  /** Messages and recipients handled in the pass. */
  messages: number;
  recipients: number;
  /** What became of the recipients: delivered, still to deliver, failed for good. */
  byRecipient: { sent: number; deferred: number; bounced: number };
  seconds: number;
}

/* ------------------------------------------------------------------------------------ */
/* Stages                                                                                */

/**
 * How long an idle connection waits for its destination's pace (rate) to let the next message
 * start; a longer wait closes it (QUIT) and a new one opens this long before the start.
 */
const KEEP_IDLE_MS = 10_000;
/** Jobs read ahead at most, those waiting for their destination's pace included (memory stays bounded). */
const READAHEAD_MAX = 1000;
const NO_SLOTS: ReadonlySet<never> = new Set();

/** The seed's stages, in the order a session walks them; only RSET and QUIT come back. */
enum Stage { Connect = -1, Banner = 0, Helo = 1, Mail = 2, Rcpt = 3, Data = 4, Body = 5, Dot = 6, Rset = 7, Quit = 8 }

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
  /** Resolves once settling ended (done, or stranded for a later tick); null before it began. */
  settled: Promise<void> | null = null;
  /** Recipients deferred by a reply rule (throttle, suspend): no attempt is counted for them. */
  readonly noPenalty = new Set<string>();
  /** Suspensions that held some of its recipients back untried: put back, it waits for their end. */
  readonly heldBy = new Set<string>();
  constructor(
    readonly msg: MessageInfo,
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
  /** Its recipients delivered and failed for good in this attempt (the rest are `pending`). */
  sent: number;
  failed: number;
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

/** A slot waiting for a job, and how to hand it one (or null: QUIT). */
interface IdleSlot {
  slot: Slot;
  give: (job: Job | null) => void;
}

/** Where jobs go: the relay, or a domain's mail exchangers. What it learns lives for one tick. */
class Destination {
  /** Its slots, connecting or connected. */
  readonly slots = new Set<Slot>();
  /** Its slots that wait for a job. */
  readonly idle: IdleSlot[] = [];
  /** What its limits are counted on (policy.ts): a provider, a domain, or itself; found with the route. */
  group: Group | null = null;
  /** The reply of the server that refused its last connection, for the policy's reply rules. */
  lastReply: string | null = null;
  /** Connections that got no greeting from any address, this tick: at 2 the tick gives up on it. */
  failures = 0;
  /** Set for the rest of the tick once connecting failed twice: its jobs are deferred. */
  deadReason: string | null = null;
  lastError: string | null = null;
  /** The TLS policy of the session that failed last, for the log lines of the jobs it defers. */
  lastTlsPolicy: string | null = null;
  /** The route, looked up once per tick; null until asked, "pending" while DNS answers. */
  route: Route | "pending" | null = null;
  /** The TLS policy (MTA-STS, DANE) found with the route, for MX delivery. */
  tls: DomainTls | null = null;
  constructor(readonly key: string) {}

  get hops(): Hop[] {
    return this.route && this.route !== "pending" && this.route.ok ? this.route.hops : [];
  }

  /** A server of this destination has greeted one of its slots: more may connect at once. */
  get greeted(): boolean {
    for (const slot of this.slots) if (slot.greeted) return true;
    return false;
  }

  /** A new tick: route and failures are found out afresh. */
  reset(): void {
    this.failures = 0;
    this.deadReason = null;
    this.lastError = null;
    this.lastReply = null;
    this.lastTlsPolicy = null;
    this.route = null;
    this.tls = null;
  }
}

/** Jobs waiting for a slot, by destination: the only code that adds or takes them, so its size is true. */
class JobQueue {
  readonly #byDestination = new Map<Destination, Job[]>();
  #size = 0;

  get size(): number {
    return this.#size;
  }

  count(dest: Destination): number {
    return this.#byDestination.get(dest)?.length ?? 0;
  }

  /** In line at the end, or `first` (a job that goes before the others: a retry, a job handed back). */
  add(job: Job, first = false): void {
    let list = this.#byDestination.get(job.destination);
    if (!list) this.#byDestination.set(job.destination, (list = []));
    if (first) list.unshift(job);
    else list.push(job);
    this.#size++;
  }

  take(dest: Destination): Job | null {
    const list = this.#byDestination.get(dest);
    const job = list?.shift();
    if (!job) return null;
    this.#size--;
    if (list!.length === 0) this.#byDestination.delete(dest);
    return job;
  }

  drain(dest: Destination): Job[] {
    const list = this.#byDestination.get(dest) ?? [];
    this.#byDestination.delete(dest);
    this.#size -= list.length;
    return list;
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
  /** The TLS policy that applies, for the log line: "sts=enforce", "sts=testing", "dane", or null. */
  tlsPolicy: string | null;
}

/** What a Slot needs of the engine, and all it may touch. */
interface SlotHost {
  readonly stopping: boolean;
  readonly spool: SpoolThread;
  session(hop: Hop, dest: Destination): Session;
  /* The scheduler: jobs for this slot's destination, as its policy allows. */
  jobFor(slot: Slot, give: (job: Job | null) => void): void;
  jobNow(slot: Slot): Job | null;
  jobReturned(job: Job): void;
  retryNow(job: Job, recipients: string[]): void;
  jobDone(job: Job): void;
  slotReady(slot: Slot): void;
  slotFailedEarly(slot: Slot, reason: string, reply: string | null): void;
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
  /** Transactions the scheduler gave it (messagesPerConnection counts them). */
  jobs = 0;
  /** A server greeted and the session is set up (EHLO, TLS, AUTH): this destination's servers answer. */
  greeted = false;
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
  /** The reply of the last hop that refused to greet, for the policy's reply rules. */
  #lastReply: string | null = null;
  #authenticated = false;
  /** The connection whose "... TLS connection established to ..." line (Postfix's) was written. */
  #tlsLogged: SmtpConnection | null = null;
  #session: Session | null = null;
  /** A large body is being written from its file: the slot writes nothing else meanwhile. */
  #streaming = false;
  /** The settling (unlink) of the last message this slot delivered, while it is under way. */
  #lastSettling: Promise<void> | null = null;

  /** The TLS policy of the session (sts=enforce, sts=testing, dane), or null. */
  get tlsPolicy(): string | null {
    return this.#session?.tlsPolicy ?? null;
  }

  constructor(private readonly host: SlotHost, readonly destination: Destination, readonly group: Group) {}

  /** QUIT has begun, or the connection is over: it takes no more jobs and will close. */
  get leaving(): boolean {
    return this.stage === Stage.Quit || this.#closed;
  }

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
      this.host.slotFailedEarly(this, this.#lastError, this.#lastReply);
      return;
    }
    this.#hop = hop;
    this.#peer = `${hop.host}[${hop.address}]`;
    this.#session = this.host.session(hop, this.destination);
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
    if (conn.tlsLine && this.#tlsLogged !== conn) {
      this.#tlsLogged = conn;
      this.host.note(conn.tlsLine);
    }
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
    this.greeted = true;
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
    this.host.jobFor(this, (job) => {
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
    // The last message this slot delivered is off the disk before this one's dot goes out:
    // a crash then duplicates at most two messages a connection (qmail's flagcritical window,
    // one deep), however slow the spool's thread is to unlink.
    const previous = this.#lastSettling;
    this.#lastSettling = null;
    if (previous) previous.then(() => this.#sendBody(txn));
    else this.#sendBody(txn);
  }

  #sendBody(txn: Txn): void {
    const conn = this.#conn!;
    if (this.#closed || conn.ended) return;
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
    // The reply to the end is expected before the first piece leaves: the last piece carries
    // the dot, and a quick server answers it before the stream says it is done.
    // While it streams, nothing else is written: a reply that comes before the stream says it
    // is done (the server answered the last piece quickly, or too early) waits for it.
    const { delivery } = txn.job;
    this.#streaming = true;
    this.#expectDot(txn);
    conn.writeBody(this.host.spool.wireChunks(delivery.msg, delivery.prefix)).then(
      (written) => {
        this.#streaming = false;
        if (!written || this.#closed) return;
        if (txn.settled && this.#txns.length === 0 && !conn.awaiting) this.#nextJob();
        else this.#pipelineNext();
      },
      (err: Error) => conn.abort(`error reading queue file ${delivery.msg.id}: ${err.message}`, "EQUEUE"),
    );
  }

  /** The terminator is on its way: wait for the reply, and with PIPELINING send the next envelope behind it. */
  #endOfData(txn: Txn): void {
    this.#expectDot(txn);
    this.#pipelineNext();
  }

  #expectDot(txn: Txn): void {
    txn.dotSent = true;
    this.stage = Stage.Dot;
    this.#conn!.expect(STAGES[Stage.Dot], this.#on(Stage.Dot, (r) => this.#onDot(txn, r)));
  }

  /** RFC 2920: with PIPELINING the next envelope goes right behind the dot, in the same packet. */
  #pipelineNext(): void {
    if (!this.#ext?.pipelining) return;
    const job = this.host.jobNow(this);
    if (job) this.#startTxn(job);
  }

  #onDot(txn: Txn, reply: Reply): void {
    if (classify(reply) === "ok") {
      this.delivered++;
      // A server without DSN cannot send the success report the sender asked for: we will.
      if (!this.#ext?.dsn) for (const rcpt of txn.accepted) txn.job.delivery.sentWithoutDsn.add(rcpt);
      const words = printable(replyText(reply));
      this.#settleAccepted(txn, this.#outcome(txn.job, "sent", reply.code, dsnStatus(reply), words, words));
      this.#lastSettling = txn.job.delivery.settled;
    } else {
      this.#settleAccepted(txn, this.#replyOutcome(txn.job, reply, Stage.Dot));
    }
    if (this.#txns.length === 0 && !this.#conn!.awaiting && !this.#streaming) this.#nextJob();
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
    return { queueId: job.delivery.msg.id, status, code, dsn, text, relay: this.relay, reply, tlsPolicy: this.#session?.tlsPolicy, session: this };
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
    // A failed handshake under "may" earns that host one plaintext attempt; under a policy, never.
    if (err.code === "ETLS" && this.#session?.connection.tls === "may") this.host.tlsFailed(this.#hop);
    if (this.stage <= Stage.Banner && this.#hops.length > 0 && !this.host.stopping) {
      this.#lastError = err.message;
      this.#lastReply = reply && reply.code < 600 ? printable(replyText(reply)) : null;
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
    const words = reply && reply.code < 600 ? printable(replyText(reply)) : null;
    for (const txn of [...this.#txns]) {
      for (const rcpt of txn.job.recipients) {
        if (!txn.job.delivery.outcomes.has(rcpt)) this.#settleOne(txn, rcpt, this.#outcome(txn.job, "deferred", code, dsn, reason, words));
      }
      this.#finishTxn(txn);
    }
    if (failedEarly) this.host.slotFailedEarly(this, reason, words);
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

export interface MailEngineEvents {
  sent: [Outcome];
  deferred: [Outcome];
  bounced: [Outcome];
  error: [MailError];
}

export class MailEngine extends EventEmitter<MailEngineEvents> {
  readonly #options: Resolved;
  /** The spool's file work, on the engine's worker thread. */
  readonly #spool: SpoolThread;
  /** The spool's lock, taken and given back on this thread (at start and stop, never while sending). */
  readonly #lock: Spool;
  #stopping = false;
  readonly #log: MailLog;
  readonly #slots = new Set<Slot>();
  readonly #destinations = new Map<string, Destination>();
  /** Destinations in a group with a rate: the only ones whose jobs may wait for their start time. */
  readonly #paced = new Set<Destination>();
  /** Queue ids read from outgoing/ (or queued here) and not yet claimed. */
  #backlog: string[] = [];
  #backlogHead = 0;
  /** Ids waiting in the backlog or claimed: a scan or a watch event must not take them again. */
  readonly #known = new Set<string>();
  /** Ids tried and put back in this pass: tried again in the next one, not in this one. */
  #tried = new Set<string>();
  /** Backlog ids that wait in deferred/, not outgoing/. */
  readonly #fromDeferred = new Set<string>();
  /** When each deferred message is due. */
  readonly #due = new DueHeap();
  readonly #router: Router;
  #preparing = 0;
  /** Jobs prepared and waiting for a slot. */
  readonly #jobs = new JobQueue();
  /** #schedule() is running: a call from inside it asks for one more round instead. */
  #scheduling = false;
  #scheduleAgain = false;
  #scanning: Promise<void> | null = null;
  #lastScan = 0;
  #initialized: Promise<void> | null = null;
  #timer: NodeJS.Timeout | null = null;
  #watcher: fs.FSWatcher | null = null;
  #tickScheduled = false;
  #active = false;
  #counts: FlushSummary = emptySummary();
  /** Recipient outcomes since the engine was made, and the delay of each sent one: for metrics(). */
  readonly #outcomeTotals = { sent: 0, deferred: 0, bounced: 0 };
  readonly #deliveryDelay = new DelayHistogram();
  readonly #loopDelay = new LoopDelay();
  #idleWaiters: Array<() => void> = [];
  #spoolReady: Promise<void> | null = null;

  /** What slots may ask of the engine, and all they may touch. */
  readonly #host: SlotHost = this.#slotHost();

  #slotHost(): SlotHost {
    const engine = this;
    return {
      get stopping() { return engine.#stopping; },
      get spool() { return engine.#spool; },
      session: (hop, dest) => this.#session(hop, dest),
      jobFor: (slot, give) => this.#jobFor(slot, give),
      jobNow: (slot) => this.#jobNow(slot),
      jobReturned: (job) => this.#jobReturned(job),
      retryNow: (job, recipients) => this.#retryNow(job, recipients),
      jobDone: (job) => this.#jobDone(job),
      slotReady: (slot) => this.#slotReady(slot),
      slotFailedEarly: (slot, reason, reply) => this.#slotFailedEarly(slot, reason, reply),
      slotClosed: (slot) => this.#slotClosed(slot),
      recordOutcome: (job, outcome) => this.#recordOutcome(job, outcome),
      note: (text) => this.#note(text),
      protocolNotice: (peer, reason, transcript) => this.#protocolNotice(peer, reason, transcript),
      tlsFailed: (hop) => this.#tlsFailed(hop),
      plaintextUsed: (hop) => this.#plaintextUsed(hop),
      authRefused: (reason, hop, reply) => this.#authRefused(reason, hop, reply),
    };
  }

  constructor(options: MailOptions = {}) {
    super();
    this.#options = checkOptions(options);
    this.#lock = new Spool(this.#options.maildir);
    const o = this.#options;
    this.#dkimKeys = loadDkimKeys({ domain: o.dkimDomain, selector: o.dkimSelector, keyFile: o.dkimKey, keysFile: o.dkimKeys });
    this.#spool = new SpoolThread(o.maildir, { fsync: o.fsync, helo: o.helo, dkimKeys: this.#dkimKeys });
    this.#router = new Router({
      relay: o.relay ? parseHostPort(o.relay, "--relay", 25) : null,
      port: o.port,
      resolver: o.resolver ? parseHostPort(o.resolver, "--resolver", 53, true) : null,
      dnsTimeout: o.dnsTimeout * 1000,
      fallbackRelay: o.fallbackRelay ? parseHostPort(o.fallbackRelay, "--fallback-relay", 25) : null,
      bestMxRelay: o.bestMxRelay ? parseHostPort(o.bestMxRelay, "--best-mx-relay", 25) : null,
      ownAddresses: ownAddresses(o.inetInterfaces),
      ignoreMxLookupError: o.ignoreMxLookupError,
    });
    this.#shaper = new Shaper(o.policy, { connections: o.destinationConcurrencyLimit });
    this.#log = new MailLog(this.#options.log, this.#options.syslogName);
    this.#log.redact(secretForms(this.#credentials()));
    // TLS policies and reports are the MX hosts' business: none through a relay.
    this.#tlsReports = o.relay ? null : new TlsReports({
      org: o.tlsRptOrg ?? o.helo, contact: o.tlsRptContact ?? this.#postmaster, submitter: o.helo, interval: o.tlsRptInterval,
      router: this.#router, ca: () => this.#extraCa, log: (text) => this.#log.write("qmgr", printable(text, 1000)),
      state: { read: () => this.#spool.readState("tls-rpt"), write: (value) => this.#spool.writeState("tls-rpt", value) },
    });
    this.#policies = o.relay ? null : new TlsPolicies({
      router: this.#router, store: this.#spool.policies(), ca: () => this.#extraCa, mtaSts: o.mtaSts, dane: o.tls === "dane",
      warn: (text) => this.#log.write("smtp", `warning: ${printable(text, 1000)}`),
      onFailure: (policy, type, reason, hop) => this.#tlsResult(policy, hop ?? null, { ok: false, type, reason }),
    });
    this.#extraCa = o.tlsCa ? fs.readFileSync(o.tlsCa, "utf8") : null;
    this.#spool.start();
  }

  readonly #dkimKeys: DkimKey[];
  /** The delivery policy (policy.ts): each destination's limits and pace, reply rules, suspensions. */
  readonly #shaper: Shaper;
  readonly #policies: TlsPolicies | null;
  readonly #tlsReports: TlsReports | null;

  /** Queues a message (get_mailqueue_file + compose); delivery starts at once when the engine runs. */
  async send(message: SendMessage): Promise<string> {
    const content = composeMessage(message, this.#options.helo);
    const dsn = checkDsn(message.dsn);
    this.#spoolReady ??= this.#spool.init().then(() => undefined);
    await this.#spoolReady;
    const id = await this.#spool.create(content, dsn ? { attempts: 0, nextAttempt: null, lastError: null, dsn } : undefined);
    if (this.#active && !this.#stopping) {
      this.#enqueue(id);
      this.#scheduleTick();
    }
    return id;
  }

  /** check_smtp(): read outgoing/ once and open connections into free slots. */
  tick(): void {
    this.#active = true;
    this.#runTick().catch((err) => this.#reportError(err as Error));
  }

  /** Keeps the engine's own timer (every tickInterval seconds) and watches outgoing/ for drops. */
  start(): void {
    if (this.#timer) return;
    this.#stopping = false;
    this.tick();
    this.#timer = setInterval(() => this.tick(), this.#options.tickInterval * 1000);
    this.#timer.unref?.();
    this.#init().then(() => { if (this.#timer && !this.#watcher) this.#watch(); }, () => undefined);
  }

  /** One pass: send everything waiting, wait for every slot to finish, resolve with the counts. */
  async flush(options: { force?: boolean } = {}): Promise<FlushSummary> {
    const started = Date.now();
    this.#stopping = false;
    this.#counts = emptySummary();
    this.#active = true;
    await this.#runTick(options.force ?? false);
    await this.#idle();
    const summary = { ...this.#counts, byRecipient: { ...this.#counts.byRecipient }, seconds: (Date.now() - started) / 1000 };
    if (!this.#timer) this.#active = false;
    return summary;
  }

  /** Graceful stop: no new connections; active sessions are abandoned and their messages go back to outgoing/. */
  async stop(): Promise<void> {
    this.#stopping = true;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    this.#wake(Infinity);
    this.#watcher?.close();
    this.#watcher = null;

    // An init still running would take the lock after we let it go: let it finish first.
    await this.#initialized?.catch(() => undefined);
    for (const slot of [...this.#slots]) slot.abort();
    for (const dest of this.#destinations.values()) this.#dropJobs(dest, null);
    await this.#idle();
    await this.#retryStranded();
    await this.#tlsReports?.save().catch(() => undefined);
    this.#active = false;
    this.#releaseLock();
    await this.#spool.close();
    this.#loopDelay.stop();
    await this.#log.flush();
  }

  /** Every message in the spool, oldest first: what `--queue --json` prints (SPEC section 5). */
  queue(): Promise<QueueEntry[]> {
    return this.#spool.queueEntries();
  }

  /**
   * The numbers an operator watches (metrics.ts; `--metrics` serves them as Prometheus text):
   * messages per folder (counted by the spool's thread), recipient outcomes, connections open
   * per destination, suspensions, the delivery delay histogram, the host loop's delay (measured
   * from the first call on).
   */
  async metrics(): Promise<Metrics> {
    const loopDelay = this.#loopDelay.snapshot();
    const messages = await this.#spool.counts();
    const connections: Record<string, number> = {};
    for (const slot of this.#slots) connections[slot.destination.key] = (connections[slot.destination.key] ?? 0) + 1;
    const now = Date.now();
    const suspended: Metrics["suspended"] = {};
    for (const [key, s] of Object.entries(this.#shaper.state())) {
      if (s.until > now) suspended[key] = { until: new Date(s.until).toISOString(), reason: s.reason };
    }
    return { messages, outcomes: { ...this.#outcomeTotals }, connections, suspended, deliveryDelay: this.#deliveryDelay.snapshot(), loopDelay };
  }

  /** Live numbers for a progress line; `left`: messages read or being read and not yet done (it grows while the queue is read). */
  get progress(): FlushSummary & { busySlots: number; waiting: number; left: number } {
    return {
      ...this.#counts, busySlots: this.#slots.size, waiting: this.#backlog.length - this.#backlogHead + this.#jobs.size,
      left: this.#backlog.length - this.#backlogHead + this.#preparing + this.#inFlight.size,
    };
  }

  #emit<E extends keyof MailEngineEvents>(event: E, ...args: MailEngineEvents[E]): boolean {
    // An "error" nobody listens to must not throw inside the host's event loop, and a
    // listener that throws must not leave a session half-way: its error is logged instead.
    if (event === "error" && this.listenerCount("error") === 0) return false;
    try {
      return (this.emit as (event: E, ...args: MailEngineEvents[E]) => boolean)(event, ...args);
    } catch (err) {
      this.#log.write("qmgr", `warning: a "${String(event)}" listener threw: ${printable(String((err as Error)?.message ?? err))}`);
      return true;
    }
  }

  /* Ticks and scans */

  async #runTick(force = false): Promise<void> {
    await this.#init();
    if (this.#stopping) return;
    this.#pass++;
    // A host may give up root after making the engine (a daemon that bound its port first).
    this.#uid = process.getuid?.() ?? 0;
    for (const [key, dest] of this.#destinations) {
      // A destination with nothing going on is forgotten; the others start the tick afresh.
      if (dest.slots.size === 0 && this.#jobs.count(dest) === 0) {
        this.#destinations.delete(key);
        this.#paced.delete(dest);
      } else if (dest.route !== "pending") {
        dest.reset();
        if (this.#jobs.count(dest) > 0) this.#lookUpRoute(dest);
      }
    }
    this.#forgetTried();
    this.#expireSuspensions();
    this.#takeRequests();
    await this.#retryStranded();
    await this.#tlsReportsDue();
    this.#takeDue(force ? Infinity : Date.now());
    await this.#scan();
    this.#pump();
    this.#schedule();
  }

  /** Deferred messages whose time has come join the backlog (all of them with --force). */
  #takeDue(now: number): void {
    for (let id = this.#due.popDue(now); id !== null; id = this.#due.popDue(now)) this.#enqueue(id, "deferred");
  }

  /** At start: the schedule of deferred/, from each message's bookkeeping (due now when it has none). */
  async #loadDeferred(): Promise<void> {
    await this.#spool.scanDue((slice) => { for (const [id, due] of slice) this.#due.push(id, due); });
  }


  #init(): Promise<void> {
    this.#initialized ??= (async () => {
      // A failed start (the spool is locked, a folder cannot be made) is tried again next tick.
      try {
        await this.#initOnce();
      } catch (err) {
        this.#initialized = null;
        throw err;
      }
    })();
    return this.#initialized;
  }

  async #initOnce(): Promise<void> {
    {
      await this.#spool.init();
      this.#lock.lock();
      const { recovered } = await this.#spool.init({ recover: true });
      for (const id of recovered) this.#log.write("qmgr", `${id}: requeued from outgoing_active/ after an unclean stop`);
      await this.#loadDeferred();
      await this.#loadTlsFallback();
      this.#shaper.load(await this.#spool.readState("suspended"));
      this.#expireSuspensions();
      this.#watchRequests();
      await this.#tlsReports?.load();
    }
  }

  #scheduleTick(): void {
    if (this.#tickScheduled) return;
    this.#tickScheduled = true;
    setImmediate(() => {
      this.#tickScheduled = false;
      this.#pump();
      this.#schedule();
    });
  }

  /** One read of outgoing/: new names join the backlog; names already seen this pass are skipped. */
  #scan(): Promise<void> {
    this.#scanning ??= (async () => {
      this.#lastScan = Date.now();
      try {
        const bad: string[] = [];
        // Each slice as the worker reads it: sending starts before the listing ends, and no
        // turn of the loop handles more than one slice of a large queue.
        await this.#spool.scan("outgoing", (ids, badNames) => {
          for (const id of ids) this.#enqueue(id);
          bad.push(...badNames);
          this.#pump();
          this.#schedule();
        });
        for (const name of bad) await this.#quarantine(name, "outgoing", "file name is not a queue id");
      } finally {
        this.#scanning = null;
        this.#checkIdle();
      }
    })();
    return this.#scanning;
  }

  /** An id joins the backlog, to be claimed from its folder, unless it is known, tried this pass, or held back. */
  #enqueue(id: string, from: "outgoing" | "deferred" = "outgoing"): void {
    if (this.#known.has(id) || this.#tried.has(id) || this.#parked.has(id)) return;
    this.#known.add(id);
    if (from === "deferred") this.#fromDeferred.add(id);
    this.#backlog.push(id);
  }

  /** A new pass: ids tried and put back in the last one may be tried again. */
  #forgetTried(): void {
    this.#tried = new Set();
  }

  /** A claimed message leaves the engine's hands: gone, quarantined, or put back as `putBack`. */
  #forget(id: string, putBack?: string): void {
    this.#known.delete(id);
    this.#inFlight.delete(id);
    if (putBack !== undefined) this.#tried.add(putBack);
  }

  readonly #inFlight = new Set<string>();
  /** Reports and notices this engine queued and has not picked up yet (no pickup line for them). */
  readonly #madeHere = new Set<string>();
  /** For the pickup line (Postfix's uid=): asked of the system once a pass, not for every message. */
  #uid = process.getuid?.() ?? 0;

  #watch(): void {
    try {
      this.#watcher = fs.watch(path.join(this.#options.maildir, "outgoing"), (_event, name) => {
        if (!name || name.startsWith(".") || this.#known.has(String(name)) || this.#tried.has(String(name)) || this.#parked.has(String(name))) return;
        this.#rescanSoon();
      });
      this.#watcher.on("error", () => { this.#watcher?.close(); this.#watcher = null; });
      this.#watcher.unref?.();
    } catch {
      // No watching (some file systems): the tick still finds what other programs drop in.
    }
  }

  #rescanTimer: NodeJS.Timeout | null = null;

  /* Requests from the command line while this engine holds the lock: queue control, --suspend, --resume, --flush */

  #requestWatcher: fs.FSWatcher | null = null;

  /** .requests/ is watched while the engine holds the lock (a flush as much as a daemon); they are also taken at each tick. */
  #watchRequests(): void {
    try {
      this.#requestWatcher = fs.watch(path.join(this.#options.maildir, ".requests"), (_event, name) => {
        if (name && !String(name).endsWith(".answer")) this.#takeRequests();
      });
      this.#requestWatcher.on("error", () => { this.#requestWatcher?.close(); this.#requestWatcher = null; });
      this.#requestWatcher.unref?.();
    } catch {
      // Taken at each tick.
    }
    this.#takeRequests();
  }

  #requesting = false;
  #requestAgain = false;

  /** Takes the waiting requests (through the spool's thread) and answers each, one batch at a time. */
  #takeRequests(): void {
    if (this.#requesting) {
      this.#requestAgain = true;
      return;
    }
    this.#requesting = true;
    (async () => {
      do {
        this.#requestAgain = false;
        for (const { name, body } of await this.#spool.takeRequests()) {
          let answer: { ok: boolean; result?: unknown; error?: string };
          try {
            answer = { ok: true, result: await this.#request(body) };
          } catch (err) {
            answer = { ok: false, error: (err as Error).message };
          }
          await this.#spool.answerRequest(name, answer);
        }
      } while (this.#requestAgain && !this.#stopping);
    })().catch((err) => this.#log.write("qmgr", `warning: cannot take requests: ${printable((err as Error).message)}`))
      .finally(() => { this.#requesting = false; });
  }

  /** One request, as cli.ts writes it; what it did is the answer. */
  async #request(body: unknown): Promise<unknown> {
    const r = (typeof body === "object" && body !== null ? body : {}) as { op?: unknown; target?: unknown; key?: unknown; seconds?: unknown; force?: unknown };
    const key = typeof r.key === "string" ? r.key.toLowerCase() : "";
    switch (r.op) {
      case "delete": case "hold": case "release": case "requeue": {
        const result = await this.#spool.control(r.op, String(r.target));
        this.#controlled(r.op, result);
        return result;
      }
      case "suspend": {
        if (!key || typeof r.seconds !== "number" || !(r.seconds > 0)) throw new Error("a suspension needs a destination and seconds");
        this.#suspend(key, r.seconds, "by the operator (--suspend)");
        return this.#shaper.state()[key];
      }
      case "resume":
        return this.#resume(key);
      case "flush":
        // postqueue -f: a pass now (--force: deferred mail too); what is suspended stays held.
        this.#active = true;
        this.#runTick(r.force === true).catch((err) => this.#reportError(err as Error));
        return { flushing: true };
      default:
        throw new Error(`unknown request ${JSON.stringify(r.op)}`);
    }
  }

  /**
   * After queue control: its log lines (Postfix's postsuper's); released and requeued mail goes
   * now, to destinations tried afresh (a destination given up on this tick is not held against
   * mail an operator asked to go now).
   */
  #controlled(verb: keyof typeof CONTROL_DONE, result: ControlResult): void {
    if ((verb === "release" || verb === "requeue") && result.done.length > 0) {
      for (const dest of this.#destinations.values()) {
        if (dest.deadReason !== null) {
          dest.deadReason = null;
          dest.failures = 0;
        }
      }
    }
    for (const id of result.done) {
      this.#log.write("postsuper", `${id}: ${CONTROL_DONE[verb]}`);
      this.#parked.delete(id);
      if (verb === "release" || verb === "requeue") {
        this.#tried.delete(id);
        if (this.#active && !this.#stopping) this.#enqueue(id);
      }
    }
    if (this.#active && !this.#stopping) this.#scheduleTick();
  }

  /** --resume: a suspension lifted before its end; what it held back goes now. Returns it (null: there was none). */
  #resume(key: string): unknown {
    const lifted = this.#shaper.resume(key);
    if (!lifted) return null;
    this.#log.write("qmgr", resumedLine(key, true));
    this.#unpark(key);
    this.#saveSuspensions();
    this.#schedule();
    return lifted;
  }

  #rescanSoon(): void {
    if (this.#rescanTimer || this.#stopping) return;
    this.#rescanTimer = setTimeout(() => {
      this.#rescanTimer = null;
      this.#scan().catch((err) => this.#reportError(err as Error)).finally(() => { this.#pump(); this.#schedule(); });
    }, 100);
    this.#rescanTimer.unref?.();
  }

  /* Preparing jobs: claim, read the envelope, measure, split by destination */

  get #readahead(): number {
    return this.#options.maxConnections * 4 + 8;
  }

  /** Keeps a few jobs ready ahead of the slots, so a slot never waits on the disk between messages. */
  #pump(): void {
    while (!this.#stopping && !this.#authFailure && this.#backlogHead < this.#backlog.length && this.#roomAhead()) {
      const id = this.#backlog[this.#backlogHead++];
      if (this.#backlogHead > 4096 && this.#backlogHead * 2 > this.#backlog.length) {
        this.#backlog = this.#backlog.slice(this.#backlogHead);
        this.#backlogHead = 0;
      }
      this.#preparing++;
      this.#prepare(id)
        .catch((err) => this.#reportError(err as Error))
        .finally(() => {
          this.#preparing--;
          this.#pump();
          this.#schedule();
          this.#checkIdle();
        });
    }
    if (this.#backlogHead >= this.#backlog.length && this.#preparing === 0 && !this.#scanning) this.#schedule();
  }

  /**
   * Room for one more message to be read ahead: fewer than #readahead jobs wait or are being
   * prepared, not counting those that wait for their group's pace (a rate-limited destination
   * must not hold up the reading of other mail), up to READAHEAD_MAX jobs in all.
   */
  #roomAhead(): boolean {
    const ahead = this.#preparing + this.#jobs.size;
    if (ahead < this.#readahead) return true;
    if (this.#jobs.size >= READAHEAD_MAX) return false;
    const now = Date.now();
    let paced = 0;
    for (const dest of this.#paced) if (dest.group!.nextStart > now) paced += this.#jobs.count(dest);
    return ahead - paced < this.#readahead;
  }

  async #prepare(queued: string): Promise<void> {
    const from = this.#fromDeferred.delete(queued) ? "deferred" : "outgoing";
    let prepared: Prepared;
    try {
      prepared = await this.#spool.prepare(queued, from);
    } catch (err) {
      this.#known.delete(queued);
      throw new MailError(`${queued}: cannot claim queue file: ${(err as Error).message}`, "EQUEUE", { queueId: queued });
    }
    if (prepared.kind === "gone" || prepared.id !== queued) this.#known.delete(queued);
    if (prepared.kind === "gone") return;
    const { id } = prepared;
    if (prepared.kind === "corrupt") return this.#quarantine(id, "outgoing_active", prepared.reason);
    if (prepared.kind === "unreadable") {
      this.#forget(id, prepared.putBack);
      throw new MailError(`${id}: cannot read queue file: ${prepared.error}`, "EQUEUE", { queueId: id });
    }
    this.#known.add(id);
    this.#inFlight.add(id);
    for (const note of prepared.notes) this.#log.write("qmgr", `${id}: ${printable(note, 1000)}`);
    const { msg, wire, prefix, book } = prepared;
    const delivery = new Delivery(msg, wire, prefix, Date.now(), book, from);
    // Postfix's pickup and cleanup lines, once per message (never tried, never put back): what
    // log readers (pflogsumm) count as received, with its sender and Message-ID.
    if (this.#madeHere.delete(id)) {
      // A report or notice of this engine's own: like Postfix's bounce(8) mail, not received mail.
    } else if (!book || (book.attempts === 0 && !book.picked)) {
      this.#log.write("pickup", `${id}: uid=${this.#uid} from=<${msg.sender}>`);
      if (prepared.messageId) this.#log.write("cleanup", `${id}: message-id=${printable(prepared.messageId, 998)}`);
    }
    this.#log.write("qmgr", `${id}: from=<${msg.sender}>, size=${msg.size}, nrcpt=${msg.recipients.length} (queue active)`);
    this.#counts.messages++;
    this.#counts.recipients += msg.recipients.length;
    // Count every job before queueing any: a job can finish at once (a dead destination, a
    // failed route), and the delivery must not settle while its other jobs wait to be queued.
    const jobs = this.#splitJobs(delivery);
    delivery.openJobs = jobs.length;
    for (const job of jobs) this.#queueJob(job);
    // Every recipient is behind a suspension: back it goes, untried, to wait for its end.
    if (jobs.length === 0) this.#deliveryDone(delivery);
  }

  #splitJobs(delivery: Delivery): Job[] {
    const byDestination = new Map<Destination, string[]>();
    const now = Date.now();
    for (const rcpt of delivery.msg.recipients) {
      // A domain suspended by name (--suspend) is held back here, whatever route it has.
      const domain = rcpt.slice(rcpt.lastIndexOf("@") + 1).toLowerCase();
      if (this.#shaper.suspension(domain, now)) {
        delivery.heldBy.add(domain);
        continue;
      }
      const dest = this.#destinationOf(rcpt);
      const list = byDestination.get(dest);
      if (list) list.push(rcpt);
      else byDestination.set(dest, [rcpt]);
    }
    const jobs: Job[] = [];
    const limit = this.#options.recipientLimit;
    for (const [dest, rcpts] of byDestination) {
      for (let i = 0; i < rcpts.length; i += limit) jobs.push(new Job(delivery, dest, rcpts.slice(i, i + limit)));
    }
    return jobs;
  }

  #destinationOf(rcpt: string): Destination {
    const key = this.#options.relay ? `relay:${this.#options.relay}` : rcpt.slice(rcpt.lastIndexOf("@") + 1).toLowerCase();
    let dest = this.#destinations.get(key);
    if (!dest) {
      dest = new Destination(key);
      this.#destinations.set(key, dest);
    }
    return dest;
  }

  #queueJob(job: Job): void {
    const dest = job.destination;
    if (this.#stopping || this.#authFailure) return this.#jobDone(job);
    if (dest.deadReason) return this.#deferUnsent(job, `delivery temporarily suspended: ${dest.deadReason}`);
    if (dest.route && dest.route !== "pending" && !dest.route.ok) return this.#routeFailed(job, dest.route);
    this.#jobs.add(job);
    if (dest.route === null) this.#lookUpRoute(dest);
    else if (dest.idle.length > 0) this.#schedule();
  }

  /** Once per tick and destination: where its mail goes, and so the group its limits count on. */
  #lookUpRoute(dest: Destination): void {
    dest.route = "pending";
    const mx = !dest.key.startsWith("relay:");
    this.#router.route(mx ? dest.key : "").then((found): Promise<{ route: Route; tls: DomainTls | null }> | { route: Route; tls: null } =>
      (this.#policies && mx && found.ok ? this.#policies.secure(dest.key, found) : { route: found, tls: null })).then(({ route, tls }) => {
      dest.route = route;
      dest.tls = tls;
      this.#placeInGroup(dest);
      if (!route.ok) for (const job of this.#jobs.drain(dest)) this.#routeFailed(job, route);
      this.#schedule();
    }, (err) => {
      dest.route = { ok: false, permanent: false, dsn: "4.4.3", reason: `cannot look up ${dest.key}: ${(err as Error).message}` };
      this.#placeInGroup(dest);
      this.#schedule();
    });
  }

  /** A provider is known by its MX hosts' names; through the relay, the relay's name is the destination's. */
  #placeInGroup(dest: Destination): void {
    const mx = !dest.key.startsWith("relay:");
    const hosts = dest.hops.filter((h) => !h.via).map((h) => h.host);
    const name = mx ? dest.key : parseHostPort(this.#options.relay!, "--relay", 25).host.toLowerCase();
    dest.group = this.#shaper.groupFor(name, mx ? hosts : [name]);
    // A destination forgotten while its route was looked up is not ours to count any more.
    if (dest.group.limits.interval > 0 && this.#destinations.get(dest.key) === dest) this.#paced.add(dest);
    else this.#paced.delete(dest);
  }

  /** A destination DNS says does not exist bounces its jobs; one it cannot tell about now defers them. */
  #routeFailed(job: Job, route: Extract<Route, { ok: false }>): void {
    job.startedAt = Date.now();
    for (const rcpt of job.recipients) {
      this.#recordOutcome(job, {
        queueId: job.delivery.msg.id, recipient: rcpt, status: route.permanent ? "bounced" : "deferred",
        code: 0, dsn: route.dsn, text: route.reason, relay: "none",
      });
    }
    this.#jobDone(job);
  }

  /** The next job for a slot: now, or when the scheduler has one for it (null: QUIT). */
  #jobFor(slot: Slot, give: (job: Job | null) => void): void {
    const job = this.#jobNow(slot);
    if (job) return give(job);
    slot.destination.idle.push({ slot, give });
    this.#pump();
    this.#schedule();
  }

  /** A job for this slot if one is ready and its policy lets it start now (the next envelope behind a pipelined dot). */
  #jobNow(slot: Slot): Job | null {
    if (this.#jobs.count(slot.destination) === 0 || this.#mayTake(slot, Date.now()) !== "take") return null;
    const job = this.#jobs.take(slot.destination)!;
    this.#started(slot);
    this.#pump();
    return job;
  }

  /** A slot begins a job: it counts for messagesPerConnection, and for its group's pace. */
  #started(slot: Slot): void {
    slot.jobs++;
    this.#shaper.started(slot.group, Date.now());
  }

  /** Recipients a server had no room for in this transaction: a new job, first in line. */
  #retryNow(job: Job, recipients: string[]): void {
    job.delivery.openJobs++;
    this.#jobs.add(new Job(job.delivery, job.destination, recipients), true);
  }

  /** A job a closing slot could not start goes back to the front of its destination's queue. */
  #jobReturned(job: Job): void {
    this.#jobs.add(job, true);
    this.#schedule();
  }

  /* The scheduler */

  /**
   * check_misc_connects(), and every other decision about slots, made here from the state as
   * it is now, never from counts kept aside: idle slots take their destination's waiting
   * jobs as far as its policy lets them (its group's connection limit, messages per
   * connection, the rate); connections open where jobs wait beyond the slots serving them (one
   * at a time until a server greets, as the C code's one blocking connect did, never beyond
   * the group's limit, and not long before the rate lets a message start; after two failed
   * connects the tick gives up on the destination and defers its mail); a slot with nothing
   * to do gives way (QUIT) when another destination's mail has no slot and none is free, and
   * quits when no more mail can come in this pass. A timer wakes it when a paced message
   * may start.
   */
  #schedule(): void {
    if (this.#scheduling) {
      this.#scheduleAgain = true;
      return;
    }
    this.#scheduling = true;
    try {
      do {
        this.#scheduleAgain = false;
        this.#scheduleOnce();
      } while (this.#scheduleAgain);
    } finally {
      this.#scheduling = false;
    }
    this.#checkIdle();
  }

  #scheduleOnce(): void {
    const giveUp = this.#stopping || this.#authFailure !== null;
    const now = Date.now();
    let unserved = 0;
    let wake = Infinity;
    for (const dest of giveUp ? [] : this.#destinations.values()) {
      if (dest.route === null || dest.route === "pending") continue;
      const group = dest.group!;
      const held = this.#suspensionOf(dest, now);
      if (held) {
        this.#holdBack(dest, held);
        continue;
      }
      for (const idle of [...dest.idle]) {
        const may = this.#mayTake(idle.slot, now);
        if (may === "take" && this.#jobs.count(dest) === 0) continue;
        if (typeof may === "number") {
          if (this.#jobs.count(dest) > 0) wake = Math.min(wake, may);
          continue;
        }
        dest.idle.splice(dest.idle.indexOf(idle), 1);
        if (may === "quit") {
          idle.give(null);
          continue;
        }
        const job = this.#jobs.take(dest)!;
        this.#started(idle.slot);
        idle.give(job);
      }
      const waiting = this.#jobs.count(dest);
      if (dest.failures >= 2) {
        if (dest.slots.size === 0 && waiting > 0) {
          // The tick gave up connecting: what waits for this destination is deferred until the next one.
          dest.deadReason ??= dest.lastError ?? "too many failed connections";
          this.#dropJobs(dest, `delivery temporarily suspended: ${dest.deadReason}`);
        }
        continue;
      }
      // A new connection opens when a message may start by the time it is ready.
      const startsAt = group.nextStart - KEEP_IDLE_MS;
      if (waiting > 0 && startsAt > now) wake = Math.min(wake, startsAt);
      const serving = this.#live(dest.slots);
      const mayGrow = () => startsAt <= now && this.#live(this.#groupSlots(group)) < this.#shaper.connections(group) &&
        (dest.greeted || dest.slots.size === 0);
      let opened = 0;
      while (waiting > serving + opened && this.#slots.size < this.#options.maxConnections && mayGrow()) {
        this.#openSlot(dest);
        opened++;
      }
      if (waiting > serving + opened && mayGrow()) unserved += waiting - serving - opened;
    }
    const slotsFull = this.#slots.size >= this.#options.maxConnections;
    const moreMayCome = !giveUp && this.#moreMayCome();
    for (const dest of this.#destinations.values()) {
      const mailWaits = !giveUp && this.#jobs.count(dest) > 0;
      while (dest.idle.length > 0 && ((!moreMayCome && !mailWaits) || (slotsFull && unserved > 0))) {
        dest.idle.shift()!.give(null);
        unserved--;
      }
    }
    this.#wake(giveUp ? Infinity : Math.min(wake, this.#shaper.nextEnd()));
  }

  /**
   * What the policy says to a slot that would take its next job now: take it; wait (the epoch
   * ms its group's pace lets a message start, when that is soon); or quit (messagesPerConnection
   * reached, more connections open than the group's limit, or a long wait for the pace).
   */
  #mayTake(slot: Slot, now: number): "take" | "quit" | number {
    const group = slot.group;
    if (this.#suspensionOf(slot.destination, now)) return "quit";
    if (this.#live(this.#groupSlots(group)) > this.#shaper.connections(group)) return "quit";
    const perConnection = group.limits.messagesPerConnection;
    if (perConnection !== null && slot.jobs >= perConnection) return "quit";
    if (group.nextStart > now) return group.nextStart - now <= KEEP_IDLE_MS ? group.nextStart : "quit";
    return "take";
  }

  /** Slots that are not leaving: connecting, working, or idle. */
  #live(slots: Iterable<Slot>): number {
    let n = 0;
    for (const slot of slots) if (!slot.leaving) n++;
    return n;
  }

  /** Slots by the group their destination's limits count on (set when each opens). */
  readonly #slotsByGroup = new Map<Group, Set<Slot>>();

  #groupSlots(group: Group): ReadonlySet<Slot> {
    return this.#slotsByGroup.get(group) ?? NO_SLOTS;
  }

  /** The scheduler runs again at `at` (epoch ms); the timer keeps the process alive only while mail waits for it. */
  #wake(at: number): void {
    if (at !== this.#wakeAt) {
      if (this.#wakeTimer) clearTimeout(this.#wakeTimer);
      this.#wakeTimer = null;
      this.#wakeAt = at;
      if (at === Infinity) return;
      this.#wakeTimer = setTimeout(() => {
        this.#wakeTimer = null;
        this.#wakeAt = Infinity;
        this.#expireSuspensions();
        this.#schedule();
      }, Math.max(0, at - Date.now()));
    }
    if (this.#wakeTimer && this.#jobs.size > 0) this.#wakeTimer.ref();
    else this.#wakeTimer?.unref();
  }

  #wakeTimer: NodeJS.Timeout | null = null;
  #wakeAt = Infinity;

  #openSlot(dest: Destination): void {
    const slot = new Slot(this.#host, dest, dest.group!);
    this.#slots.add(slot);
    dest.slots.add(slot);
    let same = this.#slotsByGroup.get(slot.group);
    if (!same) this.#slotsByGroup.set(slot.group, (same = new Set()));
    same.add(slot);
    slot.open();
  }

  /** Mail may still come this pass: the backlog is not empty, messages are being prepared or read. */
  #moreMayCome(): boolean {
    return this.#backlogHead < this.#backlog.length || this.#preparing > 0 || this.#scanning !== null || this.#mayRescan();
  }

  /** While the backlog ran dry, files may have been dropped in: read outgoing/ again, at most once a second. */
  #mayRescan(): boolean {
    if (this.#stopping || Date.now() - this.#lastScan < 1000) return false;
    this.#scan().catch((err) => this.#reportError(err as Error)).finally(() => { this.#pump(); this.#schedule(); });
    return true;
  }

  #slotReady(slot: Slot): void {
    // do_smtp_connect() succeeded: the C code resets its tries here.
    slot.destination.failures = 0;
    this.#schedule();
  }

  #slotFailedEarly(slot: Slot, reason: string, reply: string | null): void {
    const rule = reply ? this.#shaper.ruleFor(reply) : null;
    if (rule) this.#applyRule(rule, slot, reason);
    slot.destination.failures++;
    slot.destination.lastError = reason;
    slot.destination.lastReply = reply;
    slot.destination.lastTlsPolicy = slot.tlsPolicy;
    this.#slotClosed(slot);
  }

  #slotClosed(slot: Slot): void {
    if (!this.#slots.delete(slot)) return;
    slot.destination.slots.delete(slot);
    const same = this.#slotsByGroup.get(slot.group);
    same?.delete(slot);
    if (same?.size === 0) this.#slotsByGroup.delete(slot.group);
    this.#schedule();
  }

  /* Reply rules and suspensions */

  /** The suspension a destination is under now: its group's (a provider, a domain) or its own domain's. */
  #suspensionOf(dest: Destination, now: number): string | null {
    if (dest.group && this.#shaper.suspension(dest.group.key, now)) return dest.group.key;
    if (!dest.key.startsWith("relay:") && this.#shaper.suspension(dest.key, now)) return dest.key;
    return null;
  }

  /** A suspended destination: its jobs go back untried (they wait for the end), its idle slots quit. */
  #holdBack(dest: Destination, key: string): void {
    if (!dest.key.startsWith("relay:") && this.#shaper.noteDomain(key, dest.key)) this.#saveSuspensions();
    for (const job of this.#jobs.drain(dest)) {
      job.delivery.heldBy.add(key);
      this.#jobDone(job);
    }
    for (const idle of dest.idle.splice(0)) idle.give(null);
  }

  /**
   * A deferral whose reply a rule matches costs the message no attempt; the rule's action
   * (throttle, suspend) is taken once per session, by the outcome that carries the session.
   * Jobs deferred after the connection failed match by the reply that refused it.
   */
  #replyRule(job: Job, session: Slot | null, outcome: Outcome): void {
    const words = outcome.reply ?? (outcome.relay === "none" ? job.destination.lastReply : null) ?? outcome.text;
    const rule = this.#shaper.ruleFor(words);
    if (!rule) return;
    job.delivery.noPenalty.add(outcome.recipient);
    const group = session?.group ?? job.destination.group;
    if (rule.action === "suspend" && group) job.delivery.heldBy.add(group.key);
    if (session) this.#applyRule(rule, session, outcome.text);
  }

  /** Sessions whose reply already moved the policy: one session, one throttle (or suspension). */
  readonly #ruled = new WeakSet<Slot>();

  #applyRule(rule: ReplyRule, slot: Slot, reason: string): void {
    if (this.#ruled.has(slot)) return;
    this.#ruled.add(slot);
    const group = slot.group;
    if (rule.action === "throttle") {
      // The slot that heard it is still counted: it was open when the server asked for fewer.
      const limit = this.#shaper.throttle(group, this.#groupSlots(group).size);
      this.#log.write("qmgr", `${group.key}: throttled to ${limit} connection${limit === 1 ? "" : "s"}: ${printable(reason, 1000)}`);
    } else {
      const domains = slot.destination.key.startsWith("relay:") ? [] : [slot.destination.key];
      this.#suspend(group.key, rule.seconds, reason, domains);
    }
    this.#schedule();
  }

  /** Begins a suspension (logged once, when it begins; a second reply only lengthens it). */
  #suspend(key: string, seconds: number, reason: string, domains: string[] = []): void {
    const now = Date.now();
    const already = this.#shaper.suspension(key, now) !== null;
    const s = this.#shaper.suspend(key, seconds, reason, now, domains);
    if (!already) this.#log.write("qmgr", suspendedLine(key, seconds, s.until, reason));
    this.#saveSuspensions();
    this.#schedule();
  }

  /** Suspensions whose time is over: logged once, their mail taken again. */
  #expireSuspensions(): void {
    const ended = this.#shaper.ended(Date.now());
    for (const [key] of ended) {
      this.#log.write("qmgr", resumedLine(key, false));
      this.#unpark(key);
    }
    if (ended.length > 0) this.#saveSuspensions();
  }

  /** Messages held back by a suspension, by queue id: where they wait and which suspensions hold them. */
  readonly #parked = new Map<string, { from: "outgoing" | "deferred"; keys: string[] }>();

  /** A suspension is over: what it held back is read again (what another one holds is parked again). */
  #unpark(key: string): void {
    for (const [id, parked] of this.#parked) {
      if (!parked.keys.includes(key)) continue;
      this.#parked.delete(id);
      this.#tried.delete(id);
      this.#enqueue(id, parked.from);
    }
    if (this.#active && !this.#stopping) this.#scheduleTick();
  }

  #saveSuspensions(): void {
    this.#spool.writeState("suspended", this.#shaper.state())
      .catch((err) => this.#log.write("qmgr", `warning: cannot save the suspensions: ${printable((err as Error).message)}`));
  }

  /** Jobs queued for a destination no slot will serve now are deferred (or, on stop, put back untried). */
  #dropJobs(dest: Destination, reason: string | null): void {
    for (const job of this.#jobs.drain(dest)) {
      if (reason) this.#deferUnsent(job, reason);
      else this.#jobDone(job);
    }
    for (const idle of dest.idle.splice(0)) idle.give(null);
  }

  #deferUnsent(job: Job, reason: string): void {
    job.startedAt = Date.now();
    const dest = job.destination;
    for (const rcpt of job.recipients) {
      if (!job.delivery.outcomes.has(rcpt)) {
        this.#recordOutcome(job, { queueId: job.delivery.msg.id, recipient: rcpt, status: "deferred", code: 0, dsn: "4.4.1", text: reason, relay: "none", tlsPolicy: dest.lastTlsPolicy });
      }
    }
    this.#jobDone(job);
  }

  /** An information line of the smtp process. */
  #note(text: string): void {
    this.#log.write("smtp", text);
  }

  /* Postfix's debug_peer_list and notify_classes */

  #debugPeers: net.BlockList | null = null;

  /** --debug-peer: a host name (or its parent domain), an address, or a CIDR block. */
  #isDebugPeer(hop: Hop): boolean {
    const list = this.#options.debugPeer;
    if (list.length === 0) return false;
    if (!this.#debugPeers) {
      this.#debugPeers = new net.BlockList();
      for (const entry of list) {
        const [address, bits] = entry.split("/");
        const family = net.isIPv6(address) ? "ipv6" : "ipv4";
        if (!net.isIP(address)) continue;
        if (bits) this.#debugPeers.addSubnet(address, Number(bits), family);
        else this.#debugPeers.addAddress(address, family);
      }
    }
    const host = hop.host.toLowerCase();
    if (list.some((e) => !net.isIP(e.split("/")[0]) && (host === e.toLowerCase() || host.endsWith(`.${e.toLowerCase()}`)))) return true;
    return net.isIP(hop.address) ? this.#debugPeers.check(hop.address, net.isIPv6(hop.address) ? "ipv6" : "ipv4") : false;
  }

  get #wantsTranscripts(): boolean {
    return this.#options.notifyClasses.includes("protocol");
  }

  get #postmaster(): string {
    return this.#options.postmaster ?? `postmaster@${this.#options.helo}`;
  }

  /** The last time a notice of each class went out: at most one a minute per class. */
  readonly #noticeSent = new Map<string, number>();

  /** Postfix's smtp_chat_notify: the session transcript to the postmaster, AUTH redacted, no bodies. */
  #protocolNotice(peer: string, reason: string, transcript: string[]): void {
    const text = `Transcript of session follows.\n\n${transcript.map((l) => (l.startsWith(">") ? ` Out: ${l.slice(2)}` : ` In:  ${l.slice(2)}`)).join("\n")}\n\nFor other details, see the local mail logfile.\n\nThe error: ${reason}\n`;
    this.#queueNotice("protocol", `Postmaster Copy: mudmail SMTP client: errors from ${peer}`, text);
  }

  #queueNotice(kind: string, subject: string, text: string): void {
    const last = this.#noticeSent.get(kind) ?? 0;
    if (Date.now() - last < 60_000) return;
    this.#noticeSent.set(kind, Date.now());
    const content = composeNotice({ to: this.#postmaster, subject, text, reportingMta: this.#options.helo });
    // The pass is not over while a notice is being queued: it goes out in the same pass.
    this.#queuingNotices++;
    this.#spool.create(content).then((id) => {
      this.#madeHere.add(id);
      this.#log.write("qmgr", `${id}: postmaster notice (${kind}): ${printable(subject)}`);
      if (this.#active && !this.#stopping) {
        this.#enqueue(id);
        this.#scheduleTick();
      }
    }, (err) => this.#log.write("qmgr", `warning: cannot queue a postmaster notice: ${printable((err as Error).message)}`)).finally(() => {
      this.#queuingNotices--;
      this.#checkIdle();
    });
  }

  #queuingNotices = 0;

  /* Transport security: what each session is allowed and required to do */

  /** Hosts whose TLS handshake failed under "may": the next attempt goes in plaintext, once. */
  /** Address -> the pass its handshake failed in (-1: an earlier run, read from the spool). */
  readonly #plaintextOnce = new Map<string, number>();
  #authFailure: string | null = null;
  /** Counts ticks: "the next attempt" of a host is one in a later pass. */
  #pass = 0;

  /**
   * How a slot talks to this hop: TLS mode (with its plaintext-once memory, or what the MX
   * host's TLS policy requires), timeouts, AUTH, transcripts.
   */
  #session(hop: Hop, dest: Destination): Session {
    const o = this.#options;
    const policy = dest.tls?.peerFor(hop) ?? null;
    return {
      connection: {
        host: hop.host, address: hop.address, port: hop.port, helo: o.helo,
        tls: policy?.requireTls ? "encrypt" : this.#tlsModeFor(hop),
        peer: policy ? { policy, onResult: (result, local) => this.#tlsResult(policy.report, hop, result, local) } : null,
        tlsWrapper: o.tls !== "none" && (o.tlsWrapper || (o.relay !== null && hop.port === 465)),
        ca: this.#extraCa,
        timeouts: {
          connect: o.connectTimeout, helo: o.heloTimeout, mail: o.mailTimeout, rcpt: o.rcptTimeout, dataInit: o.dataInitTimeout,
          dataXfer: o.dataXferTimeout, dataDone: o.dataDoneTimeout, quit: o.quitTimeout,
        },
      },
      debug: this.#isDebugPeer(hop),
      transcript: this.#options.notifyClasses.includes("protocol"),
      credentials: this.#credentials(),
      waitForQuit: !o.skipQuitResponse,
      tlsPolicy: policy?.tag ?? null,
    };
  }

  /**
   * The TLS mode for this hop: the option ("dane" where no TLSA record applies is "may"),
   * except once, in a later pass, after a failed "may" handshake.
   */
  #tlsModeFor(hop: Hop): TlsMode {
    const mode = this.#options.tls === "dane" ? "may" : this.#options.tls;
    const failedIn = this.#plaintextOnce.get(hop.address);
    if (mode === "may" && failedIn !== undefined && failedIn < this.#pass) return "none";
    return mode;
  }

  /** A session's TLS outcome under its policy (or a problem found before any session): counted for TLS-RPT. */
  #tlsResult(policy: ReportPolicy, hop: Hop | null, result: TlsResult, local: string | null = null): void {
    this.#tlsReports?.count(policy, hop, result, local);
  }

  /**
   * Each tick: once the report period is over, the TLS reports (mailto: ones queued here,
   * https: ones posted by tls-report.ts); the counts are saved in the spool when they changed.
   */
  async #tlsReportsDue(): Promise<void> {
    const reports = this.#tlsReports;
    if (!reports) return;
    try {
      for (const mail of await reports.due(Date.now())) await this.#queueReport(mail.content, mail.what);
      await reports.save();
    } catch (err) {
      this.#log.write("qmgr", `warning: TLS reports: ${printable((err as Error).message)}`);
    }
  }

  /** --tls-ca's certificates, read once when the engine is made. */
  readonly #extraCa: string | null;


  /** A handshake failed under "may": that host gets one plaintext attempt next time (and it is said). */
  #tlsFailed(hop: Hop): void {
    if (this.#plaintextOnce.has(hop.address)) return;
    this.#plaintextOnce.set(hop.address, this.#pass);
    this.#saveTlsFallback();
    this.#log.write("smtp", `warning: TLS handshake with ${hop.host}[${hop.address}]:${hop.port} failed; the next attempt to it goes in plaintext (--tls may)`);
  }

  /** Called when a plaintext session under "may" began: the one plaintext attempt is used up. */
  #plaintextUsed(hop: Hop): void {
    if (this.#plaintextOnce.delete(hop.address)) this.#saveTlsFallback();
  }

  /** The hosts owed a plaintext attempt outlive the process: a --flush run is one pass. */
  #saveTlsFallback(): void {
    this.#spool.writeState("tls-plaintext", [...this.#plaintextOnce.keys()]).catch(() => undefined);
  }

  async #loadTlsFallback(): Promise<void> {
    const saved = await this.#spool.readState("tls-plaintext");
    if (Array.isArray(saved)) for (const address of saved) if (typeof address === "string") this.#plaintextOnce.set(address, -1);
  }

  #credentials(): Credentials | null {
    const { auth, xoauth2Token } = this.#options;
    if (!this.#options.relay || (auth == null && xoauth2Token == null)) return null;
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
  #authRefused(reason: string, hop: Hop, reply: Reply): void {
    if (this.#authFailure) return;
    this.#authFailure = reason;
    this.#log.write("smtp", `error: ${reason}; no mail is sent in this run, the queue is kept`);
    this.#emit("error", new MailError(reason, "EAUTH", { host: hop.host, stage: STEPS.auth.label, command: "AUTH", response: replyText(reply) }));
    this.#backlog = [];
    this.#backlogHead = 0;
    for (const dest of this.#destinations.values()) this.#dropJobs(dest, null);
  }

  /* Outcomes: log line, event, and the queue file's fate */

  #recordOutcome(job: Job, input: OutcomeInput): void {
    const { tlsPolicy, session, ...fields } = input;
    const outcome: Outcome = { ...fields, enhanced: input.dsn, reply: input.reply ?? null };
    const delivery = job.delivery;
    delivery.outcomes.set(outcome.recipient, outcome);
    const now = Date.now();
    const started = job.startedAt || now;
    // Postfix's delays=a/b/c/d: before the queue manager, in it, connection setup, transmission.
    const a = delivery.claimedAt - delivery.msg.arrival;
    const b = started - delivery.claimedAt;
    const c = job.setupMs;
    const d = now - started;
    this.#log.write("smtp",
      `${outcome.queueId}: to=<${outcome.recipient}>, relay=${outcome.relay}, delay=${seconds(now - delivery.msg.arrival)}, ` +
      `delays=${seconds(a)}/${seconds(b)}/${seconds(c)}/${seconds(d)}, dsn=${outcome.dsn}, status=${outcome.status} (${outcome.text})${tlsPolicy ? `, ${tlsPolicy}` : ""}`);
    this.#outcomeTotals[outcome.status]++;
    if (outcome.status === "sent") this.#deliveryDelay.observe((now - delivery.msg.arrival) / 1000);
    const group = session?.group ?? job.destination.group;
    if (outcome.status === "sent" && group) this.#shaper.delivered(group);
    if (outcome.status === "deferred") this.#replyRule(job, session ?? null, outcome);
    this.#emit(outcome.status, outcome);
  }

  #jobDone(job: Job): void {
    const delivery = job.delivery;
    if (--delivery.openJobs > 0 || delivery.settling) return this.#pump();
    this.#deliveryDone(delivery);
  }

  /** Every job of a delivery is done (or it had none to do): it settles. */
  #deliveryDone(delivery: Delivery): void {
    delivery.settling = true;
    // The unlink after a 250 goes first: every moment before it is a window for a duplicate.
    const settled = this.#settle(delivery);
    this.#pump();
    delivery.settled = settled.then(
      (putBack) => this.#forget(delivery.msg.id, putBack ?? undefined),
      (err) => this.#strand(delivery, err as Error),
    ).finally(() => this.#checkIdle());
  }

  /** Deliveries whose settling failed (EIO, ENOSPC, a folder replaced by a file): still ours, tried again each tick. */
  readonly #stranded = new Set<Delivery>();

  /**
   * A settle step failed. The message stays in outgoing_active/, held by this engine (a scan
   * never takes it, the summary counts it as deferred), and the next tick, or stop(), tries
   * the rest of its settlement again.
   */
  #strand(delivery: Delivery, err: Error): void {
    const plan = delivery.settlement;
    if (plan) plan.tries++;
    if (!this.#stranded.has(delivery)) this.#counts.deferred++;
    this.#stranded.add(delivery);
    this.#inFlight.delete(delivery.msg.id);
    const error = new MailError(`${delivery.msg.id}: cannot settle the queue file (${plan ? `${plan.fate}, try ${plan.tries}` : "deciding"}): ` +
      `${(err as Error).message}; it stays in outgoing_active/ ${this.#stopping ? "until the next start puts it back in outgoing/" : "and is tried again at the next tick"}`,
      "EQUEUE", { queueId: delivery.msg.id });
    this.#reportError(error);
  }

  /** Each tick, and at stop(): stranded settlements are tried again from where they stopped. */
  async #retryStranded(): Promise<void> {
    for (const delivery of [...this.#stranded]) {
      this.#stranded.delete(delivery);
      this.#inFlight.add(delivery.msg.id);
      try {
        const putBack = await this.#settle(delivery);
        this.#log.write("qmgr", `${delivery.msg.id}: settled after ${delivery.settlement?.tries ?? 0} failed tries`);
        this.#forget(delivery.msg.id, putBack ?? undefined);
      } catch (err) {
        this.#strand(delivery, err as Error);
      }
    }
    this.#checkIdle();
  }

  /**
   * All jobs of a delivery are done: bounce what failed for good (a DSN to the sender), then
   * remove the message, or put it in deferred/ with the recipients still pending and the time
   * of its next attempt, or, past --max-queue-lifetime, give those up too. Returns the id it
   * was put back under, or null when it left the queue. Each step is done once: called again
   * after a failure, it goes on from the step that failed.
   */
  async #settle(delivery: Delivery): Promise<string | null> {
    const { msg } = delivery;
    const plan = (delivery.settlement ??= this.#planSettlement(delivery));
    while (plan.reports.length > 0) {
      const { outcomes, action } = plan.reports[0];
      const queued = await this.#report(delivery, outcomes, action);
      if (action === "delayed" && plan.book) plan.book.warned = queued;
      plan.reports.shift();
    }
    if (plan.fate === "complete") {
      await this.#spool.complete(msg.id, delivery.book !== null);
      this.#log.write("qmgr", `${msg.id}: removed`);
      if (plan.bounced) this.#counts.bounced++;
      else this.#counts.sent++;
      this.#countRecipients(plan, false);
      return null;
    }
    if (plan.pending.length < msg.recipients.length) await this.#spool.rewriteRecipients(msg, plan.pending);
    if (plan.fate === "putBack") {
      const id = await this.#putBack(delivery);
      this.#countRecipients(plan, this.#countsAsDeferred(delivery));
      return id;
    }
    const id = await this.#spool.release(msg.id, "deferred", plan.book!);
    this.#due.push(id, plan.book!.nextAttempt ?? 0);
    this.#counts.deferred++;
    this.#countRecipients(plan, true);
    return id;
  }

  /** The summary's recipients: delivered, failed for good, and (when the message waits on) still pending. */
  #countRecipients(plan: Settlement, pending: boolean): void {
    const r = this.#counts.byRecipient;
    r.sent += plan.sent;
    r.bounced += plan.failed;
    if (pending) r.deferred += plan.pending.length;
  }

  /** A message put back untried counts as deferred when something stopped it (not when the engine stops). */
  #countsAsDeferred(delivery: Delivery): boolean {
    return this.#authFailure !== null || delivery.noPenalty.size > 0 || delivery.heldBy.size > 0;
  }

  /** The decision of settle(), made once (it reads the clock): nothing here touches a file. */
  #planSettlement(delivery: Delivery): Settlement {
    const { msg } = delivery;
    const outcomes = [...delivery.outcomes.values()];
    const pending = msg.recipients.filter((r) => delivery.outcomes.get(r)?.status === "deferred" || !delivery.outcomes.has(r));
    // A deferral a reply rule asked for (throttle, suspend) costs the message no attempt.
    const lastDeferral = outcomes.filter((o) => o.status === "deferred" && !delivery.noPenalty.has(o.recipient)).pop();
    const age = Date.now() - msg.arrival;
    // Nothing went wrong in this attempt, but some recipients were never tried (the engine
    // is stopping, or the relay refused our credentials): no attempt is counted for them.
    const untried = pending.length > 0 && !lastDeferral;
    const expired = pending.length > 0 && !untried && age >= this.#options.maxQueueLifetime * 1000;
    const failed = outcomes.filter((o) => o.status === "bounced");
    if (expired) {
      for (const rcpt of pending) {
        const last = delivery.outcomes.get(rcpt) ?? lastDeferral;
        const text = `message expired after ${formatAge(age)} in the queue: ${last?.text ?? "not delivered"}`;
        const outcome: Outcome = { queueId: msg.id, recipient: rcpt, status: "bounced", code: last?.code ?? 0, dsn: last?.dsn ?? "4.4.7",
          enhanced: last?.dsn ?? "4.4.7", text, reply: last?.reply ?? null, relay: last?.relay ?? "none" };
        failed.push(outcome);
        this.#emit("bounced", outcome);
      }
      this.#log.write("qmgr", `${msg.id}: from=<${msg.sender}>, status=expired, returned to sender`);
    }
    const reports: Settlement["reports"] = [];
    if (failed.length > 0) reports.push({ outcomes: failed, action: "failed" });
    const relayed = outcomes.filter((o) => o.status === "sent" && delivery.sentWithoutDsn.has(o.recipient));
    if (relayed.length > 0 && delivery.book?.dsn?.notify?.includes("success")) reports.push({ outcomes: relayed, action: "relayed" });
    const sent = outcomes.filter((o) => o.status === "sent").length;
    const base = { reports, bounced: failed.length > 0, tries: 0, sent, failed: failed.length };
    if (pending.length === 0 || expired) return { fate: "complete", pending: [], book: null, ...base };
    if (!lastDeferral) return { fate: "putBack", pending, book: null, ...base };
    const attempts = (delivery.book?.attempts ?? 0) + 1;
    const book: Bookkeeping = { attempts, nextAttempt: Date.now() + this.#backoff(attempts), lastError: lastDeferral.text };
    if (delivery.book?.dsn) book.dsn = delivery.book.dsn;
    if (this.#dkimKeys.length > 0) book.prefix = delivery.prefix.toString("base64");
    if (delivery.book?.warned) book.warned = true;
    else if (this.#options.delayWarning !== null && age >= this.#options.delayWarning * 3600_000) {
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
  async #putBack(delivery: Delivery): Promise<string> {
    const to = this.#stopping ? "outgoing" : delivery.from;
    // Marked as picked up, so that its pickup line is not written again when it is claimed next
    // (not when the engine stops: that adds no file to the stop; the next run logs it again).
    const book = this.#stopping || delivery.book?.picked || (delivery.book?.attempts ?? 0) > 0 ? undefined
      : { ...(delivery.book ?? { attempts: 0, nextAttempt: null, lastError: null }), picked: true };
    const id = await this.#spool.release(delivery.msg.id, to, book);
    if (this.#countsAsDeferred(delivery)) this.#counts.deferred++;
    // Held back by a suspension: it waits, unread, until the suspension ends or is lifted.
    const now = Date.now();
    const keys = [...delivery.heldBy].filter((key) => this.#shaper.suspension(key, now));
    if (keys.length > 0 && !this.#stopping) this.#parked.set(id, { from: to, keys });
    else if (to === "deferred") this.#due.push(id, delivery.book?.nextAttempt ?? 0);
    return id;
  }

  /** Postfix's backoff: --min-backoff after the first failure, doubling up to --max-backoff. */
  #backoff(attempts: number): number {
    const { minBackoff, maxBackoff } = this.#options;
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
  async #report(delivery: Delivery, outcomes: Outcome[], action: "failed" | "delayed" | "relayed"): Promise<boolean> {
    const { msg } = delivery;
    const dsn = delivery.book?.dsn;
    const wanted = action === "failed" ? "failure" : action === "delayed" ? "delay" : "success";
    const senderWants = msg.sender !== "" && (dsn?.notify ? dsn.notify.includes(wanted) : action !== "relayed");
    const postmasterClass = action === "failed" ? "bounce" : action === "delayed" ? "delay" : null;
    const postmasterWants = postmasterClass !== null && this.#options.notifyClasses.includes(postmasterClass);
    if (!senderWants) {
      if (action === "failed") {
        this.#log.write("qmgr", msg.sender === ""
          ? `${msg.id}: undeliverable mail from the null sender is dropped, not bounced (no mail loops)`
          : `${msg.id}: no non-delivery notification: the sender asked for NOTIFY=${(dsn?.notify ?? []).join(",").toUpperCase()}`);
      }
      if (!postmasterWants) return false;
    }
    const now = new Date();
    const headers = await this.#spool.headerBlock(msg);
    const full = dsn?.ret === "full" && msg.size <= 50_000;
    const body = full ? await this.#spool.body(msg, headers.length) : undefined;
    const base = {
      queueId: msg.id,
      arrival: new Date(msg.arrival),
      reportingMta: this.#options.helo,
      recipients: outcomes.map((o) => ({
        recipient: o.recipient,
        action,
        status: o.dsn,
        remoteMta: o.relay === "none" ? undefined : o.relay.replace(/\[.*$/, ""),
        diagnostic: o.reply ?? o.text,
        reason: o.text,
        lastAttempt: now,
        willRetryUntil: action === "delayed" ? new Date(msg.arrival + this.#options.maxQueueLifetime * 1000) : undefined,
      })),
      originalHeaders: headers,
      ...(dsn?.envid ? { envid: dsn.envid } : {}),
      now,
    };
    const kind = action === "failed" ? "non-delivery" : action === "delayed" ? "delay" : "success";
    if (senderWants) {
      const content = composeBounce({ ...base, sender: msg.sender, ...(body ? { returnContent: "full" as const, originalBody: body } : {}) });
      await this.#queueReport(content, `${msg.id}: sender ${kind} notification`);
    }
    if (postmasterWants) {
      await this.#queueReport(composeBounce({ ...base, sender: this.#postmaster }), `${msg.id}: postmaster ${kind} notification`);
    }
    return senderWants;
  }

  async #queueReport(content: Buffer, what: string): Promise<void> {
    const id = await this.#spool.create(content);
    this.#madeHere.add(id);
    this.#log.write("qmgr", `${what}: ${id}`);
    if (this.#active && !this.#stopping) {
      this.#enqueue(id);
      this.#scheduleTick();
    }
  }



  async #quarantine(id: string, from: "outgoing" | "outgoing_active", reason: string): Promise<void> {
    const moved = await this.#spool.quarantine(id, from, reason);
    this.#log.write("qmgr", `${printable(id)}: corrupt queue file moved to corrupt/${printable(moved)}: ${printable(reason)}`);
    this.#counts.corrupt++;
    this.#emit("error", new MailError(`${id}: corrupt queue file: ${reason}`, "ECORRUPT", { queueId: id }));
  }

  #reportError(err: Error): void {
    const error = err instanceof MailError ? err : new MailError(err.message, "EINTERNAL");
    this.#log.write("qmgr", `warning: ${printable(error.message, 1000)}`);
    this.#emit("error", error);
    // notify_classes: a file system problem is "resource", anything else "software".
    const kind = error.code === "EQUEUE" || errno(err) !== undefined ? "resource" : "software";
    if (this.#options.notifyClasses.includes(kind) && !this.#stopping) {
      this.#queueNotice(kind, `Postmaster Copy: mudmail ${kind} problem`, `The mail system on ${this.#options.helo} had a ${kind} problem:\n\n${error.message}\n`);
    }
  }

  /* Idle: the pass is over when nothing waits, nothing is read ahead, no slot is busy */

  #isIdle(): boolean {
    return this.#slots.size === 0 && this.#preparing === 0 && this.#inFlight.size === 0 && !this.#scanning && this.#queuingNotices === 0 &&
      (this.#stopping || (this.#backlogHead >= this.#backlog.length && this.#jobs.size === 0));
  }

  #checkIdle(): void {
    if (!this.#isIdle()) return;
    for (const waiter of this.#idleWaiters.splice(0)) waiter();
  }

  #idle(): Promise<void> {
    if (this.#isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  #releaseLock(): void {
    this.#requestWatcher?.close();
    this.#requestWatcher = null;
    this.#lock.unlock();
    this.#initialized = null;
  }
}

function emptySummary(): FlushSummary {
  return { sent: 0, deferred: 0, bounced: 0, corrupt: 0, messages: 0, recipients: 0, byRecipient: { sent: 0, deferred: 0, bounced: 0 }, seconds: 0 };
}

