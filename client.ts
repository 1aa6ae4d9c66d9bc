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
 *   It is the engine's protocol, driven one command at a time: the same reply parser
 *   (smtp-codes.ts), the same stuffer (queue.ts), the same stage timeouts and TLS modes.
 *
 * DIAGNOSTICS
 *   A connection that cannot be made, or a stage that times out, rejects with a MailError-
 *   like ClientError (code ECONNECTION or ETIMEDOUT, the host, the stage, the command).
 */

import * as net from "node:net";
import * as os from "node:os";
import * as tls from "node:tls";
import { ReplyParser, STAGE_TIMEOUTS, CODE_PREMATURE_EOF, makeReply, parseEhlo, type Extensions, type Reply } from "./smtp-codes.js";
import { Stuffer, addressProblem } from "./queue.js";

export type Tls = "none" | "may" | "encrypt" | "verify";

export interface ClientOptions {
  host: string;
  port?: number;
  /** Name sent in EHLO/HELO; the host name by default. */
  helo?: string;
  tls?: Tls;
  /** An extra CA (PEM text) for "verify". */
  ca?: string;
  /** Implicit TLS from the first byte (SMTPS, 465). */
  tlsWrapper?: boolean;
  /** Seconds, per stage; Postfix's defaults otherwise. */
  timeouts?: Partial<Record<keyof typeof STAGE_TIMEOUTS, number>>;
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

export class ClientError extends Error {
  constructor(message: string, readonly code: string, readonly details: { host: string; stage: string; command?: string }) {
    super(message);
    this.name = "ClientError";
  }
}

/** node:tls options for a mode: "verify" checks the chain and the name, the others encrypt only. */
export function tlsConnectionOptions(host: string, mode: Tls, ca?: string | null): tls.ConnectionOptions {
  return {
    host,
    ...(net.isIP(host) ? {} : { servername: host }),
    rejectUnauthorized: mode === "verify",
    ...(ca ? { ca: [...tls.rootCertificates, ca] } : {}),
  };
}

const answer = (reply: Reply): Answer => ({ code: reply.code, text: reply.lines });

/** One conversation, one command at a time. Replies 221 and 421 close it, as in scsh. */
export class SmtpSession {
  private socket: net.Socket;
  private parser = new ReplyParser();
  private readonly replies: Reply[] = [];
  private waiting: ((reply: Reply) => void) | null = null;
  private ended = false;
  /** What the server offered in its last EHLO reply; null before EHLO or after HELO. */
  extensions: Extensions | null = null;
  secure: boolean;

  private constructor(socket: net.Socket, readonly options: ClientOptions, secure: boolean) {
    this.socket = socket;
    this.secure = secure;
    this.listen(socket);
  }

  /** Connects and reads the greeting; a greeting of 400 or more is an error (scsh's smtp/open). */
  static async open(options: ClientOptions): Promise<SmtpSession> {
    const port = options.port ?? 25;
    const seconds = options.timeouts?.connect ?? STAGE_TIMEOUTS.connect;
    const wrapped = Boolean(options.tlsWrapper);
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = wrapped
        ? tls.connect({ port, ...tlsConnectionOptions(options.host, options.tls === "verify" ? "verify" : "encrypt", options.ca) })
        : net.connect({ host: options.host, port });
      const timer = setTimeout(() => { s.destroy(); reject(new ClientError(`connect to ${options.host}:${port}: Connection timed out`, "ETIMEDOUT", { host: options.host, stage: "connect" })); }, seconds * 1000);
      s.once(wrapped ? "secureConnect" : "connect", () => { clearTimeout(timer); s.removeAllListeners("error"); resolve(s); });
      s.once("error", (err) => { clearTimeout(timer); reject(new ClientError(`connect to ${options.host}:${port}: ${err.message}`, "ECONNECTION", { host: options.host, stage: "connect" })); });
    });
    socket.setNoDelay(true);
    const session = new SmtpSession(socket, options, wrapped);
    const greeting = await session.read("helo", "greeting");
    if (greeting.code >= 400) {
      session.close();
      throw new ClientError(`${options.host} greeted with ${greeting.code} ${greeting.lines.join(" ")}`, "EGREETING", { host: options.host, stage: "greeting" });
    }
    return session;
  }

  private listen(socket: net.Socket): void {
    socket.on("data", (chunk: Buffer) => {
      for (const reply of this.parser.push(chunk)) this.deliver(reply);
    });
    const end = () => {
      if (this.ended) return;
      this.ended = true;
      this.deliver(this.parser.end() ?? makeReply(CODE_PREMATURE_EOF, ["Premature EOF during smtp reply."]));
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", end);
  }

  private deliver(reply: Reply): void {
    const waiter = this.waiting;
    this.waiting = null;
    if (waiter) waiter(reply);
    else this.replies.push(reply);
  }

  /** The next reply, within the stage's timeout. */
  private read(stage: keyof typeof STAGE_TIMEOUTS, command: string): Promise<Reply> {
    const queued = this.replies.shift();
    if (queued) return Promise.resolve(queued);
    if (this.ended) return Promise.resolve(makeReply(CODE_PREMATURE_EOF, ["Premature EOF during smtp reply."]));
    const seconds = this.options.timeouts?.[stage] ?? STAGE_TIMEOUTS[stage];
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting = null;
        this.close();
        reject(new ClientError(`conversation with ${this.options.host} timed out while waiting for the reply to ${command}`, "ETIMEDOUT", { host: this.options.host, stage, command }));
      }, seconds * 1000);
      this.waiting = (reply) => { clearTimeout(timer); resolve(reply); };
    });
  }

  /** Sends one command line and reads its reply; 221 and 421 close the connection. */
  async command(line: string, stage: keyof typeof STAGE_TIMEOUTS = "helo"): Promise<Answer> {
    // eslint-disable-next-line no-control-regex
    if (/[\r\n\x00]/.test(line)) throw new ClientError(`refusing to send a command with CR, LF or NUL: ${JSON.stringify(line)}`, "EPROTOCOL", { host: this.options.host, stage });
    if (!this.ended) this.socket.write(`${line}\r\n`);
    const reply = await this.read(stage, line.split(" ")[0]);
    if (reply.code === 221 || reply.code === 421) this.close();
    return answer(reply);
  }

  /** EHLO, with HELO when EHLO is refused with 5xx; STARTTLS as the tls mode asks. */
  async ehlo(name = this.options.helo ?? os.hostname()): Promise<Answer> {
    let reply = await this.command(`EHLO ${name}`);
    if (reply.code >= 500 && reply.code < 600) {
      reply = await this.command(`HELO ${name}`);
      this.extensions = null;
      return reply;
    }
    if (reply.code !== 250) return reply;
    this.extensions = parseEhlo(makeReply(reply.code, reply.text));
    const mode = this.options.tls ?? "may";
    if (this.secure || mode === "none") return reply;
    if (!this.extensions.startTls) {
      return mode === "may" ? reply : { code: 530, text: [`5.7.10 TLS is required, but was not offered by host ${this.options.host}`] };
    }
    const started = await this.starttls();
    if (started.code !== 220) return mode === "may" ? reply : started;
    return this.ehlo(name);
  }

  async helo(name = this.options.helo ?? os.hostname()): Promise<Answer> {
    return this.command(`HELO ${name}`);
  }

  /** STARTTLS and the handshake; everything the server said or offered before is forgotten. */
  async starttls(): Promise<Answer> {
    const reply = await this.command("STARTTLS");
    if (reply.code !== 220) return reply;
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("end");
    raw.removeAllListeners("close");
    raw.removeAllListeners("error");
    raw.on("error", () => undefined);
    this.parser = new ReplyParser();
    this.replies.length = 0;
    this.extensions = null;
    const mode = this.options.tls === "verify" ? "verify" : "encrypt";
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({ socket: raw, ...tlsConnectionOptions(this.options.host, mode, this.options.ca) });
      s.once("secureConnect", () => { s.removeAllListeners("error"); resolve(s); });
      s.once("error", (err) => { raw.destroy(); reject(new ClientError(`TLS handshake with ${this.options.host} failed: ${err.message}`, "ETLS", { host: this.options.host, stage: "helo", command: "STARTTLS" })); });
    });
    this.socket = secure;
    this.secure = true;
    this.listen(secure);
    return reply;
  }

  async mail(from: string): Promise<Answer> {
    checkAddress(from, true);
    return this.command(`MAIL FROM:<${from}>`, "mail");
  }

  async rcpt(to: string): Promise<Answer> {
    checkAddress(to, false);
    return this.command(`RCPT TO:<${to}>`, "rcpt");
  }

  /** DATA, then the body through the engine's stuffer (CRLF only, dots doubled), then the dot. */
  async data(body: string | Buffer | AsyncIterable<Buffer | string>): Promise<Answer> {
    const go = await this.command("DATA", "dataInit");
    if (go.code !== 354) return go;
    const stuffer = new Stuffer();
    const chunks: Iterable<Buffer | string> | AsyncIterable<Buffer | string> = typeof body === "string" || Buffer.isBuffer(body) ? [body] : body;
    for await (const chunk of chunks) {
      const out = stuffer.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
      if (!this.socket.write(out) && !this.ended) await new Promise<void>((resolve) => this.socket.once("drain", resolve));
    }
    this.socket.write(stuffer.end());
    return answer(await this.read("dataDone", "end of DATA"));
  }

  rset(): Promise<Answer> { return this.command("RSET", "rset"); }
  noop(): Promise<Answer> { return this.command("NOOP"); }
  vrfy(name: string): Promise<Answer> { return this.command(`VRFY ${name}`); }
  expn(name: string): Promise<Answer> { return this.command(`EXPN ${name}`); }
  help(topic = ""): Promise<Answer> { return this.command(topic ? `HELP ${topic}` : "HELP"); }

  /** QUIT, then close whatever the server does. */
  async quit(): Promise<Answer> {
    if (this.ended) return { code: 221, text: ["connection already closed"] };
    const reply = await this.command("QUIT", "quit").catch(() => ({ code: 221, text: ["closed"] }));
    this.close();
    return reply;
  }

  close(): void {
    this.ended = true;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  get closed(): boolean {
    return this.ended;
  }
}

function checkAddress(address: string, mayBeNull: boolean): void {
  if (mayBeNull && address === "") return;
  const problem = addressProblem(address);
  if (problem) throw new ClientError(`bad address ${JSON.stringify(address)}: ${problem}`, "EENVELOPE", { host: "", stage: "mail" });
}

type Step = (session: SmtpSession) => Promise<Answer>;

/**
 * The seed's smtp-transactions: run the steps in order; stop at the first reply that is 221,
 * 421 or 400 and above, and close the connection with QUIT; return the last reply.
 */
export async function smtpTransactions(session: SmtpSession, ...steps: Step[]): Promise<Answer> {
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
async function query(options: ClientOptions, ask: Step): Promise<Answer> {
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
