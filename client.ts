/*
 * NAME
 *   client.ts - the direct client: one SMTP conversation now, answered in code and text
 *
 * SYNOPSIS
 *   const r = await sendmail({ from, to: ["a@x.org"], body, host: "127.0.0.1", port: 2525 });
 *   r.code < 400 ? ok() : r.code === 700 ? someRefused(r.losers) : failed(r.code, r.text);
 *   await vrfy("joe", { host }); await expn("staff", { host }); await help("MAIL", { host });
 *
 *   const s = await SmtpSession.open({ host, port });
 *   const last = await smtpTransactions(s, (c) => c.ehlo(), (c) => c.mail(from), (c) => c.rcpt(to));
 *
 * DESCRIPTION
 *   scsh's SMTP client (../shared/seeds/scsh-smtp-client.txt) for programs that want an
 *   answer instead of the queue. Every call returns { code, text }: the reply code and the
 *   reply's text lines. Codes from 600 are not SMTP's: 600 the server sent garbage, 621 it
 *   closed the connection in the middle of a reply. sendmail() returns the seed's partial
 *   success { code: 700, losers: [{ rcpt, code, text }] } when only some recipients were
 *   refused. smtpTransactions() runs steps in order and stops at the first 4xx or 5xx, 221
 *   or 421, sending QUIT (unless the server closed already), as the seed's macro does.
 *
 *   It stands on the engine's own SmtpConnection (smtp-connection.ts), driven one command at
 *   a time: the same reply parser, stage timers, STARTTLS and TLS modes, and the same stuffer
 *   (queue.ts) for the body, so a fix to the protocol reaches both.
 *
 * DIAGNOSTICS
 *   A connection that cannot be made, a stage that times out, a TLS handshake that fails or
 *   stalls, or a server that breaks the protocol rejects with a MailError (code ECONNECTION,
 *   ETIMEDOUT, ETLS or EPROTOCOL, with the host, the stage, the command and the server's
 *   words). A connection that drops while a command waits answers 621, as in scsh.
 */

import * as os from "node:os";
import { CODE_PREMATURE_EOF, MailError, makeReply, type Extensions, type Reply } from "./smtp-codes.js";
import { SmtpConnection, STEPS, otherStep, type Hello, type Step, type TimeoutName, type TlsMode } from "./smtp-connection.js";
import { Stuffer, addressProblem } from "./queue.js";

export interface ClientOptions {
  host: string;
  port?: number;
  /** Name sent in EHLO/HELO; the host name by default. */
  helo?: string;
  tls?: TlsMode;
  /** An extra CA (PEM text) for "verify". */
  ca?: string;
  /** Implicit TLS from the first byte (SMTPS, 465). */
  tlsWrapper?: boolean;
  /** Seconds, per stage; Postfix's defaults otherwise. */
  timeouts?: Partial<Record<TimeoutName, number>>;
}

/** What every call returns: the reply code and its text lines (code and separator stripped). */
export interface Answer {
  code: number;
  text: string[];
}

export interface Loser {
  rcpt: string;
  code: number;
  text: string[];
}

export type SendmailResult = Answer | { code: 700; losers: Loser[] };

const answer = (reply: Reply): Answer => ({ code: reply.code, text: reply.lines });
const PREMATURE_EOF: Answer = { code: CODE_PREMATURE_EOF, text: ["Premature EOF during smtp reply."] };

/**
 * One conversation, one command at a time, on the engine's SmtpConnection. Replies 221 and
 * 421 close it, as in scsh. A connection that drops while a command waits answers 621 (with
 * whatever part of a reply came); a timeout, a failed TLS handshake or a protocol error
 * rejects with a MailError.
 */
export class SmtpSession {
  readonly #conn: SmtpConnection;
  /** The command waiting for its reply: how the failure callback ends it. */
  #waiting: { resolve: (reply: Reply) => void; reject: (err: MailError) => void } | null = null;
  /** After the end: what every later command answers (an unsolicited 421 the server left, or 621). */
  #afterEnd: Answer | null = null;
  /** What the server offered in its last EHLO reply; null before EHLO or after HELO. */
  extensions: Extensions | null = null;

  private constructor(readonly options: ClientOptions) {
    this.#conn = new SmtpConnection({
      host: options.host, address: options.host, port: options.port ?? 25, helo: options.helo ?? os.hostname(),
      tls: options.tls ?? "may", tlsWrapper: options.tlsWrapper, ca: options.ca, timeouts: options.timeouts,
    }, (err, reply) => this.#ended(err, reply));
  }

  /** Connects and reads the greeting; a greeting of 400 or more is an error (scsh's smtp/open). */
  static async open(options: ClientOptions): Promise<SmtpSession> {
    const session = new SmtpSession(options);
    const greeting = await session.#ask((done) => session.#conn.open(done));
    if (greeting.code >= 400) {
      session.close();
      throw new MailError(`${options.host} greeted with ${greeting.code} ${greeting.lines.join(" ")}`, "EGREETING",
        { host: options.host, stage: STEPS.greeting.label, command: "CONNECT", response: `${greeting.code} ${greeting.lines.join(" ")}` });
    }
    return session;
  }

  get secure(): boolean {
    return this.#conn.secure;
  }

  get closed(): boolean {
    return this.#conn.ended;
  }

  /** Runs one exchange on the connection; its failure, if it comes first, ends the wait. */
  #ask(run: (done: (reply: Reply) => void) => void): Promise<Reply> {
    if (this.#afterEnd) return Promise.resolve(makeReply(this.#afterEnd.code, this.#afterEnd.text));
    return new Promise((resolve, reject) => {
      this.#waiting = { resolve, reject };
      run((reply) => {
        this.#waiting = null;
        resolve(reply);
      });
    });
  }

  #ended(err: MailError, reply: Reply | null): void {
    // A reply nobody asked for (say 421 before a close) is what the next command answers.
    this.#afterEnd = err.code === "EPROTOCOL" && reply && !this.#waiting ? answer(reply) : PREMATURE_EOF;
    const waiting = this.#waiting;
    this.#waiting = null;
    if (!waiting) return;
    // scsh: the connection closing under a command is its answer, 621.
    if (err.code === "ECONNECTION") waiting.resolve(reply ?? makeReply(PREMATURE_EOF.code, PREMATURE_EOF.text));
    else waiting.reject(err);
  }

  /** Sends one command line and reads its reply; 221 and 421 close the connection. */
  async command(line: string, step: Step = otherStep(line.split(" ")[0].toUpperCase())): Promise<Answer> {
    // eslint-disable-next-line no-control-regex
    if (/[\r\n\x00]/.test(line)) {
      throw new MailError(`refusing to send a command with CR, LF or NUL: ${JSON.stringify(line)}`, "EPROTOCOL", { host: this.options.host, command: line.split(" ")[0] });
    }
    const reply = await this.#ask((done) => this.#conn.send(`${line}\r\n`, step, done));
    if (reply.code === 221 || reply.code === 421) this.close();
    return answer(reply);
  }

  /** EHLO, with HELO when EHLO is refused with 5xx; STARTTLS as the tls mode asks. */
  async ehlo(name = this.options.helo ?? os.hostname()): Promise<Answer> {
    let hello: Hello | null = null;
    const reply = await this.#ask((done) => this.#conn.hello((result) => { hello = result; done(result.reply); }, name));
    this.extensions = hello!.helo ? null : hello!.ext;
    const tlsProblem = (hello as Hello | null)?.tlsProblem;
    if (tlsProblem) {
      // The mode forbids going on: the server's refusal if it gave one, else 530 (RFC 3207).
      return reply.code === 250 ? { code: 530, text: [`5.7.10 ${tlsProblem}`] } : answer(reply);
    }
    if (reply.code === 221 || reply.code === 421) this.close();
    return answer(reply);
  }

  async helo(name = this.options.helo ?? os.hostname()): Promise<Answer> {
    return this.command(`HELO ${name}`, STEPS.helo);
  }

  async mail(from: string): Promise<Answer> {
    checkAddress(from, true);
    return this.command(`MAIL FROM:<${from}>`, STEPS.mail);
  }

  async rcpt(to: string): Promise<Answer> {
    checkAddress(to, false);
    return this.command(`RCPT TO:<${to}>`, STEPS.rcpt);
  }

  /** DATA, then the body through the engine's stuffer (CRLF only, dots doubled), then the dot. */
  async data(body: string | Buffer | AsyncIterable<Buffer | string>): Promise<Answer> {
    const go = await this.command("DATA", STEPS.data);
    if (go.code !== 354) return go;
    const stuffer = new Stuffer();
    const chunks: Iterable<Buffer | string> | AsyncIterable<Buffer | string> = typeof body === "string" || Buffer.isBuffer(body) ? [body] : body;
    const stuffed = (async function* () {
      for await (const chunk of chunks) yield stuffer.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
      yield stuffer.end();
    })();
    // The reply to the dot is expected before the body leaves: a server may answer the last
    // piece before the stream says it is done.
    let written: Promise<boolean> = Promise.resolve(false);
    const reply = await this.#ask((done) => {
      this.#conn.expect(STEPS.dot, done);
      written = this.#conn.writeBody(stuffed);
    });
    // A reply that came early (a server that did not wait for the dot): nothing more is
    // written until the body is out, or the data-xfer timer ends the wait.
    await written;
    return answer(reply);
  }

  rset(): Promise<Answer> { return this.command("RSET", STEPS.rset); }
  noop(): Promise<Answer> { return this.command("NOOP"); }
  vrfy(name: string): Promise<Answer> { return this.command(`VRFY ${name}`); }
  expn(name: string): Promise<Answer> { return this.command(`EXPN ${name}`); }
  help(topic = ""): Promise<Answer> { return this.command(topic ? `HELP ${topic}` : "HELP"); }

  /** QUIT, then close whatever the server does. */
  async quit(): Promise<Answer> {
    if (this.closed) return { code: 221, text: ["connection already closed"] };
    const reply = await this.command("QUIT", STEPS.quit).catch(() => ({ code: 221, text: ["closed"] }));
    this.close();
    return reply;
  }

  close(): void {
    this.#conn.close();
  }
}

function checkAddress(address: string, mayBeNull: boolean): void {
  if (mayBeNull && address === "") return;
  const problem = addressProblem(address);
  if (problem) throw new MailError(`bad address ${JSON.stringify(address)}: ${problem}`, "EENVELOPE", { command: mayBeNull ? "MAIL" : "RCPT" });
}

/** One step of smtpTransactions: a call on the session. */
type Transaction = (session: SmtpSession) => Promise<Answer>;

/**
 * The seed's smtp-transactions: run the steps in order; stop at the first reply that is 221,
 * 421 or 400 and above, and close the connection with QUIT; return the last reply.
 */
export async function smtpTransactions(session: SmtpSession, ...steps: Transaction[]): Promise<Answer> {
  let last: Answer = { code: 250, text: [] };
  for (const step of steps) {
    last = await step(session);
    if (last.code === 221 || last.code === 421 || last.code >= 400) {
      if (!session.closed) await session.quit();
      return last;
    }
  }
  return last;
}

export interface SendmailOptions extends ClientOptions {
  from: string;
  to: string[];
  body: string | Buffer | AsyncIterable<Buffer | string>;
}

/**
 * scsh's sendmail: the message to every recipient through one server now. Returns the last
 * reply; or, when only some recipients were refused, { code: 700, losers } with each refused
 * recipient's reply. A reply of 600 or more (garbage, EOF) to a RCPT ends the conversation.
 */
export async function sendmail(options: SendmailOptions): Promise<SendmailResult> {
  const session = await SmtpSession.open(options);
  try {
    const opening = await smtpTransactions(session, (s) => s.ehlo(), (s) => s.mail(options.from));
    if (opening.code >= 400) return opening;
    const losers: Loser[] = [];
    for (const rcpt of options.to) {
      const reply = await session.rcpt(rcpt);
      if (reply.code >= 600) {
        await session.quit();
        return reply;
      }
      if (reply.code >= 400) losers.push({ rcpt, code: reply.code, text: reply.text });
      if (session.closed) return losers.length ? { code: 700, losers } : reply;
    }
    if (losers.length === options.to.length) {
      await session.quit();
      return { code: 700, losers };
    }
    // The reply to the data ("250 ... queued as ...") is what the caller wants to keep; a
    // refused message outweighs refused recipients.
    const done = await session.data(options.body);
    if (!session.closed) await session.quit();
    if (done.code >= 400 || losers.length === 0) return done;
    return { code: 700, losers };
  } finally {
    if (!session.closed) session.close();
  }
}

/** The seed's smtp-query: EHLO, then the query, then QUIT unless the server closed. */
async function query(options: ClientOptions, ask: Transaction): Promise<Answer> {
  const session = await SmtpSession.open(options);
  try {
    const reply = await smtpTransactions(session, (s) => s.ehlo(), ask);
    if (!session.closed) await session.quit();
    return reply;
  } finally {
    if (!session.closed) session.close();
  }
}

export const vrfy = (name: string, options: ClientOptions): Promise<Answer> => query(options, (s) => s.vrfy(name));
export const expn = (name: string, options: ClientOptions): Promise<Answer> => query(options, (s) => s.expn(name));
export const help = (topic: string, options: ClientOptions): Promise<Answer> => query(options, (s) => s.help(topic));
