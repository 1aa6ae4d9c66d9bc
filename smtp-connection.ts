/*
 * NAME
 *   smtp-connection.ts - one SMTP connection: socket, replies, stage timer, TLS, AUTH
 *
 * SYNOPSIS
 *   const conn = new SmtpConnection({ host, address, port, helo, tls, timeouts }, (err, reply) => failed(err));
 *   conn.open((greeting) => conn.hello((hello) => conn.send("MAIL FROM:<a@b>\r\n", STEPS.mail, onMail)));
 *   conn.command(pipelinedLines); conn.expect(STEPS.rcpt, onRcpt); conn.writeBody(chunks, done);
 *   conn.quit(waitForReply); conn.close();
 *
 * DESCRIPTION
 *   What the engine's Slot and the direct client's SmtpSession both stand on: the bytes,
 *   the replies, the timers and the TLS of one conversation, never what it is for. Commands
 *   go out as given; each expected reply is registered with the Step it belongs to (its
 *   timeout, its label for errors, the command it answers) and a handler. Replies are matched
 *   to expectations in order, whatever the packet boundaries, and the timer of the Step at
 *   the head of the queue bounds the wait. Connecting, the greeting, EHLO with HELO when EHLO
 *   is refused, STARTTLS as the TLS mode asks (everything learned before it is forgotten, and
 *   bytes sent behind the 220 are dropped unread, RFC 3207), the TLS handshake under the
 *   helo timer, AUTH (XOAUTH2, PLAIN, LOGIN) and the body's back-pressure live here once.
 *   Under an MX host's TLS policy (MTA-STS, DANE: `peer`), the certificate is checked after
 *   the handshake by tls-policy.ts's checkPeer(); the session's TLS outcome (a missing
 *   STARTTLS, a failed handshake, a certificate the policy refuses, or success) is told once
 *   to `peer.onResult`, and a refusal the policy enforces ends the session (ETLS).
 *   Every line of the conversation but message bodies can be watched through onLine, with
 *   AUTH redacted.
 *
 * DIAGNOSTICS
 *   Replies, even a refusal, go to their handler: 600 (garbage) and the rest included. What
 *   ends the conversation goes to the failure callback, once, as a MailError naming the host
 *   and the step: ECONNECTION (connect failed, connection lost; `reply` keeps a reply cut
 *   short as 621), ETIMEDOUT, ETLS (the handshake failed or stalled), EPROTOCOL (a reply
 *   nobody asked for, a reply that came before its command, a positive code the command
 *   cannot have). After it the socket is gone and nothing more is written.
 */

import * as net from "node:net";
import * as tls from "node:tls";
import {
  ReplyParser, STAGE_TIMEOUTS, MailError, classify, expectedReply, makeReply, parseEhlo, printable, replyText,
  type Extensions, type Reply,
} from "./smtp-codes.js";
import { checkPeer, type PeerPolicy, type TlsResult } from "./tls-policy.js";

export type TlsMode = "none" | "may" | "encrypt" | "verify";
export type TimeoutName = keyof typeof STAGE_TIMEOUTS;

/** A step of the conversation: which timeout bounds it, how errors name it, which command it answers. */
export interface Step {
  readonly timeout: TimeoutName;
  /** Postfix's words for it: "timed out while sending MAIL FROM". */
  readonly label: string;
  /** The command of the seed's command/reply table whose replies it waits for. */
  readonly command: string;
  /** "in reply to RCPT TO command", Postfix's phrase for whose reply it was. */
  readonly inReplyTo: string;
}

const step = (timeout: TimeoutName, label: string, command: string, inReplyTo = `in reply to ${command} command`): Step =>
  ({ timeout, label, command, inReplyTo });

/** The steps of a conversation, as Postfix's smtp_proto.c names them. */
export const STEPS = {
  connect: step("connect", "connecting", "CONNECT", "while connecting"),
  greeting: step("helo", "receiving the initial server greeting", "CONNECT", "in reply to the initial greeting"),
  ehlo: step("helo", "performing the EHLO handshake", "EHLO"),
  helo: step("helo", "performing the HELO handshake", "HELO"),
  starttls: step("helo", "performing the EHLO handshake", "STARTTLS"),
  tlsHandshake: step("helo", "performing the TLS handshake", "STARTTLS"),
  auth: step("helo", "performing the SASL authentication", "AUTH"),
  mail: step("mail", "sending MAIL FROM", "MAIL", "in reply to MAIL FROM command"),
  rcpt: step("rcpt", "sending RCPT TO", "RCPT", "in reply to RCPT TO command"),
  data: step("dataInit", "sending DATA command", "DATA"),
  body: step("dataXfer", "sending message body", "DATA"),
  dot: step("dataDone", "sending end of data -- message may be sent more than once", "DOT", "in reply to end of DATA command"),
  rset: step("rset", "sending RSET", "RSET"),
  quit: step("quit", "sending QUIT", "QUIT"),
} as const;

/** A step for any other command (VRFY, EXPN, HELP, NOOP, ...): the helo timeout bounds it. */
export function otherStep(command: string): Step {
  return step("helo", `waiting for the reply to ${command}`, command);
}

export interface ConnectionOptions {
  /** The server's name: TLS's server name and certificate check, and error messages. */
  host: string;
  /** Where to connect (an IP address, or the host name again). */
  address: string;
  port: number;
  /** The name sent in EHLO and HELO. */
  helo: string;
  /** The TLS policy of this connection: none, may (STARTTLS when offered), encrypt, verify. */
  tls: TlsMode;
  /** TLS from the first byte (SMTPS). */
  tlsWrapper?: boolean;
  /** An extra CA (PEM text) for "verify". */
  ca?: string | null;
  /** Seconds per timeout; Postfix's defaults for those not given. */
  timeouts?: Partial<Record<TimeoutName, number>>;
  /** The MX host's TLS policy (MTA-STS, DANE), and who hears how the session's TLS went. */
  peer?: { policy: PeerPolicy; onResult: (result: TlsResult, localAddress: string | null) => void } | null;
  /** Every command and reply line as it passes (">" out, "<" in), AUTH redacted, never a body. */
  onLine?: (direction: ">" | "<", line: string) => void;
}

/** What AUTH needs; never logged, never put in an error. */
export interface Credentials {
  user: string;
  password: string;
  /** An OAuth 2.0 bearer token: XOAUTH2 instead of PLAIN or LOGIN. */
  token: string | null;
}

/** The end of hello(): the last reply, what the server offers, and why TLS policy forbids going on. */
export interface Hello {
  reply: Reply;
  /** The extensions of the last EHLO; none after HELO; null when the greeting was refused. */
  ext: Extensions | null;
  /** The session went on with HELO (the server refused EHLO). */
  helo: boolean;
  /** Set when the TLS mode requires TLS and the server did not give it. */
  tlsProblem: string | null;
}

/** node:tls options for a mode: "verify" checks the chain and the name, the others encrypt only. */
export function tlsConnectionOptions(host: string, mode: TlsMode, ca?: string | null): tls.ConnectionOptions {
  return {
    host,
    ...(net.isIP(host) ? {} : { servername: host }),
    rejectUnauthorized: mode === "verify",
    ...(ca ? { ca: [...tls.rootCertificates, ca] } : {}),
  };
}

/**
 * Postfix's one line per TLS session (tls_client.c, smtp_tls_loglevel 1): "<trust> TLS
 * connection established to host[ip]:port: <protocol> with cipher <name> (<used>/<alg> bits)".
 * Trust: Anonymous (no certificate), Verified (the name or DANE/MTA-STS policy was checked and
 * matched), Trusted (the chain is trusted, the name not checked), Untrusted.
 */
export function tlsSummary(socket: tls.TLSSocket, relay: string, matched: boolean): string {
  const cert = socket.getPeerCertificate();
  const trust = !cert || Object.keys(cert).length === 0 ? "Anonymous" : matched ? "Verified" : socket.authorized ? "Trusted" : "Untrusted";
  const cipher = socket.getCipher()?.name ?? "unknown";
  const [used, alg] = /3DES|DES-CBC3/.test(cipher) ? [112, 168] : /CHACHA20|(?:AES|CAMELLIA|ARIA)[_-]?256/.test(cipher) ? [256, 256]
    : /(?:AES|CAMELLIA|ARIA)[_-]?128/.test(cipher) ? [128, 128] : [0, 0];
  return `${trust} TLS connection established to ${relay}: ${socket.getProtocol() ?? "unknown"} with cipher ${cipher} (${used}/${alg} bits)`;
}

const NO_EXTENSIONS = (): Extensions => parseEhlo(makeReply(250, [""]));

interface Expectation {
  step: Step;
  onReply: (reply: Reply) => void;
  /** The read after which it was asked for: a reply in that read or before cannot answer it. */
  after: number;
}

export class SmtpConnection {
  /** host[address], for messages and log lines. */
  readonly peer: string;
  /** host[address]:port, the log line's relay=. */
  readonly relay: string;
  /** The conversation is encrypted (STARTTLS done, or implicit TLS). */
  secure = false;
  /** Postfix's summary of the TLS session once its handshake is done (tlsSummary()); null in plaintext. */
  tlsLine: string | null = null;
  /** What the server offered in its last EHLO; null before it (and forgotten at STARTTLS). */
  ext: Extensions | null = null;
  #socket: net.Socket | null = null;
  #parser = new ReplyParser();
  readonly #expects: Expectation[] = [];
  #reads = 0;
  #timer: NodeJS.Timeout | null = null;
  #timerMs = 0;
  /** The step the timer bounds now: the head expectation's, or the body being written. */
  #current: Step = STEPS.connect;
  #handshaking = false;
  #quitting = false;
  #quitDone: (() => void) | null = null;
  #connected = false;
  #ended = false;
  readonly #options: ConnectionOptions;
  readonly #onFailure: (err: MailError, reply: Reply | null) => void;

  /** `onFailure` hears, once, why the conversation ended, with the reply a drop cut short (621) or a bad reply. */
  constructor(options: ConnectionOptions, onFailure: (err: MailError, reply: Reply | null) => void) {
    this.#options = options;
    this.#onFailure = onFailure;
    this.peer = `${options.host}[${options.address}]`;
    this.relay = `${this.peer}:${options.port}`;
  }

  /** The connection is over (failed, closed or quit): nothing more is written. */
  get ended(): boolean {
    return this.#ended;
  }

  /** The TCP connection (and implicit TLS) was made. */
  get connected(): boolean {
    return this.#connected;
  }

  /** Replies are awaited. */
  get awaiting(): boolean {
    return this.#expects.length > 0;
  }

  /** Connects (implicit TLS included) under the connect timer, then waits for the greeting. */
  open(onGreeting: (reply: Reply) => void): void {
    const { address, port } = this.#options;
    const wrapped = Boolean(this.#options.tlsWrapper);
    const socket = wrapped
      ? tls.connect({ port, ...tlsConnectionOptions(this.#options.host, this.#options.tls === "verify" ? "verify" : "encrypt", this.#options.ca), host: address })
      : net.connect({ host: address, port });
    this.#socket = socket;
    this.secure = wrapped;
    this.#arm(STEPS.connect);
    socket.once("error", (err: NodeJS.ErrnoException) => {
      const handshake = wrapped && err.code !== "ECONNREFUSED" && !err.syscall;
      this.#fail(`connect to ${this.relay}: ${handshake ? `TLS handshake failed: ${err.message}` : describeSocketError(err)}`, handshake ? "ETLS" : "ECONNECTION");
    });
    socket.once(wrapped ? "secureConnect" : "connect", () => {
      if (this.#ended) return;
      this.#connected = true;
      if (wrapped) this.tlsLine = tlsSummary(socket as tls.TLSSocket, this.relay, this.#options.tls === "verify");
      socket.removeAllListeners("error");
      this.#listen(socket);
      this.expect(STEPS.greeting, onGreeting);
    });
  }

  /** Writes a command and waits for its reply. */
  send(line: string, step: Step, onReply: (reply: Reply) => void, secret = false): void {
    this.command(line, secret);
    this.expect(step, onReply);
  }

  /** Writes command lines (several, pipelined, at once); a secret one shows as "<redacted>". */
  command(text: string, secret = false): void {
    if (this.#ended) return;
    const onLine = this.#options.onLine;
    if (onLine) {
      for (const line of text.split("\r\n")) {
        if (line !== "") onLine(">", /^AUTH\b/i.test(line) ? "AUTH <redacted>" : secret ? "<redacted>" : line);
      }
    }
    this.#socket!.write(text);
  }

  /** Waits for one more reply, after those already awaited. */
  expect(step: Step, onReply: (reply: Reply) => void): void {
    if (this.#ended) return;
    this.#expects.push({ step, onReply, after: this.#reads });
    if (this.#expects.length === 1 && this.#current !== STEPS.body) this.#arm(step);
  }

  /** Message bytes, as they are (the caller stuffed them). */
  write(bytes: Buffer): void {
    if (!this.#ended) this.#socket!.write(bytes);
  }

  /** What is written until uncork() leaves in one packet (body, dot and next envelope). */
  cork(): void {
    this.#socket?.cork();
  }

  uncork(): void {
    this.#socket?.uncork();
  }

  /**
   * Writes a body piece by piece: each is handed to the kernel before the next is asked for
   * (a chunk may be a view of a reused buffer), under the data-xfer timer. The reply to the
   * body's end must be expected before this is called: the last piece carries the dot, and
   * the server may answer it before the next piece is asked for. Resolves true when all went
   * out, false when the connection ended first (the failure says why).
   */
  async writeBody(chunks: AsyncIterable<Buffer> | Iterable<Buffer>): Promise<boolean> {
    const socket = this.#socket!;
    for await (const chunk of chunks) {
      if (this.#ended) return false;
      this.#arm(STEPS.body);
      await new Promise<void>((resolve) => {
        const done = () => { socket.off("close", done); resolve(); };
        socket.once("close", done);
        socket.write(chunk, done);
      });
    }
    // Written: now the wait is for the reply (unless it came already).
    const head = this.#expects[0];
    if (head && !this.#ended) this.#arm(head.step);
    return !this.#ended;
  }

  /**
   * EHLO (HELO when EHLO is refused with 5xx), then STARTTLS as the TLS mode asks, the
   * handshake, and EHLO again over TLS. Ends with the last reply and what the server offers;
   * `tlsProblem` says why the mode forbids going on in plaintext.
   */
  hello(done: (hello: Hello) => void, name = this.#options.helo): void {
    this.send(`EHLO ${name}\r\n`, STEPS.ehlo, (reply) => {
      if (classify(reply) === "permanent") {
        return this.send(`HELO ${name}\r\n`, STEPS.helo, (heloReply) => {
          this.ext = classify(heloReply) === "ok" ? NO_EXTENSIONS() : null;
          done({ reply: heloReply, ext: this.ext, helo: true, tlsProblem: this.#tlsProblem() });
        });
      }
      if (classify(reply) !== "ok" || reply.code >= 600) return done({ reply, ext: null, helo: false, tlsProblem: null });
      this.ext = parseEhlo(reply);
      const mode = this.#options.tls;
      if (!this.secure && mode !== "none" && !this.ext.startTls) this.#peerResult({ ok: false, type: "starttls-not-supported", reason: `host ${this.peer} did not offer STARTTLS` });
      if (this.secure || mode === "none" || !this.ext.startTls) return done({ reply, ext: this.ext, helo: false, tlsProblem: this.#tlsProblem() });
      this.send("STARTTLS\r\n", STEPS.starttls, (answer) => {
        if (answer.code === 220) return this.#startTls(() => this.hello(done, name));
        this.#peerResult({ ok: false, type: "starttls-not-supported", reason: `host ${this.peer} refused STARTTLS: ${printable(replyText(answer))}` });
        if (mode === "may") {
          this.ext!.startTls = false;
          return done({ reply, ext: this.ext, helo: false, tlsProblem: null });
        }
        done({ reply: answer, ext: this.ext, helo: false, tlsProblem: `TLS is required, but host ${this.peer} refused to start TLS: ${printable(replyText(answer))}` });
      });
    });
  }

  /** Without TLS where the mode requires it: why the session must not go on. */
  #tlsProblem(): string | null {
    if (this.secure || this.#options.tls === "none" || this.#options.tls === "may") return null;
    const by = this.#options.peer?.policy.requireTls ? ` by ${this.#options.peer.policy.by}` : "";
    return `TLS is required${by}, but was not offered by host ${this.peer}`;
  }

  #peerReported = false;

  /** The session's TLS outcome under its policy, told once. */
  #peerResult(result: TlsResult): void {
    if (this.#peerReported || !this.#options.peer) return;
    this.#peerReported = true;
    this.#options.peer.onResult(result, this.#socket?.localAddress ?? null);
  }

  /** Upgrades the connection in place; everything learned before it is forgotten (RFC 3207). */
  #startTls(then: () => void): void {
    const raw = this.#socket!;
    raw.removeAllListeners("data");
    raw.removeAllListeners("error");
    raw.removeAllListeners("close");
    raw.on("error", () => undefined);
    this.#parser = new ReplyParser();
    this.ext = null;
    this.#handshaking = true;
    this.#arm(STEPS.tlsHandshake);
    const { host, tls: mode, ca } = this.#options;
    const secure = tls.connect({ socket: raw, ...tlsConnectionOptions(host, mode, ca) });
    const failed = (err: Error) => this.#fail(`TLS handshake with ${this.peer} failed: ${err.message}`, "ETLS");
    secure.once("error", failed);
    secure.once("secureConnect", () => {
      if (this.#ended) return;
      this.#handshaking = false;
      secure.off("error", failed);
      this.#socket = secure;
      this.secure = true;
      this.#listen(secure);
      const peer = this.#options.peer;
      let matched = mode === "verify";
      if (peer) {
        const result = checkPeer(secure, peer.policy);
        this.#peerResult(result);
        if (!result.ok && peer.policy.enforce) return this.#fail(`${result.reason}; TLS is required to be verified by ${peer.policy.by}`, "ETLS");
        matched ||= result.ok && peer.policy.kind !== "none";
      }
      this.tlsLine = tlsSummary(secure, this.relay, matched);
      then();
    });
  }

  /**
   * AUTH (RFC 4954): XOAUTH2 when a token is given, else PLAIN, else LOGIN, and only over TLS
   * unless the TLS mode is "none". Ends with the server's last reply, or with the problem
   * that kept us from asking.
   */
  authenticate(credentials: Credentials, done: (result: { reply: Reply | null; problem: string | null }) => void): void {
    const offered = this.ext?.auth ?? [];
    if (!this.secure && this.#options.tls !== "none") {
      return done({ reply: null, problem: `SASL authentication with ${this.peer} refused: the connection is not encrypted (use --tls none to allow it)` });
    }
    const mechanism = (credentials.token ? ["XOAUTH2"] : []).concat(["PLAIN", "LOGIN"]).find((m) => offered.includes(m));
    if (!mechanism) {
      return done({ reply: null, problem: `SASL authentication failed; server ${this.peer} offered no supported authentication mechanisms (offered: ${offered.join(" ") || "none"})` });
    }
    const b64 = (text: string) => Buffer.from(text, "utf8").toString("base64");
    const answers = mechanism === "LOGIN" ? [credentials.user, credentials.password] : [];
    const step = (reply: Reply): void => {
      if (reply.code !== 334) return done({ reply, problem: null });
      const next = answers.shift();
      // An XOAUTH2 error challenge (or a server that wants more than we have): end the exchange.
      if (next === undefined) return this.send("*\r\n", STEPS.auth, (last) => done({ reply: last, problem: null }));
      this.send(`${b64(next)}\r\n`, STEPS.auth, step, true);
    };
    if (mechanism === "PLAIN") this.send(`AUTH PLAIN ${b64(`\0${credentials.user}\0${credentials.password}`)}\r\n`, STEPS.auth, step, true);
    else if (mechanism === "XOAUTH2") this.send(`AUTH XOAUTH2 ${b64(`user=${credentials.user}\x01auth=Bearer ${credentials.token}\x01\x01`)}\r\n`, STEPS.auth, step, true);
    else this.send("AUTH LOGIN\r\n", STEPS.auth, step);
  }

  /** QUIT: with `wait`, the reply (or its timeout) ends the connection; without, it ends now. */
  quit(wait: boolean, done: () => void = () => undefined): void {
    this.#quitting = true;
    if (!wait) {
      this.command("QUIT\r\n");
      this.close();
      return done();
    }
    this.#quitDone = done;
    this.send("QUIT\r\n", STEPS.quit, () => this.#quitEnded());
  }

  /** The reply to QUIT, or the server hanging up first: either way the conversation is over. */
  #quitEnded(): void {
    const done = this.#quitDone;
    this.#quitDone = null;
    this.close();
    done?.();
  }

  /** The end we chose: FIN after what was written; the socket goes when it goes, at most 2 s later. */
  close(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#disarm();
    this.#expects.length = 0;
    const socket = this.#socket;
    if (socket) {
      socket.end();
      setTimeout(() => socket.destroy(), 2000).unref();
    }
  }

  /** Ends the conversation now, as a failure: the reason goes to the failure callback. */
  abort(reason: string, code = "ECONNECTION", reply: Reply | null = null): void {
    this.#fail(reason, code, reply);
  }

  /* The readable side: replies in, each to its expectation, in order. */

  #listen(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.#readable(chunk));
    socket.on("error", (err: NodeJS.ErrnoException) => this.#lost(describeSocketError(err)));
    socket.on("close", () => this.#lost("Connection closed"));
  }

  #readable(chunk: Buffer): void {
    const parser = this.#parser;
    this.#reads++;
    for (const reply of parser.push(chunk)) {
      // After STARTTLS's 220 the plaintext parser is gone: whatever else came with it is
      // dropped unread (RFC 3207; the STARTTLS command-injection class of bugs).
      if (this.#ended || parser !== this.#parser) return;
      this.#reply(reply);
    }
  }

  #reply(reply: Reply): void {
    const onLine = this.#options.onLine;
    if (onLine) reply.lines.forEach((l, i) => onLine("<", `${reply.code < 600 ? reply.code : ""}${i < reply.lines.length - 1 ? "-" : " "}${l}`));
    const expect = this.#expects.shift();
    const words = printable(replyText(reply));
    if (!expect) {
      if (this.#quitting) return;
      return this.#fail(`host ${this.peer} sent an unexpected reply: ${words}`, "EPROTOCOL", reply);
    }
    // A reply that came in the same read as the reply before it cannot answer a command
    // written only after that read: the server spoke before it was asked (Nodemailer's
    // position-only matching takes such a reply as the answer).
    if (expect.after >= this.#reads && expect.step !== STEPS.greeting) {
      return this.#fail(`host ${this.peer} sent a reply before the command it would answer: ${words}`, "EPROTOCOL", reply);
    }
    if (reply.code < 600 && !expectedReply(expect.step.command, reply) && expect.step !== STEPS.quit) {
      return this.#fail(`host ${this.peer} broke the protocol: ${words} (in reply to ${expect.step.command} command)`, "EPROTOCOL", reply);
    }
    const head = this.#expects[0];
    if (head) this.#arm(head.step);
    else this.#disarm();
    expect.onReply(reply);
  }

  /** The socket closed or failed: a failure, unless we were done with it. */
  #lost(why: string): void {
    if (this.#ended) return;
    if (this.#quitting) return this.#quitEnded();
    const partial = this.#parser.end();
    const detail = partial ? ` (${printable(replyText(partial))})` : why === "Connection closed" ? "" : ` (${why})`;
    const label = this.#handshaking ? STEPS.tlsHandshake.label : this.#current.label;
    this.#fail(`lost connection with ${this.peer} while ${label}${detail}`, this.#handshaking ? "ETLS" : "ECONNECTION", partial);
  }

  /* Timers: entering a step arms its timeout. */

  #arm(step: Step): void {
    this.#current = step;
    const ms = (this.#options.timeouts?.[step.timeout] ?? STAGE_TIMEOUTS[step.timeout]) * 1000;
    if (this.#timer && this.#timerMs === ms) {
      this.#timer.refresh();
      return;
    }
    this.#disarm();
    this.#timerMs = ms;
    this.#timer = setTimeout(() => this.#timedOut(), ms);
  }

  #disarm(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
  }

  #timedOut(): void {
    // A handshake that never finishes is a failed handshake.
    if (this.#handshaking) return this.#fail(`TLS handshake with ${this.peer} timed out`, "ETLS");
    if (this.#current === STEPS.connect) return this.#fail(`connect to ${this.relay}: Connection timed out`, "ECONNECTION");
    this.#fail(`conversation with ${this.peer} timed out while ${this.#current.label}`, "ETIMEDOUT");
  }

  /** The one way a conversation fails: the socket goes, the owner hears why, once. */
  #fail(reason: string, code: string, reply: Reply | null = null): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#disarm();
    const step = this.#handshaking ? STEPS.tlsHandshake : this.#current;
    if (this.#handshaking) this.#peerResult({ ok: false, type: "validation-failure", reason });
    this.#expects.length = 0;
    this.#socket?.destroy();
    this.#onFailure(new MailError(reason, code, {
      host: this.#options.host, stage: step.label, command: step.command,
      ...(reply ? { response: replyText(reply) } : {}),
    }), reply);
  }
}

/** Socket errors in the words Postfix's log uses. */
export function describeSocketError(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case "ECONNREFUSED": return "Connection refused";
    case "ECONNRESET": return "Connection reset by peer";
    case "ETIMEDOUT": return "Connection timed out";
    case "EHOSTUNREACH": return "No route to host";
    case "ENETUNREACH": return "Network is unreachable";
    case "EPIPE": return "Broken pipe";
    case "ENOTFOUND": return "Host not found";
    default: return err.message;
  }
}
