/**
 * scripted-server: a small SMTP server on node:net for tests of mudmail's SMTP *client*.
 *
 * Postfix is the real server of the suite, but it will not produce on request the
 * faults a client must survive: a 421 after the second RCPT, a 550 for one recipient
 * only, a refused EHLO, a reply split byte by byte, garbage, a stage that never
 * answers, a hang-up right after the message data. This server can. It speaks SMTP
 * on a real loopback socket, behaves like a well-mannered ESMTP server by default,
 * lets each test override any reply through a small `Script`, and records what the
 * client did (commands, transcript, messages with their exact wire bytes).
 *
 * How it works: each connection runs one sequential loop that takes one unit at a
 * time from a Buffer -- a command line, or in the DATA phase a whole message up to
 * CRLF.CRLF -- and answers it before taking the next. Pipelined and fragmented input
 * therefore both work, replies are never interleaved, and the message data is handled
 * as bytes, never as text.
 *
 * Rules worth knowing when writing a script:
 * - A reply is a line ("451 4.3.0 try later"), an array of complete lines
 *   (see `multiline`), or an `Action` (close, reset, silence, raw bytes, delay, stop reading).
 * - The code a reply starts with (for raw bytes: their first three bytes) drives the
 *   session as if the server had decided it: 2xx to MAIL opens a transaction, 3xx to
 *   DATA enters the data phase, 2xx to QUIT or any 421 ends the connection, ...
 * - Hooks are consulted in order onCommand, then ehlo / mail / rcpt, then the
 *   default; a hook returning undefined falls through. onData answers the data phase.
 * - A message whose data was received is recorded in `session.messages` if it was
 *   answered 2xx, otherwise (rejected, silenced, hung up on) in `session.unaccepted`.
 * - `message.data` is un-dot-stuffed and keeps the CRLF that ends its last line
 *   (RFC 5321 4.1.1.4: that CRLF is both the end of the last line and the start of
 *   the terminator); only the final ".CRLF" is removed. `message.raw` is exact.
 *
 * Transport security and authentication (all off unless the script asks):
 * - `tls: { key, cert }` advertises STARTTLS while the session is in plaintext; a STARTTLS answered 220
 *   upgrades the connection in place (node:tls, server side) and, as RFC 3207 says, forgets the greeting
 *   (helo, extensions), the transaction and the AUTH state. Input the client sent after the STARTTLS line
 *   and before the handshake is discarded and kept in `session.plaintextAfterStartTls`.
 *   `afterStartTls220` is written in the same write as that 220 (the command-injection test).
 * - `implicitTls: true` speaks TLS from the first byte (SMTPS, port 465) with the same key and certificate.
 * - `auth` advertises and answers AUTH PLAIN (initial response or empty challenge), LOGIN and XOAUTH2:
 *   235 for a known user/password (token), 535 5.7.8 otherwise; every decoded attempt is recorded in
 *   `session.authAttempts`. SASL responses are recorded in `commands` like command lines.
 * - `session.tls`, `message.tls` and `session.plaintextCommands` tell what happened over TLS and what not.
 */
import net from "node:net";
import tls from "node:tls";
import { setTimeout as sleep } from "node:timers/promises";

/** Special replies. */
export type Action =
  /** Destroy the socket now (the client sees EOF); nothing is written. */
  | { action: "close" }
  /** Reset the connection (TCP RST; the client sees ECONNRESET). */
  | { action: "reset" }
  /** Never answer this command (the session keeps reading and answers later ones). */
  | { action: "silence" }
  /** Write exactly these bytes (no CRLF added); optionally hang up afterwards. */
  | { action: "raw"; bytes: string | Buffer; thenClose?: boolean }
  /** Write these chunks as separate writes, waiting delayMs before each one. */
  | { action: "raw"; chunks: Array<string | Buffer>; delayMs?: number; thenClose?: boolean }
  /** Wait ms milliseconds, then give `reply`. */
  | { action: "delay"; ms: number; reply: Reply }
  /** Give `reply`, then read nothing more (the client's writes fill the socket buffers); hang up after closeAfterMs. */
  | { action: "stop-reading"; reply: Reply; closeAfterMs?: number };

/** A reply line without CRLF, an array of complete reply lines, or an Action. */
export type Reply = string | string[] | Action;

/** What a hook returns: a Reply, or undefined to fall through to the default. */
export type HookResult = Reply | undefined | Promise<Reply | undefined>;

export interface Message {
  /** Session.id of the session that sent it. */
  session: number;
  from: string;
  to: string[];
  /** Wire bytes after the 354 up to and including the final CRLF.CRLF (".CRLF" for an empty message). */
  raw: Buffer;
  /** Un-dot-stuffed content, ending with the CRLF of its last line, without ".CRLF". */
  data: Buffer;
  /** The message came over an encrypted connection (STARTTLS or implicit TLS). */
  tls: boolean;
}

/** One AUTH exchange as the server decoded it (the test's view; never log these). */
export interface AuthAttempt {
  /** "PLAIN", "LOGIN" or "XOAUTH2" as the client named it (upper-cased). */
  mechanism: string;
  /** Authentication identity; "" when the response could not be decoded. */
  user: string;
  /** PLAIN and LOGIN: the password given. */
  password?: string;
  /** PLAIN: the authorization identity (usually ""). */
  authzid?: string;
  /** XOAUTH2: the bearer token given. */
  token?: string;
  /** Answered 235. */
  ok: boolean;
  /** The attempt was made over TLS. */
  tls: boolean;
}

export interface Session {
  /** 1-based, in order of connection. */
  id: number;
  /** Every command line received (outside the data phase), without CRLF, in order. */
  commands: string[];
  /** Messages answered with 2xx. */
  messages: Message[];
  /** Messages received completely but not answered with 2xx (rejected, silenced, hung up on). */
  unaccepted: Message[];
  /** "C: ..." and "S: ..." lines; events in brackets, e.g. "S: [close]", "C: [end]". */
  transcript: string[];
  closed: boolean;
  /** The client ended or reset the connection before the server closed it. */
  closedByClient: boolean;
  /** Domain of the last accepted EHLO/HELO; null while the client has not been greeted back. */
  helo: string | null;
  /** The last accepted greeting command was EHLO. */
  esmtp: boolean;
  /** Extension lines advertised by the last accepted EHLO reply, e.g. "SIZE 10240000". */
  extensions: string[];
  /** Current transaction: reverse path, or null outside a transaction. */
  mailFrom: string | null;
  /** Current transaction: accepted recipients. */
  rcptTo: string[];
  /**
   * Commands the client sent more input after without waiting for their reply, where
   * that is not allowed: any command when PIPELINING was not advertised, EHLO / HELO /
   * DATA / QUIT / NOOP / VRFY / EXPN when it was (RFC 2920), "<message data>" when
   * PIPELINING was not advertised, and "<before greeting>" for talk before the greeting.
   */
  pipeliningViolations: string[];
  /** The connection is encrypted now (after a successful STARTTLS upgrade, or implicit TLS from the start). */
  tls: boolean;
  /** The commands (and SASL responses) received in plaintext, i.e. before TLS; all of them without TLS. */
  plaintextCommands: string[];
  /** Bytes the client sent after its STARTTLS line and before the TLS handshake (discarded unread). */
  plaintextAfterStartTls: Buffer;
  /** The TLS error of this connection (handshake failed, bad record), or null. */
  tlsError: string | null;
  /** Every AUTH attempt, in order, as decoded by the server. */
  authAttempts: AuthAttempt[];
  /** The identity of the successful AUTH in the current TLS state, or null. */
  authenticated: string | null;
}

export interface Script {
  /** Name in the greeting, EHLO and HELO replies. Default "scripted.test". */
  hostname?: string;
  /** Greeting reply; null: never greet, and never answer anything. Default "220 <hostname> ESMTP". */
  greeting?: Reply | null;
  /** false: do not advertise PIPELINING. Default true. */
  pipelining?: boolean;
  /** SIZE value advertised and enforced; null: no SIZE. Default 10240000. */
  size?: number | null;
  /** Extension lines appended to the default EHLO reply, e.g. ["SMTPUTF8"]. */
  extensions?: string[];
  /** Extension keywords removed from the default EHLO reply, e.g. ["8BITMIME"]. */
  withoutExtensions?: string[];
  /** Reply to EHLO (e.g. "502 5.5.2 Error: command not recognized" to force HELO). */
  ehlo?: Reply | ((domain: string, session: Session) => HookResult);
  /** Called for each MAIL FROM with a parsable path. */
  mail?: (address: string, session: Session) => HookResult;
  /** Called for each RCPT TO with a parsable path, e.g. to reject one recipient. */
  rcpt?: (address: string, session: Session) => HookResult;
  /** Called first for every command line (outside the data phase). */
  onCommand?: (command: string, session: Session) => HookResult;
  /** Called when a message's data has been received; answers the data phase. */
  onData?: (message: Message, session: Session) => HookResult;
  /**
   * Key and certificate (PEM): STARTTLS is advertised while the session is in plaintext and a
   * STARTTLS answered 220 upgrades the connection (RFC 3207: the session state is forgotten).
   */
  tls?: { key: string | Buffer; cert: string | Buffer };
  /** TLS from the first byte (SMTPS, port 465) with the key and certificate of `tls`; no STARTTLS then. */
  implicitTls?: boolean;
  /** Bytes written in the same write right after the 220 to STARTTLS, e.g. "250 injected\r\n". */
  afterStartTls220?: string;
  /** SMTP AUTH (RFC 4954): advertised mechanisms and the accounts that succeed. */
  auth?: {
    /** Advertised and accepted, e.g. ["PLAIN", "LOGIN", "XOAUTH2"]. */
    mechanisms: string[];
    /** user -> password for PLAIN and LOGIN. */
    users: Record<string, string>;
    /** user -> bearer token for XOAUTH2. */
    tokens?: Record<string, string>;
    /** Advertise and accept AUTH only over TLS (Postfix's smtpd_tls_auth_only). Default false. */
    onlyOverTls?: boolean;
    /** MAIL is refused with 530 5.7.0 until AUTH succeeded. Default false. */
    required?: boolean;
  };
}

export interface ScriptedServer {
  readonly host: string;
  readonly port: number;
  /** Read at every use: a test may replace it between connections. */
  script: Script;
  readonly sessions: Session[];
  /** All accepted messages of all sessions, in session order. */
  readonly messages: Message[];
  /** Number of connections accepted so far. */
  readonly connections: number;
  /** Errors thrown by script hooks (the connection is destroyed when one throws). */
  readonly errors: Error[];
  /** Resolves when condition() holds; rejects after timeoutMs with the transcripts. */
  waitFor(condition: () => boolean, timeoutMs?: number, what?: string): Promise<void>;
  waitForMessages(n: number, timeoutMs?: number): Promise<Message[]>;
  /** At least n sessions opened (or, with closed: true, opened and closed). */
  waitForSessions(n: number, timeoutMs?: number, options?: { closed?: boolean }): Promise<Session[]>;
  /** All transcripts, for assertion messages. */
  transcripts(): string;
  /** Stops listening and destroys every open socket; idempotent. */
  close(): Promise<void>;
}

/** Complete lines of a multi-line reply: multiline(250, ["a", "b"]) gives ["250-a", "250 b"]. */
export function multiline(code: number | string, texts: string[]): string[] {
  return texts.map((text, i) => `${code}${i === texts.length - 1 ? " " : "-"}${text}`);
}

/**
 * Starts a server on 127.0.0.1 and a free port, or where `at` says: tests of MX routing put
 * several on 127.0.0.2, 127.0.0.3, ... with the same port (all of 127/8 is loopback).
 */
export async function startScriptedServer(script: Script = {}, at: { host?: string; port?: number } = {}): Promise<ScriptedServer> {
  const server = new Scripted(script, at.host ?? "127.0.0.1");
  await server.listen(at.port ?? 0);
  return server;
}

// ---------------------------------------------------------------------------------

const DEFAULT_HOSTNAME = "scripted.test";
const DEFAULT_SIZE = 10240000;
const DEFAULT_TIMEOUT_MS = 5000;
const TERMINATOR = Buffer.from("\r\n.\r\n");
const EMPTY_MESSAGE = Buffer.from(".\r\n");
/** RFC 2920: these may only be the last command of a pipelined group. */
const LAST_IN_GROUP = new Set(["EHLO", "HELO", "DATA", "QUIT", "NOOP", "VRFY", "EXPN", "TURN", "STARTTLS", "AUTH"]);

/** What a Connection needs from its server. */
interface Host {
  readonly script: Script;
  readonly signal: AbortSignal;
  notify(): void;
  nextQueueId(): number;
  reportError(error: Error): void;
}

interface Waiter {
  check(): void;
  fail(why: string): void;
}

class Scripted implements ScriptedServer, Host {
  readonly host: string;
  port = 0;
  script: Script;
  readonly sessions: Session[] = [];
  readonly errors: Error[] = [];
  private readonly server: net.Server;
  private readonly open = new Set<Connection>();
  private readonly waiters = new Set<Waiter>();
  private readonly abort = new AbortController();
  private queueIds = 0;
  private closing: Promise<void> | null = null;

  constructor(script: Script, host: string) {
    this.script = script;
    this.host = host;
    this.server = net.createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  get messages(): Message[] {
    return this.sessions.flatMap((s) => s.messages);
  }

  get connections(): number {
    return this.sessions.length;
  }

  async listen(port: number): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(port, this.host, () => {
        this.server.off("error", reject);
        resolve();
      });
    });
    const address = this.server.address();
    if (address === null || typeof address === "string") throw new Error("scripted server: no port");
    this.port = address.port;
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const wrap = this.script.implicitTls === true && this.script.tls !== undefined;
    const connection = new Connection(wrap ? serverTlsSocket(socket, this.script.tls!) : socket, this, this.sessions.length + 1);
    if (wrap) {
      socket.on("error", () => undefined);
      connection.session.tls = true;
    }
    this.sessions.push(connection.session);
    this.open.add(connection);
    socket.once("close", () => this.open.delete(connection));
    this.notify();
    void connection.run();
  }

  notify(): void {
    for (const waiter of [...this.waiters]) waiter.check();
  }

  nextQueueId(): number {
    return ++this.queueIds;
  }

  reportError(error: Error): void {
    this.errors.push(error);
    this.notify();
  }

  waitFor(condition: () => boolean, timeoutMs = DEFAULT_TIMEOUT_MS, what = "condition"): Promise<void> {
    if (condition()) return Promise.resolve();
    if (this.closing) return Promise.reject(this.failure(what, "server closed"));
    return new Promise<void>((resolve, reject) => {
      const finish = (): void => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
      const waiter: Waiter = {
        check: () => {
          let met: boolean;
          try {
            met = condition();
          } catch (error) {
            waiter.fail(`condition threw: ${String(error)}`);
            return;
          }
          if (!met) return;
          finish();
          resolve();
        },
        fail: (why) => {
          finish();
          reject(this.failure(what, why));
        },
      };
      const timer = setTimeout(() => waiter.fail(`timed out after ${timeoutMs} ms`), timeoutMs);
      this.waiters.add(waiter);
    });
  }

  async waitForMessages(n: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Message[]> {
    await this.waitFor(() => this.messages.length >= n, timeoutMs, `waiting for ${n} message(s)`);
    return this.messages;
  }

  async waitForSessions(
    n: number,
    timeoutMs = DEFAULT_TIMEOUT_MS,
    options: { closed?: boolean } = {},
  ): Promise<Session[]> {
    const counted = (): number =>
      options.closed ? this.sessions.filter((s) => s.closed).length : this.sessions.length;
    const what = `waiting for ${n} ${options.closed ? "closed " : ""}session(s)`;
    await this.waitFor(() => counted() >= n, timeoutMs, what);
    return this.sessions;
  }

  transcripts(): string {
    if (this.sessions.length === 0) return "(no sessions)";
    return this.sessions.map(describeSession).join("\n");
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.abort.abort();
      for (const connection of this.open) connection.destroy();
      this.server.close(() => resolve());
      for (const waiter of [...this.waiters]) waiter.fail("server closed");
    });
    return this.closing;
  }

  private failure(what: string, why: string): Error {
    const messages = this.messages.length;
    return new Error(
      `scripted server: ${what}: ${why} (${this.sessions.length} session(s), ${messages} message(s))\n` +
        this.transcripts(),
    );
  }
}

function describeSession(s: Session): string {
  const state = s.closed ? (s.closedByClient ? "closed by client" : "closed by server") : "open";
  const head = `session #${s.id} (${s.messages.length} accepted, ${s.unaccepted.length} unaccepted, ${state})`;
  return [head, ...s.transcript.map((line) => `  ${line}`)].join("\n");
}

function newSession(id: number): Session {
  return {
    id,
    commands: [],
    messages: [],
    unaccepted: [],
    transcript: [],
    closed: false,
    closedByClient: false,
    helo: null,
    esmtp: false,
    extensions: [],
    mailFrom: null,
    rcptTo: [],
    pipeliningViolations: [],
    tls: false,
    plaintextCommands: [],
    plaintextAfterStartTls: Buffer.alloc(0),
    tlsError: null,
    authAttempts: [],
    authenticated: null,
  };
}

/** The server side of a TLS connection over `socket` (STARTTLS upgrade or implicit TLS). */
function serverTlsSocket(socket: net.Socket, keys: { key: string | Buffer; cert: string | Buffer }): tls.TLSSocket {
  return new tls.TLSSocket(socket, { isServer: true, key: keys.key, cert: keys.cert });
}

/** One client connection: a loop taking one command line or one message at a time. */
class Connection {
  readonly session: Session;
  private input: Buffer = Buffer.alloc(0);
  private dataPhase = false;
  private scanFrom = 0;
  private inputEnded = false;
  /** The server stopped handling this connection (closed, ended or destroyed). */
  private done = false;
  private serverClosed = false;
  private mute = false;
  private greetingSent = false;
  private wake: (() => void) | null = null;

  /** A SASL exchange waiting for the client's next response line (AUTH with a 334 challenge). */
  private sasl: { mechanism: string; step: number; user: string } | null = null;

  constructor(
    private socket: net.Socket,
    private readonly host: Host,
    id: number,
  ) {
    this.session = newSession(id);
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onInput(chunk));
    socket.on("end", () => this.onClientEnd());
    socket.on("error", (error: NodeJS.ErrnoException) => this.onSocketError(error));
    socket.on("close", () => this.onClose());
  }

  private onSocketError(error: NodeJS.ErrnoException): void {
    this.note(`C: [error ${error.code ?? error.message}]`);
    if (this.session.tls && this.session.tlsError === null) this.session.tlsError = error.message;
  }

  async run(): Promise<void> {
    try {
      await this.greet();
      while (!this.done) {
        if (await this.handleNextUnit()) continue;
        if (this.inputEnded) {
          this.end();
          break;
        }
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } catch (error) {
      const err = error instanceof Error ? error : new Error(String(error));
      this.note(`S: [script error: ${err.message}]`);
      this.host.reportError(err);
      this.destroy();
    }
  }

  destroy(): void {
    this.serverClosed = true;
    this.done = true;
    this.socket.destroy();
    this.wakeUp();
  }

  // --- input ---------------------------------------------------------------------

  private onInput(chunk: Buffer): void {
    if (!this.greetingSent) this.violation("<before greeting>");
    this.input = this.input.length === 0 ? chunk : Buffer.concat([this.input, chunk]);
    this.wakeUp();
  }

  private onClientEnd(): void {
    this.inputEnded = true;
    if (!this.serverClosed) this.session.closedByClient = true;
    this.note("C: [end]");
    this.wakeUp();
  }

  private onClose(): void {
    if (!this.serverClosed && !this.session.closedByClient) this.session.closedByClient = true;
    this.session.closed = true;
    this.done = true;
    this.wakeUp();
    this.host.notify();
  }

  private wakeUp(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  /** Handles one complete unit of input if there is one; false if more input is needed. */
  private async handleNextUnit(): Promise<boolean> {
    if (this.dataPhase) {
      const raw = this.takeMessage();
      if (raw === null) return false;
      await this.handleMessage(raw);
    } else {
      const line = this.takeLine();
      if (line === null) return false;
      await this.handleCommand(line);
    }
    return true;
  }

  /** One command line without its line ending (CRLF, or a bare LF, as Postfix accepts). */
  private takeLine(): string | null {
    const lf = this.input.indexOf(0x0a);
    if (lf === -1) return null;
    const end = lf > 0 && this.input[lf - 1] === 0x0d ? lf - 1 : lf;
    const line = this.input.toString("utf8", 0, end);
    this.input = this.input.subarray(lf + 1);
    return line;
  }

  /** The wire bytes of one message up to and including CRLF.CRLF, or null if incomplete. */
  private takeMessage(): Buffer | null {
    let end: number;
    if (this.input.length >= EMPTY_MESSAGE.length && this.input.subarray(0, 3).equals(EMPTY_MESSAGE)) {
      end = EMPTY_MESSAGE.length; // the CRLF of the DATA line starts the terminator
    } else {
      const at = this.input.indexOf(TERMINATOR, this.scanFrom);
      if (at === -1) {
        this.scanFrom = Math.max(0, this.input.length - TERMINATOR.length + 1);
        return null;
      }
      end = at + TERMINATOR.length;
    }
    const raw = Buffer.from(this.input.subarray(0, end));
    this.input = this.input.subarray(end);
    return raw;
  }

  // --- commands ------------------------------------------------------------------

  private async handleCommand(line: string): Promise<void> {
    const s = this.session;
    s.commands.push(line);
    if (!s.tls) s.plaintextCommands.push(line);
    this.note(`C: ${line}`);
    if (this.sasl) {
      // A SASL response: the client must wait for our reply to it (RFC 4954).
      if (!this.mute && this.input.length > 0) this.violation("<sasl response>");
      if (this.mute) return;
      await this.respond(this.saslStep(line));
      this.host.notify();
      return;
    }
    const verb = verbOf(line);
    this.checkPipelining(verb, line);
    if (this.mute) return;
    let reply = await this.chooseReply(line, verb);
    const inject = this.host.script.afterStartTls220;
    if (verb === "STARTTLS" && inject !== undefined && typeof reply === "string" && replyCode(reply) === 220) {
      reply = { action: "raw", bytes: `${reply}\r\n${inject}` };
    }
    const sent = await this.respond(reply);
    if (sent !== null) this.apply(verb, argOf(line), replyCode(sent), sent);
    this.host.notify();
  }

  private async chooseReply(line: string, verb: string): Promise<Reply> {
    const script = this.host.script;
    const s = this.session;
    const arg = argOf(line);
    const hooked = await script.onCommand?.(line, s);
    if (hooked !== undefined) return hooked;
    if (verb === "EHLO" && script.ehlo !== undefined) {
      const reply = typeof script.ehlo === "function" ? await script.ehlo(arg, s) : script.ehlo;
      if (reply !== undefined) return reply;
    }
    if (verb === "AUTH" && script.auth) return this.authCommand(arg);
    if (verb === "MAIL" || verb === "RCPT") {
      const hook = verb === "MAIL" ? script.mail : script.rcpt;
      const path = parsePath(arg, verb === "MAIL" ? "FROM" : "TO");
      const reply = path && hook ? await hook(path.address, s) : undefined;
      if (reply !== undefined) return reply;
    }
    return this.defaultReply(verb, arg);
  }

  private defaultReply(verb: string, arg: string): Reply {
    const script = this.host.script;
    const s = this.session;
    const hostname = script.hostname ?? DEFAULT_HOSTNAME;
    switch (verb) {
      case "EHLO":
        return arg ? multiline(250, [hostname, ...advertisedExtensions(script, s)]) : "501 5.5.4 Syntax: EHLO hostname";
      case "HELO":
        return arg ? `250 ${hostname}` : "501 5.5.4 Syntax: HELO hostname";
      case "MAIL": {
        if (s.helo === null) return "503 5.5.1 Error: send HELO/EHLO first";
        if (s.mailFrom !== null) return "503 5.5.1 Error: nested MAIL command";
        if (script.auth?.required && s.authenticated === null) return "530 5.7.0 Authentication required";
        const path = parsePath(arg, "FROM");
        if (!path) return "501 5.5.4 Syntax: MAIL FROM:<address>";
        const limit = sizeLimit(script);
        const declared = Number(/(?:^|\s)SIZE=(\d+)/i.exec(path.params)?.[1] ?? 0);
        if (limit !== null && declared > limit) return "552 5.3.4 Message size exceeds fixed limit";
        return "250 2.1.0 Ok";
      }
      case "RCPT":
        if (s.mailFrom === null) return "503 5.5.1 Error: need MAIL command";
        return parsePath(arg, "TO") ? "250 2.1.5 Ok" : "501 5.5.4 Syntax: RCPT TO:<address>";
      case "DATA":
        if (s.mailFrom === null) return "503 5.5.1 Error: need MAIL command";
        if (s.rcptTo.length === 0) return "554 5.5.1 Error: no valid recipients";
        return "354 End data with <CR><LF>.<CR><LF>";
      case "RSET":
      case "NOOP":
        return "250 2.0.0 Ok";
      case "QUIT":
        return "221 2.0.0 Bye";
      case "STARTTLS":
        if (!script.tls || script.implicitTls) return "502 5.5.2 Error: command not recognized";
        if (s.tls) return "554 5.5.1 Error: TLS already active";
        if (arg) return "501 5.5.4 Syntax: STARTTLS";
        return "220 2.0.0 Ready to start TLS";
      case "":
        return "500 5.5.2 Error: bad syntax";
      default:
        return "502 5.5.2 Error: command not recognized";
    }
  }

  /** Moves the session along according to the reply that was actually sent. */
  private apply(verb: string, arg: string, code: number | null, sent: string): void {
    if (code === null) return;
    const s = this.session;
    const ok = code >= 200 && code < 300;
    switch (verb) {
      case "EHLO":
      case "HELO":
        if (!ok) return;
        s.helo = arg;
        s.esmtp = verb === "EHLO";
        s.extensions = verb === "EHLO" ? extensionsIn(sent) : [];
        this.resetTransaction();
        return;
      case "MAIL":
        if (ok) {
          s.mailFrom = parsePath(arg, "FROM")?.address ?? arg;
          s.rcptTo = [];
        }
        return;
      case "RCPT":
        if (ok) s.rcptTo.push(parsePath(arg, "TO")?.address ?? arg);
        return;
      case "DATA":
        if (code >= 300 && code < 400) {
          this.dataPhase = true;
          this.scanFrom = 0;
        }
        return;
      case "RSET":
        if (ok) this.resetTransaction();
        return;
      case "QUIT":
        if (ok) this.end();
        return;
      case "STARTTLS":
        if (code === 220) this.startTls();
        return;
    }
  }

  /** RFC 3207: the upgrade; everything learned in plaintext is forgotten. */
  private startTls(): void {
    const keys = this.host.script.tls;
    const s = this.session;
    if (!keys || s.tls || this.done) return;
    if (this.input.length > 0) {
      // Sent by the client after STARTTLS in plaintext: never read as commands (the injection class).
      s.plaintextAfterStartTls = Buffer.concat([s.plaintextAfterStartTls, this.input]);
      this.note(`C: [${this.input.length} plaintext bytes after STARTTLS, discarded: ${JSON.stringify(this.input.toString("latin1"))}]`);
      this.input = Buffer.alloc(0);
    }
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("end");
    const secure = serverTlsSocket(raw, keys);
    this.socket = secure;
    secure.on("data", (chunk: Buffer) => this.onInput(chunk));
    secure.on("end", () => this.onClientEnd());
    secure.on("error", (error: NodeJS.ErrnoException) => this.onSocketError(error));
    secure.on("close", () => this.onClose());
    secure.once("secure", () => {
      this.note(`S: [TLS established, ${secure.getProtocol() ?? "?"}]`);
      this.host.notify();
    });
    s.tls = true;
    s.helo = null;
    s.esmtp = false;
    s.extensions = [];
    s.authenticated = null;
    this.sasl = null;
    this.resetTransaction();
    this.note("S: [TLS handshake]");
  }

  /* AUTH (RFC 4954): PLAIN, LOGIN, XOAUTH2 */

  private authCommand(arg: string): Reply {
    const auth = this.host.script.auth!;
    const s = this.session;
    if (s.helo === null || !s.esmtp) return "503 5.5.1 Error: send EHLO first";
    if (s.authenticated !== null) return "503 5.5.1 Error: already authenticated";
    if (s.mailFrom !== null) return "503 5.5.1 Error: MAIL transaction in progress";
    if (auth.onlyOverTls && !s.tls) return "538 5.7.11 Encryption required for requested authentication mechanism";
    const [name = "", initial, extra] = arg.split(/\s+/);
    const mechanism = name.toUpperCase();
    if (extra !== undefined) return "501 5.5.4 Syntax: AUTH mechanism [initial-response]";
    if (!auth.mechanisms.map((m) => m.toUpperCase()).includes(mechanism)) return "504 5.5.4 Unsupported authentication mechanism";
    this.sasl = { mechanism, step: 0, user: "" };
    if (initial !== undefined) return this.saslStep(initial);
    return mechanism === "LOGIN" ? `334 ${b64("Username:")}` : "334 ";
  }

  /** One client response of the SASL exchange in progress; answers 334, 235 or 535 (or 501). */
  private saslStep(response: string): Reply {
    const sasl = this.sasl!;
    const s = this.session;
    const auth = this.host.script.auth!;
    if (response === "*") {
      this.sasl = null;
      if (sasl.step === 99) return "535 5.7.8 Error: authentication failed";
      return "501 5.7.0 Authentication aborted";
    }
    if (sasl.step === 99) {
      // After an XOAUTH2 error challenge the client answers anything (an empty line): the failure.
      this.sasl = null;
      return "535 5.7.8 Error: authentication failed";
    }
    if (response !== "=" && !/^[A-Za-z0-9+/]*={0,2}$/.test(response)) {
      this.sasl = null;
      return "501 5.5.2 Error: cannot decode response";
    }
    const decoded = response === "=" ? "" : Buffer.from(response, "base64").toString("utf8");
    const finish = (attempt: Omit<AuthAttempt, "ok" | "tls">, ok: boolean): Reply => {
      s.authAttempts.push({ ...attempt, ok, tls: s.tls });
      this.sasl = null;
      if (!ok) return "535 5.7.8 Error: authentication failed";
      s.authenticated = attempt.user;
      return "235 2.7.0 Authentication successful";
    };
    switch (sasl.mechanism) {
      case "PLAIN": {
        const parts = decoded.split("\0");
        if (parts.length !== 3) return finish({ mechanism: "PLAIN", user: "" }, false);
        const [authzid, user, password] = parts;
        return finish({ mechanism: "PLAIN", user, password, authzid }, Object.hasOwn(auth.users, user) && auth.users[user] === password);
      }
      case "LOGIN":
        if (sasl.step === 0) {
          sasl.user = decoded;
          sasl.step = 1;
          return `334 ${b64("Password:")}`;
        }
        return finish({ mechanism: "LOGIN", user: sasl.user, password: decoded },
          Object.hasOwn(auth.users, sasl.user) && auth.users[sasl.user] === decoded);
      case "XOAUTH2": {
        const m = /^user=([^\x01]*)\x01auth=Bearer ([^\x01]*)\x01\x01$/.exec(decoded);
        const user = m?.[1] ?? "";
        const token = m?.[2];
        const ok = m !== null && auth.tokens !== undefined && Object.hasOwn(auth.tokens, user) && auth.tokens[user] === token;
        if (ok) return finish({ mechanism: "XOAUTH2", user, token }, true);
        s.authAttempts.push({ mechanism: "XOAUTH2", user, token, ok: false, tls: s.tls });
        sasl.step = 99;
        return `334 ${b64('{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}')}`;
      }
      default:
        this.sasl = null;
        return "504 5.5.4 Unsupported authentication mechanism";
    }
  }

  private resetTransaction(): void {
    this.session.mailFrom = null;
    this.session.rcptTo = [];
  }

  /** Records `what` if the client sent more input before getting the reply to it. */
  private checkPipelining(verb: string, what: string): void {
    if (this.mute || this.input.length === 0) return;
    const advertised = this.session.extensions.some((e) => keywordOf(e) === "PIPELINING");
    if (!advertised || LAST_IN_GROUP.has(verb)) this.violation(what);
  }

  private violation(what: string): void {
    const list = this.session.pipeliningViolations;
    if (what === "<before greeting>" && list.includes(what)) return;
    list.push(what);
  }

  // --- messages ------------------------------------------------------------------

  private async handleMessage(raw: Buffer): Promise<void> {
    const s = this.session;
    this.dataPhase = false;
    const message: Message = {
      session: s.id,
      from: s.mailFrom ?? "",
      to: [...s.rcptTo],
      raw,
      data: unstuff(raw.subarray(0, raw.length - EMPTY_MESSAGE.length)),
      tls: s.tls,
    };
    this.note(`C: [message data, ${raw.length} bytes]`);
    this.checkPipelining("", "<message data>");
    const reply = (await this.host.script.onData?.(message, s)) ?? this.defaultDataReply(message);
    const sent = await this.respond(reply);
    const code = sent === null ? null : replyCode(sent);
    if (code !== null && code >= 200 && code < 300) s.messages.push(message);
    else s.unaccepted.push(message);
    this.resetTransaction();
    this.host.notify();
  }

  private defaultDataReply(message: Message): Reply {
    const limit = sizeLimit(this.host.script);
    if (limit !== null && message.data.length > limit) return "552 5.3.4 Error: message file too big";
    return `250 2.0.0 Ok: queued as ${this.host.nextQueueId()}`;
  }

  // --- replies -------------------------------------------------------------------

  private async greet(): Promise<void> {
    const script = this.host.script;
    const greeting =
      script.greeting === undefined ? `220 ${script.hostname ?? DEFAULT_HOSTNAME} ESMTP` : script.greeting;
    if (greeting === null) {
      this.note("S: [no greeting]");
      this.mute = true;
      return;
    }
    const sent = await this.respond(greeting);
    if (sent === null) this.mute = true; // a silenced greeting: the server never speaks
    this.greetingSent = true;
  }

  /** Carries out a reply; returns the text sent (latin1 for raw bytes), or null if nothing was. */
  private async respond(reply: Reply): Promise<string | null> {
    if (this.done) return null;
    let sent: string | null;
    if (typeof reply === "string" || Array.isArray(reply)) {
      const lines = typeof reply === "string" ? reply.replace(/\r\n$/, "").split("\r\n") : reply;
      for (const line of lines) this.note(`S: ${line}`);
      sent = lines.map((line) => `${line}\r\n`).join("");
      await this.write(sent);
    } else {
      sent = await this.perform(reply);
    }
    if (sent !== null && replyCode(sent) === 421) this.end();
    return sent;
  }

  private async perform(action: Action): Promise<string | null> {
    switch (action.action) {
      case "close":
        this.note("S: [close]");
        this.destroy();
        return null;
      case "reset":
        this.note("S: [reset]");
        this.serverClosed = true;
        this.done = true;
        this.socket.resetAndDestroy();
        this.wakeUp();
        return null;
      case "silence":
        this.note("S: [no reply]");
        return null;
      case "delay":
        await this.pause(action.ms);
        return this.respond(action.reply);
      case "stop-reading": {
        const sent = await this.respond(action.reply);
        this.note("S: [stops reading]");
        this.socket.pause();
        this.socket.removeAllListeners("data");
        if (action.closeAfterMs !== undefined) {
          void this.pause(action.closeAfterMs).then(() => {
            this.note("S: [close]");
            this.destroy();
          });
        }
        return sent;
      }
      case "raw": {
        const chunks = "chunks" in action ? action.chunks : [action.bytes];
        const delayMs = "chunks" in action ? (action.delayMs ?? 0) : 0;
        const all = Buffer.concat(chunks.map((c) => Buffer.from(c)));
        const writes = chunks.length > 1 ? ` in ${chunks.length} writes` : "";
        this.note(`S: [raw ${JSON.stringify(all.toString("latin1"))}${writes}]`);
        for (const chunk of chunks) {
          if (delayMs > 0) await this.pause(delayMs);
          if (this.done) return null;
          await this.write(chunk);
        }
        if (action.thenClose) {
          this.note("S: [close]");
          this.destroy();
          return null;
        }
        return all.toString("latin1");
      }
    }
  }

  private write(data: string | Buffer): Promise<void> {
    return new Promise<void>((resolve) => {
      if (this.done || !this.socket.writable) return resolve();
      this.socket.write(data, () => resolve());
    });
  }

  private async pause(ms: number): Promise<void> {
    await sleep(ms, undefined, { signal: this.host.signal }).catch(() => undefined);
  }

  /** Graceful close: FIN after what was written. */
  private end(): void {
    if (this.done) return;
    this.note("S: [end]");
    this.serverClosed = true;
    this.done = true;
    this.socket.end();
    this.wakeUp();
  }

  private note(line: string): void {
    this.session.transcript.push(line);
  }
}

// --- small pure helpers ------------------------------------------------------------

function b64(text: string): string {
  return Buffer.from(text, "utf8").toString("base64");
}

function verbOf(line: string): string {
  return (/^\S*/.exec(line)?.[0] ?? "").toUpperCase();
}

function argOf(line: string): string {
  return line.replace(/^\S*\s*/, "").trim();
}

/** "FROM:<a@b> SIZE=12" gives { address: "a@b", params: "SIZE=12" }; also accepts no brackets. */
function parsePath(arg: string, keyword: "FROM" | "TO"): { address: string; params: string } | null {
  const match = new RegExp(`^${keyword}:\\s*(?:<([^>]*)>|([^\\s<>]+))(.*)$`, "i").exec(arg);
  if (!match) return null;
  return { address: match[1] ?? match[2] ?? "", params: (match[3] ?? "").trim() };
}

function replyCode(text: string): number | null {
  const match = /^([2-5]\d\d)/.exec(text);
  return match ? Number(match[1]) : null;
}

function keywordOf(extension: string): string {
  return (extension.split(" ")[0] ?? "").toUpperCase();
}

/** Extension lines of a multi-line EHLO reply: every line after the first, code removed. */
function extensionsIn(reply: string): string[] {
  return reply
    .split("\r\n")
    .filter((line) => line.length > 0)
    .slice(1)
    .map((line) => line.slice(4));
}

function sizeLimit(script: Script): number | null {
  const size = script.size === undefined ? DEFAULT_SIZE : script.size;
  return size !== null && size > 0 ? size : null;
}

function advertisedExtensions(script: Script, session: Session): string[] {
  const list: string[] = [];
  if (script.pipelining !== false) list.push("PIPELINING");
  const size = script.size === undefined ? DEFAULT_SIZE : script.size;
  if (size !== null) list.push(`SIZE ${size}`);
  if (script.tls && !script.implicitTls && !session.tls) list.push("STARTTLS");
  if (script.auth && (!script.auth.onlyOverTls || session.tls)) list.push(`AUTH ${script.auth.mechanisms.join(" ")}`);
  list.push("8BITMIME", "ENHANCEDSTATUSCODES", ...(script.extensions ?? []));
  const removed = new Set((script.withoutExtensions ?? []).map((k) => k.toUpperCase()));
  return list.filter((e) => !removed.has(keywordOf(e)));
}

/** Removes the dot added to every line that starts with one (RFC 5321 4.5.2); lines end in CRLF. */
function unstuff(body: Buffer): Buffer {
  const parts: Buffer[] = [];
  let start = 0;
  while (start < body.length) {
    const crlf = body.indexOf("\r\n", start);
    const end = crlf === -1 ? body.length : crlf + 2;
    const skip = body[start] === 0x2e ? 1 : 0;
    parts.push(body.subarray(start + skip, end));
    start = end;
  }
  return Buffer.concat(parts);
}
