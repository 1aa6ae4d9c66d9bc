/*
 * NAME
 *   smtp-codes.ts - SMTP reply codes, the command/reply table, the reply parser
 *
 * SYNOPSIS
 *   const parser = new ReplyParser();
 *   for (const reply of parser.push(chunk)) classify(reply);  // ok | temporary | permanent | protocol
 *   parser.end();                                             // 621 when EOF cut a reply short
 *
 * DESCRIPTION
 *   The one place that knows what the server's words mean. ReplyParser turns bytes from a
 *   socket into replies { code, enhanced, lines } whatever the packet boundaries: a reply
 *   split over many packets, several replies in one packet, multi-line replies. As in the
 *   scsh client, codes >= 600 are not SMTP's: 600 means the server sent something that is
 *   not a reply, 621 means it closed the connection in the middle of one. classify() maps a
 *   reply to what the sender must do; expectedReply() checks a positive reply against the
 *   seed's command/reply table (a 354 to RCPT is a protocol error, not a success).
 *   parseEhlo() reads the service extensions a server offers. MailError is the one error
 *   type, carrying the server's words when there are any.
 *
 * DIAGNOSTICS
 *   The parser never throws. A line longer than MAX_REPLY_LINE or a reply of more than
 *   MAX_REPLY_LINES lines becomes a 600 reply and the parser stops accepting input: the
 *   caller must drop the connection. Memory held is bounded by MAX_REPLY_LINE * MAX_REPLY_LINES.
 */

/** Where an error happened and what the server said, as far as it is known. */
export interface MailErrorDetails {
  /** The queue id of the message concerned. */
  queueId?: string;
  /** The server's name. */
  host?: string;
  /** The step of the conversation, in Postfix's words ("sending RCPT TO"). */
  stage?: string;
  /** The command whose reply was awaited (MAIL, RCPT, DATA, DOT, ...). */
  command?: string;
  /** The server's words: its reply, on one line. */
  response?: string;
}

/**
 * The one error type of mudmail: a stable `code` (ECONNECTION, ETIMEDOUT, ETLS, EPROTOCOL,
 * EAUTH, EQUEUE, ECORRUPT, EENVELOPE, EUSAGE, ...), the message, and the details known.
 */
export class MailError extends Error {
  constructor(message: string, readonly code: string, readonly details: MailErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "MailError";
  }
}

/**
 * Postfix's smtp(8) timeouts in seconds, per stage of the conversation (smtp_connect_timeout,
 * smtp_helo_timeout, ...): the engine's defaults and the direct client's.
 */
export const STAGE_TIMEOUTS = {
  connect: 30, helo: 300, mail: 300, rcpt: 300, dataInit: 120, dataXfer: 180, dataDone: 600, quit: 300, rset: 20,
} as const;

/** RFC 5321 allows 512 octets per reply line; real servers go past it, hostile ones far past it. */
export const MAX_REPLY_LINE = 4096;
/** A multi-line reply longer than this is not a server being verbose. */
export const MAX_REPLY_LINES = 1000;

/** Pseudo-codes of the scsh seed for failures outside the protocol. */
export const CODE_GARBAGE = 600;
export const CODE_PREMATURE_EOF = 621;

export interface Reply {
  /** The three-digit code, or 600/621 for a reply that was garbage or cut short. */
  code: number;
  /** The RFC 3463 enhanced status code ("5.1.1") when the server sent one, else null. */
  enhanced: string | null;
  /** Text of each line, without the code, separator and line end. */
  lines: string[];
}

export type ReplyClass = "ok" | "temporary" | "permanent" | "protocol";

/**
 * The seed's command/reply sequences (RFC 821 section 4.3): S success, I intermediate,
 * F failure, E error. Only the positive lists are enforced: any 4xx/5xx is understood by
 * its class, but a positive code a command cannot have is a protocol error.
 */
export const COMMAND_REPLIES: Readonly<Record<string, { S: number[]; I?: number[]; F: number[]; E: number[] }>> = {
  CONNECT: { S: [220], F: [421], E: [] },
  HELO: { S: [250], F: [], E: [500, 501, 504, 421] },
  EHLO: { S: [250], F: [], E: [500, 501, 502, 504, 421] },
  MAIL: { S: [250], F: [552, 451, 452], E: [500, 501, 421] },
  RCPT: { S: [250, 251], F: [550, 551, 552, 553, 450, 451, 452], E: [500, 501, 503, 421] },
  DATA: { S: [], I: [354], F: [451, 554], E: [500, 501, 503, 421] },
  DOT: { S: [250], F: [552, 554, 451, 452], E: [] },
  RSET: { S: [250], F: [], E: [500, 501, 504, 421] },
  VRFY: { S: [250, 251, 252], F: [550, 551, 553], E: [500, 501, 502, 504, 421] },
  EXPN: { S: [250, 252], F: [550], E: [500, 501, 502, 504, 421] },
  HELP: { S: [211, 214], F: [], E: [500, 501, 502, 504, 421] },
  NOOP: { S: [250], F: [], E: [500, 421] },
  QUIT: { S: [221], F: [], E: [500] },
  STARTTLS: { S: [220], F: [], E: [454, 501, 421] },
  AUTH: { S: [235], I: [334], F: [535, 534, 538], E: [500, 501, 504, 421] },
};

/** What a reply means for the sender: go on, try later, give up, or the server is broken. */
export function classify(reply: Reply): ReplyClass {
  const kind = Math.floor(reply.code / 100);
  if (kind === 2 || kind === 3) return "ok";
  if (kind === 4) return "temporary";
  if (kind === 5) return "permanent";
  return "protocol";
}

/**
 * True when a reply may follow this command: a negative reply always may (its class says
 * what it means); a positive one only when the table lists it (251 to RCPT yes, 354 no).
 */
export function expectedReply(command: string, reply: Reply): boolean {
  const row = COMMAND_REPLIES[command];
  const kind = Math.floor(reply.code / 100);
  if (kind === 4 || kind === 5) return true;
  if (!row) return kind === 2;
  return row.S.includes(reply.code) || (row.I?.includes(reply.code) ?? false);
}

/** The RFC 3464 status for a reply: its enhanced code, or x.0.0 from its class (as Postfix does). */
export function dsnStatus(reply: Reply): string {
  if (reply.enhanced) return reply.enhanced;
  const kind = Math.floor(reply.code / 100);
  return kind === 2 ? "2.0.0" : kind === 5 ? "5.0.0" : "4.0.0";
}

/** "250 2.0.0 Ok: queued as X" with every line of a multi-line reply joined by spaces. */
export function replyText(reply: Reply): string {
  const code = reply.code >= 600 ? "" : `${reply.code} `;
  return (code + reply.lines.join(" ")).trim();
}

const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)/;

/** Builds a reply object; used by the parser and by code that must invent a reply. */
export function makeReply(code: number, lines: string[]): Reply {
  const match = lines.length > 0 ? ENHANCED.exec(lines[0]) : null;
  const enhanced = match && Number(match[1]) === Math.floor(code / 100) ? `${match[1]}.${match[2]}.${match[3]}` : null;
  return { code, enhanced, lines };
}

const LF = 0x0a;

/**
 * Incremental reply parser: push() bytes as they arrive, get back the replies they
 * complete. Generous in what it accepts (LF alone ends a line, a bare "250" is a reply),
 * strict about what a reply is (three digits, then space, dash or nothing).
 */
export class ReplyParser {
  private partial: Buffer[] = [];
  private partialLength = 0;
  private lines: string[] = [];
  private code = 0;
  private broken = false;

  /** Feed bytes from the socket; returns every reply they complete, in order. */
  push(chunk: Buffer): Reply[] {
    const replies: Reply[] = [];
    if (this.broken) return replies;
    let start = 0;
    while (start < chunk.length) {
      const lf = chunk.indexOf(LF, start);
      if (lf < 0) {
        this.keepPartial(chunk.subarray(start), replies);
        break;
      }
      let lineBytes = chunk.subarray(start, lf);
      if (this.partialLength > 0) {
        lineBytes = Buffer.concat([...this.partial, lineBytes], this.partialLength + lineBytes.length);
        this.partial = [];
        this.partialLength = 0;
      }
      start = lf + 1;
      if (lineBytes.length - (lineBytes[lineBytes.length - 1] === 0x0d ? 1 : 0) > MAX_REPLY_LINE) {
        this.fail(replies, `reply line longer than ${MAX_REPLY_LINE} octets`);
        break;
      }
      this.line(lineBytes, replies);
      if (this.broken) break;
    }
    return replies;
  }

  /** The connection ended: a reply cut short becomes 621, as in the scsh seed. */
  end(): Reply | null {
    if (this.broken || (this.lines.length === 0 && this.partialLength === 0)) return null;
    const lines = [...this.lines];
    if (this.partialLength > 0) lines.push(Buffer.concat(this.partial).toString("utf8"));
    this.reset();
    this.broken = true;
    return makeReply(CODE_PREMATURE_EOF, ["Premature EOF during smtp reply.", ...lines]);
  }

  /** True while part of a reply has arrived and the rest has not. */
  get midReply(): boolean {
    return this.lines.length > 0 || this.partialLength > 0;
  }

  private keepPartial(rest: Buffer, replies: Reply[]): void {
    // One octet of slack only for the CR of a line whose LF is still on its way.
    const length = this.partialLength + rest.length;
    if (length > MAX_REPLY_LINE + 1 || (length === MAX_REPLY_LINE + 1 && rest[rest.length - 1] !== 0x0d)) {
      this.fail(replies, `reply line longer than ${MAX_REPLY_LINE} octets`);
      return;
    }
    // Copy: the socket may reuse or hold the chunk, and we keep only a bounded tail.
    this.partial.push(Buffer.from(rest));
    this.partialLength += rest.length;
  }

  private line(bytes: Buffer, replies: Reply[]): void {
    let end = bytes.length;
    if (end > 0 && bytes[end - 1] === 0x0d) end--;
    const text = bytes.toString("utf8", 0, end);
    const parsed = parseReplyLine(text);
    if (!parsed || (this.lines.length > 0 && parsed.code !== this.code)) {
      this.fail(replies, `Improperly-formatted smtp reply: ${printable(text)}`);
      return;
    }
    this.code = parsed.code;
    this.lines.push(parsed.text);
    if (this.lines.length > MAX_REPLY_LINES) {
      this.fail(replies, `multi-line reply longer than ${MAX_REPLY_LINES} lines`);
      return;
    }
    if (!parsed.more) {
      replies.push(makeReply(this.code, this.lines));
      this.reset();
    }
  }

  private fail(replies: Reply[], why: string): void {
    this.reset();
    this.broken = true;
    replies.push(makeReply(CODE_GARBAGE, [why]));
  }

  private reset(): void {
    this.lines = [];
    this.partial = [];
    this.partialLength = 0;
    this.code = 0;
  }
}

function parseReplyLine(text: string): { code: number; text: string; more: boolean } | null {
  if (text.length < 3) return null;
  const c0 = text.charCodeAt(0), c1 = text.charCodeAt(1), c2 = text.charCodeAt(2);
  if (c0 < 0x32 || c0 > 0x35 || c1 < 0x30 || c1 > 0x39 || c2 < 0x30 || c2 > 0x39) return null;
  const code = (c0 - 0x30) * 100 + (c1 - 0x30) * 10 + (c2 - 0x30);
  if (text.length === 3) return { code, text: "", more: false };
  const sep = text[3];
  if (sep !== " " && sep !== "-") return null;
  return { code, text: text.slice(4), more: sep === "-" };
}

/** Server words go into log lines: keep them on one line and free of control bytes. */
export function printable(text: string, max = 300): string {
  // eslint-disable-next-line no-control-regex
  const clean = text.replace(/[\x00-\x1f\x7f]/g, "?");
  return clean.length > max ? `${clean.slice(0, max)}...` : clean;
}

/** The service extensions a server announced in its EHLO reply (RFC 5321 section 4.1.1.1). */
export interface Extensions {
  pipelining: boolean;
  /** SIZE limit in octets; 0 when the server announced SIZE without a limit; null when absent. */
  size: number | null;
  eightBitMime: boolean;
  smtpUtf8: boolean;
  startTls: boolean;
  dsn: boolean;
  enhancedStatusCodes: boolean;
  chunking: boolean;
  /** SASL mechanisms offered by AUTH, upper case. */
  auth: string[];
}

/** A server that spent more lines than this on EHLO is not listing extensions. */
export const MAX_EHLO_LINES = 100;

export function parseEhlo(reply: Reply): Extensions {
  const ext: Extensions = {
    pipelining: false, size: null, eightBitMime: false, smtpUtf8: false, startTls: false,
    dsn: false, enhancedStatusCodes: false, chunking: false, auth: [],
  };
  // The first line is the server's name and greeting, not an extension.
  for (const line of reply.lines.slice(1, MAX_EHLO_LINES)) {
    const [keyword, ...params] = line.trim().split(/[\s=]+/);
    switch (keyword.toUpperCase()) {
      case "PIPELINING": ext.pipelining = true; break;
      case "SIZE": {
        const limit = Number(params[0] ?? 0);
        ext.size = Number.isSafeInteger(limit) && limit > 0 ? limit : 0;
        break;
      }
      case "8BITMIME": ext.eightBitMime = true; break;
      case "SMTPUTF8": ext.smtpUtf8 = true; break;
      case "STARTTLS": ext.startTls = true; break;
      case "DSN": ext.dsn = true; break;
      case "ENHANCEDSTATUSCODES": ext.enhancedStatusCodes = true; break;
      case "CHUNKING": ext.chunking = true; break;
      case "AUTH": ext.auth.push(...params.map((p) => p.toUpperCase())); break;
    }
  }
  return ext;
}

/**
 * RFC 3461 section 4: xtext, the encoding of ENVID and ORCPT values. Printable ASCII but
 * "+" and "=" stands for itself; every other octet is "+" and two upper-case hex digits.
 */
export function xtext(text: string): string {
  let out = "";
  for (const byte of Buffer.from(text, "utf8")) {
    out += byte >= 33 && byte <= 126 && byte !== 0x2b && byte !== 0x3d ? String.fromCharCode(byte) : `+${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/** The inverse of xtext(), or null when the text is not valid xtext. */
export function unxtext(text: string): string | null {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x2b) {
      const hex = text.slice(i + 1, i + 3);
      if (!/^[0-9A-F]{2}$/.test(hex)) return null;
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else if (c >= 33 && c <= 126 && c !== 0x3d) {
      bytes.push(c);
    } else {
      return null;
    }
  }
  return Buffer.from(bytes).toString("utf8");
}
