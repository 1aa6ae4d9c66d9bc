/*
 * NAME
 *   receiver.ts - the built-in SMTP receiver (--serve): local mailboxes in users/, never a relay
 *
 * SYNOPSIS
 *   const server = await startServer({ maildir: "maildir", listen: "127.0.0.1:2525" });
 *   server.on("message", ({ id, from, to, size, mailboxes }) => tellUser(to, "you have new mail"));
 *   await server.close();
 *
 *   node dist/mail.js --serve [--listen HOST:PORT] [--hostname NAME] [--max-size BYTES]
 *                             [--max-recipients N] [--tls-cert FILE --tls-key FILE]
 *
 * DESCRIPTION
 *   The Anubis server of the seed, made safe for the open Internet. A local user is a
 *   directory maildir/users/<address>/ (address in lower case; the server creates none);
 *   a message for one of them is appended to users/<address>/mail in mboxrd format. Mail
 *   for anyone else is refused at RCPT with 550 5.1.1: the server is never an open relay.
 *   A user's directory, once found, is taken as there for a second without looking again
 *   (a user removed meanwhile gets 451 at the end of DATA, not 550 at RCPT).
 *
 *   A Session is one connection: a Stage that only moves forward within a transaction
 *   (Greeting, Helo, Mail, Rcpt, Data; RSET, HELO/EHLO and the end of DATA go back to Helo,
 *   STARTTLS to Greeting: RFC 3207 forgets all that came before, and drops what the client
 *   sent behind STARTTLS before the handshake),
 *   one timer (commandTimeout, RFC 5321's five minutes: the time a client has to send one
 *   command line, or between two pieces of DATA), an error count, and the input it has not
 *   handled yet. Input is handled strictly in order by one pump, whatever the packet
 *   boundaries: pipelined commands (RFC 2920), a body sent right behind DATA, the commands
 *   behind the final dot. While the pump works (a file write, a delivery) the socket is
 *   paused, so input never piles up in memory; replies go out when the input runs dry.
 *
 *   Command lines end in CRLF or, liberally, a bare LF; one longer than 512 octets (MAIL
 *   and RCPT: 1012, room for RFC 3461's parameters) is discarded as it arrives and
 *   answered 500. DATA is framed strictly: only CRLF . CRLF ends it (a bare LF or CR
 *   next to the dot is content, so SMTP smuggling finds no end).
 *   DotDecoder (queue.ts, beside the stuffer it undoes) removes the dot-stuffing and MboxEncoder turns CRLF into LF and quotes
 *   /^>*From / lines (mboxrd), both a byte at a time across chunk boundaries; the message
 *   is held in memory up to HOLD_BYTES (64 KB), and a larger one goes on into a temporary
 *   file maildir/tmp/receiver.<pid>.<n>.<id>; past maxSize nothing more is stored and the
 *   message is refused with 552 after the final dot.
 *
 *   Delivery is a group commit. Messages for the same mailboxes that end while a group is
 *   being written wait, and go in together as the next group (up to GROUP_BYTES). A group
 *   takes, for every mailbox in sorted order, an in-process lock and the dotlock
 *   users/<address>/mail.lock (created with O_EXCL, removed after, stale after
 *   LOCK_STALE_MS); appends each message's "From " line, Return-Path:, Received: and the
 *   message to every mailbox (messages held in memory in one write per mailbox); then
 *   fsyncs each mailbox once (and its folder when the mailbox was new or empty), writes
 *   one journal line naming the group's messages ("synced"), and only then answers each of
 *   them 250. A message that cannot be written is truncated back out of every mailbox and
 *   answered 451 alone; a failed fsync truncates every mailbox back to its length before
 *   the group and answers the whole group 451: a mailbox holds whole messages only.
 *   A mailbox is opened with O_NOFOLLOW and O_NONBLOCK and must then be a regular file with
 *   one link: a symlink, a FIFO, a device, a directory or a second hard link is refused
 *   (451 4.2.0, the journal says what is there), and nothing is written through it.
 *
 *   Delivery status notifications (RFC 3461): EHLO offers DSN, and a client that said EHLO
 *   may give RET=FULL|HDRS and ENVID=<xtext> on MAIL, NOTIFY=NEVER|<SUCCESS,FAILURE,DELAY>
 *   and ORCPT=<addr-type>;<xtext> on RCPT, each at most once per command. Keywords and the
 *   RET and NOTIFY values are case-insensitive; ENVID (at most 100 characters as sent,
 *   printable US-ASCII once decoded) and ORCPT's address (at most 500 characters for the
 *   whole value; printable US-ASCII, or any text but controls for addr-type utf-8, whose
 *   \x{HEX} escapes of RFC 6533 are decoded too) are xtext-decoded. A bad value or a
 *   repeated parameter is answered 501 5.5.4 naming it; after HELO they are unknown (555).
 *   The receiver keeps them for the journal (ret= envid= on the MAIL line, notify= orcpt=
 *   on the RCPT line, xtext-encoded as RFC 3461 writes them) and the "message" event (its
 *   dsn field); it sends no notifications itself and the stored message is unchanged.
 *
 *   Every event (connect, HELO/EHLO, MAIL, RCPT accepted or refused, a group synced,
 *   message stored or refused, errors, timeouts, STARTTLS, QUIT, disconnect) is one line,
 *   "<date> <time> <client address> <what>" ("-" for the server's own), appended to
 *   maildir/journal/YYYY_MM_DD_HH (local time, as the seed names them) and given to the
 *   log function (standard error by default).
 *
 * DIAGNOSTICS
 *   startServer() rejects with a UsageError naming the flag for a bad option, or with the
 *   system's error when it cannot listen. A 250 after the final dot means the message is on
 *   disk (fsync'ed) in every mailbox it was for; 451 means it is in none of them. Replies
 *   carry RFC 3463 enhanced status codes, except the greeting and the replies to HELO and
 *   EHLO (RFC 2034). A session that makes maxErrors errors, or is silent for
 *   commandTimeout seconds, gets 421 and is closed; past maxSessions a connection gets 421.
 *
 * BUGS
 *   No AUTH, no SMTPUTF8, no CHUNKING (BDAT). DSN parameters are accepted and recorded, but
 *   the receiver is a final destination that writes no delivery reports (no "delivered"
 *   DSN for NOTIFY=SUCCESS). One size limit for every mailbox, and
 *   no quota. A message accepted for several mailboxes is written once per mailbox.
 *   A client that disconnects while its message is being delivered (after the final dot,
 *   before the 250) may send it again: the data-done window every MTA has.
 *   A symlink is never followed at users/<address>/mail or its mail.lock, but it is at
 *   users/<address> itself (an administrator may put a user's folder elsewhere): only the
 *   server's own user must be able to write in users/ (mode 0700). A refused mailbox defers
 *   the whole message, for its other recipients too (all or none), until it is fixed.
 *   The mail.lock convention keeps out only programs that follow it.
 */

import { EventEmitter } from "node:events";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import * as tls from "node:tls";
import { randomFillSync } from "node:crypto";
import { printable, unxtext, xtext } from "./smtp-codes.js";
import { DotDecoder, Spool, addressProblem, errno, syncDir } from "./queue.js";
import { UsageError } from "./options.js";
import { rfc5322Date } from "./compose.js";

/* ------------------------------------------------------------------------------------ */
/* Limits and defaults                                                                   */

export const DEFAULT_LISTEN = "127.0.0.1:2525";
/** --max-size: 10 MB of message, as received (after un-dot-stuffing, CRLF line ends). */
export const DEFAULT_MAX_SIZE = 10 * 1024 * 1024;
/** --max-recipients: RFC 5321's minimum (section 4.5.3.1.8) is also the default ... */
export const DEFAULT_MAX_RECIPIENTS = 100;
/** ... and the seed's "1000 seems already a lot" is the most allowed. */
export const MAX_MAX_RECIPIENTS = 1000;
/** Seconds a client has for each command line, or between two pieces of DATA (RFC 5321 4.5.3.2). */
export const DEFAULT_COMMAND_TIMEOUT = 300;
/** Errors a session may make; the next reply is 421 and the end (Postfix's smtpd_hard_error_limit). */
export const DEFAULT_MAX_ERRORS = 10;
/** Sessions at once; one more gets 421 4.7.0 at once. */
export const DEFAULT_MAX_SESSIONS = 50;
/** RFC 5321 4.5.3.1.4: a command line, CRLF included. */
export const MAX_COMMAND_LINE = 512;
/**
 * MAIL and RCPT lines: RFC 3461 section 4 lets NOTIFY and ORCPT make RCPT up to 500 octets
 * longer (RET and ENVID: MAIL 110, and SIZE 26 more, RFC 1870); one limit for both.
 */
export const MAX_PARAMS_LINE = MAX_COMMAND_LINE + 500;
/** RFC 3461 4.4: ENVID, as sent (xtext), at most 100 characters. */
export const MAX_ENVID = 100;
/** RFC 3461 4.2: ORCPT's value ("addr-type;xtext"), at most 500 characters. */
export const MAX_ORCPT = 500;
/** How long a closing session may take to say goodbye before its socket is destroyed. */
const CLOSE_GRACE_MS = 2000;
/** Replies held back for the end of the input are sent once they reach this many bytes. */
const OUTBOX_FLUSH = 16 * 1024;
/** A temp file is copied into the mailboxes in pieces of this size. */
const COPY_CHUNK = 64 * 1024;
/** A commit group takes messages until they come to this many octets (at least one message). */
const GROUP_BYTES = 4 * 1024 * 1024;
/** How long a local user's directory, once found, is taken as there without looking again; how many are kept. */
const USER_CACHE_MS = 1000;
const USER_CACHE_SIZE = 10_000;
/** A message is held in memory up to this many octets (as stored); a larger one goes to a temp file. */
const HOLD_BYTES = 64 * 1024;
/** Waiting for another process's mail.lock: every LOCK_RETRY_MS, LOCK_TRIES times (10 s). */
const LOCK_RETRY_MS = 50;
const LOCK_TRIES = 200;
/** A mail.lock older than this was left by a crash and is broken (procmail/mutt do the same). */
const LOCK_STALE_MS = 5 * 60 * 1000;
/**
 * How a mailbox is opened: never through a symlink at its name (O_NOFOLLOW: whoever may
 * write in users/<address>/ could point it at any file the server may write), and never
 * waiting for a reader (O_NONBLOCK: a FIFO fails at once instead of holding the session;
 * on a regular file it changes nothing).
 */
const MAILBOX_OPEN_FLAGS = fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT |
  fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK;

const CR = 0x0d;
const LF = 0x0a;
const GT = 0x3e;
const CR_BUF = Buffer.from([CR]);
const LF_BUF = Buffer.from([LF]);
const LF_LF = Buffer.from([LF, LF]);

/* ------------------------------------------------------------------------------------ */
/* Options and the handle                                                                */

export interface ServerOptions {
  /** The spool; the receiver uses users/, journal/ and tmp/ in it, and creates what is missing. */
  maildir: string;
  /** HOST:PORT to listen on (default 127.0.0.1:2525); port 0 picks a free one. */
  listen?: string;
  /** The name in the greeting, EHLO and Received: (default: the host name). */
  hostname?: string;
  /** Largest message accepted, in octets (default 10 MB). */
  maxSize?: number;
  /** Recipients per message, 100..1000 (default 100). */
  maxRecipients?: number;
  /** PEM files; when both are given, STARTTLS is offered. */
  tlsCert?: string | null;
  tlsKey?: string | null;
  /** Seconds per command (default 300). */
  commandTimeout?: number;
  /** Errors per session before 421 (default 10). */
  maxErrors?: number;
  /** Sessions at once (default 50). */
  maxSessions?: number;
  /** Takes each journal line (without line end); default: standard error. */
  log?: ((line: string) => void) | null;
}

/** The payload of the "message" event: one message stored in every one of its mailboxes. */
export interface StoredMessage {
  id: string;
  /** Envelope sender, "" for the null sender <>. */
  from: string;
  /** Accepted recipients as the client spelled them, one per mailbox. */
  to: string[];
  /** Octets of the message as received (after un-dot-stuffing, with CRLF line ends). */
  size: number;
  /** The mbox files it was appended to: maildir/users/<address>/mail. */
  mailboxes: string[];
  /** RFC 3461 parameters the client gave (all null when it gave none). */
  dsn: DsnEnvelope;
}

/** NOTIFY's values, lower case: "never" alone, or any of the other three. */
export type DsnNotify = "never" | "success" | "failure" | "delay";

/** ORCPT: the address type (lower case: "rfc822", "utf-8", ...) and the decoded address. */
export interface DsnOrcpt {
  type: string;
  address: string;
}

/** One accepted RCPT and its RFC 3461 parameters. */
export interface DsnRecipient {
  /** The recipient as accepted (as in `to`). */
  rcpt: string;
  notify: DsnNotify[] | null;
  orcpt: DsnOrcpt | null;
}

/** The RFC 3461 parameters of a message: MAIL's RET and ENVID (decoded), every accepted RCPT's. */
export interface DsnEnvelope {
  ret: "full" | "hdrs" | null;
  envid: string | null;
  /** Every accepted RCPT in order, duplicates included (`to` has one per mailbox). */
  recipients: DsnRecipient[];
}

export interface ServerHandle extends EventEmitter {
  readonly address: { host: string; port: number };
  /** Stops listening, says 421 to every session (a delivery under way finishes first), resolves when all are gone. */
  close(): Promise<void>;
  on(event: "message", listener: (message: StoredMessage) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

interface Resolved {
  maildir: string;
  host: string;
  port: number;
  hostname: string;
  maxSize: number;
  maxRecipients: number;
  secureContext: tls.SecureContext | null;
  commandTimeout: number;
  maxErrors: number;
  maxSessions: number;
  log: (line: string) => void;
}

/** Checks every option as the command line would, naming the flag; reads the TLS files. */
export function checkServerOptions(options: ServerOptions): Omit<Resolved, "secureContext"> & { tlsCert: string | null; tlsKey: string | null } {
  if (!options || typeof options.maildir !== "string" || options.maildir === "") throw new UsageError("--maildir: expected a directory");
  const { host, port } = parseListen(options.listen ?? DEFAULT_LISTEN);
  const hostname = options.hostname ?? os.hostname();
  // eslint-disable-next-line no-control-regex
  if (!hostname || hostname.length > 255 || /[\s<>()\[\]\\",;:@\x00-\x1f\x7f]/.test(hostname)) {
    throw new UsageError(`--hostname: not a host name: ${JSON.stringify(hostname)}`);
  }
  const whole = (value: unknown, flag: string, min: number, max: number, fallback: number): number => {
    const v = value ?? fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      throw new UsageError(`${flag}: expected a whole number from ${min} to ${max}, got ${JSON.stringify(value)}`);
    }
    return v;
  };
  const maxSize = whole(options.maxSize, "--max-size", 1, Number.MAX_SAFE_INTEGER, DEFAULT_MAX_SIZE);
  const maxRecipients = whole(options.maxRecipients, "--max-recipients", DEFAULT_MAX_RECIPIENTS, MAX_MAX_RECIPIENTS, DEFAULT_MAX_RECIPIENTS);
  const maxErrors = whole(options.maxErrors, "--max-errors", 1, 1_000_000, DEFAULT_MAX_ERRORS);
  const maxSessions = whole(options.maxSessions, "--max-sessions", 1, 100_000, DEFAULT_MAX_SESSIONS);
  const commandTimeout = options.commandTimeout ?? DEFAULT_COMMAND_TIMEOUT;
  if (typeof commandTimeout !== "number" || !Number.isFinite(commandTimeout) || commandTimeout <= 0 || commandTimeout > 86400) {
    throw new UsageError(`--command-timeout: expected a positive number of seconds, got ${JSON.stringify(options.commandTimeout)}`);
  }
  const tlsCert = options.tlsCert ?? null;
  const tlsKey = options.tlsKey ?? null;
  if ((tlsCert === null) !== (tlsKey === null)) throw new UsageError("--tls-cert and --tls-key go together");
  const log = options.log ?? ((line: string) => { process.stderr.write(`${line}\n`); });
  return { maildir: options.maildir, host, port, hostname, maxSize, maxRecipients, commandTimeout, maxErrors, maxSessions, log, tlsCert, tlsKey };
}

/**
 * HOST:PORT, [IPv6]:PORT or HOST (port 2525) for --listen. Unlike mail.ts's parseHostPort,
 * port 0 is allowed: the system picks a free port (tests, --demo).
 */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?))(?::(\d{1,5}))?$/.exec(text);
  if (!m) throw new UsageError(`--listen: expected HOST:PORT, got ${JSON.stringify(text)}`);
  const host = m[1] ?? m[2];
  const port = m[3] === undefined ? 2525 : Number(m[3]);
  if (port > 65535) throw new UsageError(`--listen: port out of range in ${JSON.stringify(text)}`);
  if (m[1] !== undefined && net.isIPv6(host) === false) throw new UsageError(`--listen: not an IPv6 address: ${JSON.stringify(host)}`);
  return { host, port };
}

/** Starts the receiver; resolves once it listens. */
export async function startServer(options: ServerOptions): Promise<ServerHandle> {
  const checked = checkServerOptions(options);
  let secureContext: tls.SecureContext | null = null;
  if (checked.tlsCert !== null && checked.tlsKey !== null) {
    const read = async (file: string, flag: string) => {
      try {
        return await fs.promises.readFile(file);
      } catch (err) {
        throw new UsageError(`${flag}: cannot read ${file}: ${(err as Error).message}`);
      }
    };
    const cert = await read(checked.tlsCert, "--tls-cert");
    const key = await read(checked.tlsKey, "--tls-key");
    try {
      secureContext = tls.createSecureContext({ cert, key });
    } catch (err) {
      throw new UsageError(`--tls-cert/--tls-key: not a usable certificate and key: ${(err as Error).message}`);
    }
  }
  const server = new Receiver({ ...checked, secureContext });
  await server.listen();
  return server;
}

/* ------------------------------------------------------------------------------------ */
/* Replies                                                                               */

/** Every fixed reply, with its RFC 3463 code (none on the greeting, HELO and EHLO: RFC 2034). */
const R = {
  mailOk: "250 2.1.0 Ok",
  rcptOk: "250 2.1.5 Ok",
  ok: "250 2.0.0 Ok",
  startData: "354 End data with <CR><LF>.<CR><LF>",
  vrfy: "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
  startTls: "220 2.0.0 Ready to start TLS",
  tooManyRecipients: "452 4.5.3 Error: too many recipients",
  writeError: "451 4.3.0 Error: queue file write error",
  mailboxBusy: "451 4.2.0 Error: mailbox locked by another program, try again later",
  mailboxRefused: "451 4.2.0 Error: mailbox unavailable, try again later",
  lineTooLong: "500 5.5.2 Error: line too long",
  badSyntax: "500 5.5.2 Error: bad syntax",
  heloSyntax: "501 Syntax: HELO hostname",
  ehloSyntax: "501 Syntax: EHLO hostname",
  mailSyntax: "501 5.5.4 Syntax: MAIL FROM:<address>",
  rcptSyntax: "501 5.5.4 Syntax: RCPT TO: <address>",
  badSender: "501 5.1.7 Bad sender address syntax",
  badRecipient: "501 5.1.3 Bad recipient address syntax",
  badSize: "501 5.5.4 Bad message size syntax",
  badBody: "501 5.5.4 Bad BODY keyword value",
  unknownCommand: "502 5.5.2 Error: command not recognized",
  expn: "502 5.5.1 Error: EXPN not available",
  needHelo: "503 5.5.1 Error: send HELO/EHLO first",
  nestedMail: "503 5.5.1 Error: nested MAIL command",
  needMail: "503 5.5.1 Error: need MAIL command",
  needRcpt: "503 5.5.1 Error: need RCPT command",
  tlsActive: "503 5.5.1 Error: TLS already active",
  tlsInTransaction: "503 5.5.1 Error: MAIL transaction in progress",
  helpUnknown: "504 5.5.1 Error: no help on that topic",
  sizeExceeded: "552 5.3.4 Message size exceeds fixed limit",
  tooBig: "552 5.3.4 Error: message file too big",
  noValidRecipients: "554 5.5.1 Error: no valid recipients",
} as const;

/** HELP <command>: one line each. */
const HELP: Readonly<Record<string, string>> = {
  HELO: "HELO hostname: start a session",
  EHLO: "EHLO hostname: start a session and list the service extensions",
  MAIL: "MAIL FROM:<address> [SIZE=octets] [BODY=7BIT|8BITMIME] [RET=FULL|HDRS] [ENVID=xtext]: start a message",
  RCPT: "RCPT TO:<address> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] [ORCPT=addr-type;xtext]: add a recipient (local users only)",
  DATA: "DATA: send the message; end it with a line holding only a dot",
  RSET: "RSET: forget the message under way",
  NOOP: "NOOP: do nothing",
  QUIT: "QUIT: end the session",
  HELP: "HELP [command]: this help",
  VRFY: "VRFY address: answered 252, never verified",
  EXPN: "EXPN: not available",
  STARTTLS: "STARTTLS: start TLS, when EHLO offers it",
};

/** RFC 3461's syntax errors name the parameter (Postfix: "Bad NOTIFY parameter syntax"). */
const badValue = (key: string) => `501 5.5.4 Bad ${key} parameter value`;
const duplicate = (key: string) => `501 5.5.4 Duplicate ${key} parameter`;

/** A command verb, its argument: "MAIL", "FROM:<a@b> SIZE=10". */
const COMMAND = /^([A-Za-z][A-Za-z0-9-]*)(?:[ \t]+(.*?))?[ \t]*$/s;

/* ------------------------------------------------------------------------------------ */
/* Paths                                                                                 */

/**
 * The path argument of MAIL FROM: / RCPT TO:, liberally: "<a@b> PARAMS", "<>", a source
 * route "<@x,@y:a@b>" (the route is dropped, RFC 5321 4.1.1.3), and the bare "a@b" the
 * seed's talker sends. Returns null when no path can be read; the address is not checked.
 */
export function parsePath(text: string): { address: string; params: string[] } | null {
  const s = text.trimStart();
  if (s === "") return null;
  let address: string;
  let rest: string;
  if (s.startsWith("<")) {
    let i = 1;
    let quoted = false;
    for (; i < s.length; i++) {
      const c = s[i];
      if (quoted) {
        if (c === "\\") i++;
        else if (c === '"') quoted = false;
      } else if (c === '"') quoted = true;
      else if (c === ">") break;
      else if (c === "<") return null;
    }
    if (i >= s.length) return null;
    address = s.slice(1, i);
    rest = s.slice(i + 1);
    if (rest !== "" && !/^[ \t]/.test(rest)) return null;
    if (address.startsWith("@")) {
      const colon = address.indexOf(":");
      if (colon < 0) return null;
      address = address.slice(colon + 1);
    }
  } else {
    const m = /^(\S+)(.*)$/s.exec(s)!;
    address = m[1];
    rest = m[2];
    if (/[<>]/.test(address)) return null;
  }
  const params = rest.trim() === "" ? [] : rest.trim().split(/[ \t]+/);
  return { address, params };
}

/* ------------------------------------------------------------------------------------ */
/* DSN parameters (RFC 3461)                                                             */

/** "KEY=value" of MAIL or RCPT: the keyword in upper case, the value (null without "="). */
export function splitParam(param: string): { key: string; value: string | null } {
  const eq = param.indexOf("=");
  return eq < 0 ? { key: param.toUpperCase(), value: null } : { key: param.slice(0, eq).toUpperCase(), value: param.slice(eq + 1) };
}

const PRINTABLE_ASCII = /^[\x20-\x7e]+$/;
// eslint-disable-next-line no-control-regex
const CONTROLS = /[\x00-\x1f\x7f-\x9f\ufffd]/;

/** RET=FULL|HDRS, in any case; null for anything else. */
export function parseRet(value: string | null): "full" | "hdrs" | null {
  const v = value?.toLowerCase();
  return v === "full" || v === "hdrs" ? v : null;
}

/** ENVID=xtext: at most 100 characters as sent, printable US-ASCII once decoded; the decoded text, or null. */
export function parseEnvid(value: string | null): string | null {
  if (!value || value.length > MAX_ENVID) return null;
  const decoded = unxtext(value);
  return decoded !== null && PRINTABLE_ASCII.test(decoded) ? decoded : null;
}

/** NOTIFY=NEVER, or a list of SUCCESS, FAILURE, DELAY (each once), in any case; null when bad. */
export function parseNotify(value: string | null): DsnNotify[] | null {
  if (!value) return null;
  const list = value.toLowerCase().split(",");
  const seen = new Set<string>();
  for (const v of list) {
    if (v !== "never" && v !== "success" && v !== "failure" && v !== "delay") return null;
    if (seen.has(v)) return null;
    seen.add(v);
  }
  if (seen.has("never") && list.length > 1) return null;
  return list as DsnNotify[];
}

/** ORCPT's addr-type: an RFC 5322 atom (no "=", which ends an ESMTP keyword). */
const ADDR_TYPE = /^[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+$/;

/**
 * ORCPT=addr-type;xtext, at most 500 characters: the type in lower case and the decoded
 * address, or null. The address must be printable US-ASCII (RFC 3461 4.2), except for
 * addr-type utf-8, whose \x{HEX} escapes (RFC 6533 utf-8-addr-xtext) are decoded as well
 * and which may hold any text but control characters.
 */
export function parseOrcpt(value: string | null): DsnOrcpt | null {
  if (!value || value.length > MAX_ORCPT) return null;
  const semi = value.indexOf(";");
  if (semi < 0) return null;
  const type = value.slice(0, semi);
  if (!ADDR_TYPE.test(type)) return null;
  let address = unxtext(value.slice(semi + 1));
  if (!address) return null;
  if (type.toLowerCase() === "utf-8") {
    address = decodeUnicodeEscapes(address);
    if (!address || CONTROLS.test(address)) return null;
  } else if (!PRINTABLE_ASCII.test(address)) {
    return null;
  }
  return { type: type.toLowerCase(), address };
}

/** RFC 6533's EmbeddedUnicodeChar, \x{HEX}: decoded; null on a backslash that starts none. */
function decodeUnicodeEscapes(text: string): string | null {
  let out = "";
  for (let i = 0; i < text.length;) {
    if (text[i] !== "\\") {
      out += text[i++];
      continue;
    }
    const m = /^\\x\{([0-9A-F]{1,6})\}/.exec(text.slice(i, i + 11));
    if (!m) return null;
    const cp = parseInt(m[1], 16);
    if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return null;
    out += String.fromCodePoint(cp);
    i += m[0].length;
  }
  return out;
}

/* ------------------------------------------------------------------------------------ */
/* DATA: the dot decoder and the mbox encoder                                            */

/**
 * Message bytes (CRLF line ends) to mboxrd: CRLF becomes LF (a bare CR stays), and a line
 * that matches /^>*From / gets one more ">" in front. A line start here is any LF, since an
 * mbox reader splits on LF alone. The ">"s and "From" letters at a line start are counted,
 * not kept, until the line shows whether it needs quoting: memory is bounded whatever the
 * input.
 */
export class MboxEncoder {
  private lineStart = true;
  private heldGt = 0;
  private heldFrom = 0;
  private heldCr = false;
  /** The last byte written out, to know whether the message ended its last line. */
  lastByte = -1;

  push(chunk: Buffer): Buffer[] {
    const out: Buffer[] = [];
    const n = chunk.length;
    let i = 0;
    let run = -1; // start of a run of bytes passed through unchanged, -1 when none
    const emit = (b: Buffer) => {
      if (b.length === 0) return;
      out.push(b);
      this.lastByte = b[b.length - 1];
    };
    const cut = (end: number) => {
      if (run >= 0 && end > run) emit(chunk.subarray(run, end));
      run = -1;
    };
    while (i < n) {
      if (this.heldCr) {
        this.heldCr = false;
        if (chunk[i] === LF) {
          emit(LF_BUF);
          i++;
          this.lineStart = true;
          continue;
        }
        emit(CR_BUF); // a bare CR: content, and not a line end
        this.lineStart = false;
        continue;
      }
      if (this.lineStart) {
        const b = chunk[i];
        if (this.heldFrom === 0 && b === GT) {
          this.heldGt++;
          i++;
          continue;
        }
        if (b === FROM_[this.heldFrom]) {
          this.heldFrom++;
          i++;
          if (this.heldFrom === FROM_.length) {
            this.emitHeld(emit, true);
            this.lineStart = false;
          }
          continue;
        }
        this.emitHeld(emit, false);
        this.lineStart = false;
        continue;
      }
      // Inside a line: pass bytes through up to the next CR or LF.
      if (run < 0) run = i;
      let j = i;
      while (j < n && chunk[j] !== CR && chunk[j] !== LF) j++;
      if (j === n) {
        i = n;
        break;
      }
      if (chunk[j] === LF) {
        i = j + 1;
        cut(i);
        this.lineStart = true;
      } else {
        cut(j);
        i = j + 1;
        this.heldCr = true;
      }
    }
    cut(n);
    return out;
  }

  /** The end of the message: what is still held goes out as it was. */
  end(): Buffer[] {
    const out: Buffer[] = [];
    const emit = (b: Buffer) => {
      if (b.length === 0) return;
      out.push(b);
      this.lastByte = b[b.length - 1];
    };
    if (this.heldCr) emit(CR_BUF);
    if (this.lineStart) this.emitHeld(emit, false);
    this.heldCr = false;
    return out;
  }

  private emitHeld(emit: (b: Buffer) => void, quote: boolean): void {
    let gt = this.heldGt + (quote ? 1 : 0);
    while (gt > 0) {
      const piece = Math.min(gt, COPY_CHUNK);
      emit(Buffer.alloc(piece, ">"));
      gt -= piece;
    }
    if (this.heldFrom > 0) emit(FROM_.subarray(0, this.heldFrom));
    this.heldGt = 0;
    this.heldFrom = 0;
  }
}

const FROM_ = Buffer.from("From ");

/* ------------------------------------------------------------------------------------ */
/* The journal                                                                           */

const pad2 = (n: number) => String(n).padStart(2, "0");

/** journal/2003_03_12_19: the hour of the seed's make_current_journal_file_name, local time. */
export function journalFileName(d: Date): string {
  return `${d.getFullYear()}_${pad2(d.getMonth() + 1)}_${pad2(d.getDate())}_${pad2(d.getHours())}`;
}

/** One line per event, to the hour's file and to the log function; file writes in order, batched per turn. */
class Journal {
  private pending: Array<[string, string]> = [];
  private writing: Promise<void> = Promise.resolve();
  private scheduled = false;
  private failedFiles = new Set<string>();

  constructor(private readonly dir: string, private readonly sink: (line: string) => void) {}

  line(peer: string, text: string): void {
    const now = new Date();
    const stamp = `${now.getFullYear()}-${pad2(now.getMonth() + 1)}-${pad2(now.getDate())} ` +
      `${pad2(now.getHours())}:${pad2(now.getMinutes())}:${pad2(now.getSeconds())}`;
    const line = `${stamp} ${peer} ${text}`;
    try {
      this.sink(line);
    } catch {
      // A log function that throws must not break a session.
    }
    this.pending.push([journalFileName(now), line]);
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.write());
    }
  }

  /** The hour's file, kept open between batches (opening and closing it per batch cost the receiver's loop 5%). */
  private open: { file: string; handle: fs.promises.FileHandle } | null = null;

  private async append(file: string, text: string): Promise<void> {
    if (this.open?.file !== file) {
      await this.shut();
      this.open = { file, handle: await fs.promises.open(path.join(this.dir, file), "a", 0o600) };
    }
    try {
      await this.open.handle.write(text);
    } catch (err) {
      await this.shut();
      throw err;
    }
  }

  private async shut(): Promise<void> {
    const open = this.open;
    this.open = null;
    await open?.handle.close().catch(() => undefined);
  }

  private write(): void {
    this.scheduled = false;
    const lines = this.pending;
    this.pending = [];
    this.writing = this.writing.then(async () => {
      let i = 0;
      while (i < lines.length) {
        const file = lines[i][0];
        let text = "";
        for (; i < lines.length && lines[i][0] === file; i++) text += `${lines[i][1]}\n`;
        try {
          await this.append(file, text);
        } catch (err) {
          if (!this.failedFiles.has(file)) {
            this.failedFiles.add(file);
            try {
              this.sink(`journal: cannot write ${path.join(this.dir, file)}: ${(err as Error).message}`);
            } catch {
              // as above
            }
          }
        }
      }
    });
  }

  /** Resolves when every line so far is in its file. */
  async flush(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    await this.writing;
  }

  /** Every line so far in its file, and the file closed (a line after this opens it again). */
  async close(): Promise<void> {
    await this.flush();
    this.writing = this.writing.then(() => this.shut());
    await this.writing;
  }
}

/* ------------------------------------------------------------------------------------ */
/* Mailboxes                                                                             */

/** In-process locks, one queue per mailbox: whoever comes next waits for the one before. */
class MailboxLocks {
  private readonly tails = new Map<string, Promise<void>>();

  async acquire(key: string): Promise<() => void> {
    const before = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => { release = resolve; });
    const tail = before.then(() => mine);
    this.tails.set(key, tail);
    await before;
    return () => {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
  }
}

class MailboxBusyError extends Error {
  constructor(lock: string) {
    super(`${lock}: held by another program for ${(LOCK_TRIES * LOCK_RETRY_MS) / 1000} s`);
    this.name = "MailboxBusyError";
  }
}

/** A mailbox the receiver will not write until an administrator fixes it. */
class MailboxRefusedError extends Error {
  constructor(file: string, problem: string) {
    super(`${file} ${problem}: refused, a mailbox must be a regular file with one link`);
    this.name = "MailboxRefusedError";
  }
}

/**
 * Why a file must not be written as a mailbox, from its lstat or fstat; null when it may.
 * A second hard link, like a symlink, would let whoever may write in the mailbox's folder
 * aim the server's writes at a file elsewhere.
 */
function mailboxProblem(st: fs.Stats): string | null {
  if (st.isSymbolicLink()) return "is a symbolic link";
  if (st.isDirectory()) return "is a directory";
  if (st.isFIFO()) return "is a FIFO";
  if (st.isSocket()) return "is a socket";
  if (st.isCharacterDevice() || st.isBlockDevice()) return "is a device";
  if (!st.isFile()) return "is not a regular file";
  if (st.nlink > 1) return `has ${st.nlink} hard links`;
  return null;
}

/** Opens users/<address>/mail for appending, created when missing; refuses anything but a regular file with one link. */
async function openMailbox(file: string): Promise<{ handle: fs.promises.FileHandle; size: number }> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, MAILBOX_OPEN_FLAGS, 0o600);
  } catch (err) {
    // The errno (ELOOP, EISDIR, ENXIO) names a symptom; lstat names what is there, for the journal.
    const st = await fs.promises.lstat(file).catch(() => null);
    const problem = st && mailboxProblem(st);
    throw problem ? new MailboxRefusedError(file, problem) : err;
  }
  try {
    const st = await handle.stat();
    const problem = mailboxProblem(st);
    if (problem) throw new MailboxRefusedError(file, problem);
    return { handle, size: st.size };
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}

/** users/<address>/mail.lock, created exclusively; other programs that use the convention wait for it. */
async function dotlock(dir: string): Promise<() => Promise<void>> {
  const lock = path.join(dir, "mail.lock");
  for (let tries = 0; ; tries++) {
    try {
      // O_CREAT|O_EXCL never follows a symlink at the name: a planted one is EEXIST, a lock held.
      const handle = await fs.promises.open(lock, "wx", 0o600);
      try {
        await handle.writeFile(`${process.pid}\n`);
      } finally {
        await handle.close();
      }
      return () => fs.promises.unlink(lock).catch(() => undefined);
    } catch (err) {
      if (errno(err) !== "EEXIST") throw err;
    }
    // The lock's own age, not that of whatever a symlink there points at.
    const st = await fs.promises.lstat(lock).catch(() => null);
    if (st && Date.now() - st.mtimeMs > LOCK_STALE_MS) {
      await fs.promises.unlink(lock).catch(() => undefined);
      continue;
    }
    if (tries >= LOCK_TRIES) throw new MailboxBusyError(lock);
    await new Promise((resolve) => setTimeout(resolve, LOCK_RETRY_MS));
  }
}

/** Writes every buffer, in order, with as few calls as the kernel allows; returns the octets written. */
async function writeAllV(handle: fs.promises.FileHandle, bufs: Buffer[]): Promise<number> {
  let rest = bufs.filter((b) => b.length > 0);
  let total = 0;
  while (rest.length > 0) {
    const { bytesWritten } = await handle.writev(rest);
    if (bytesWritten <= 0) throw new Error("write wrote nothing");
    total += bytesWritten;
    let skip = bytesWritten;
    while (rest.length > 0 && skip >= rest[0].length) skip -= rest.shift()!.length;
    if (skip > 0) rest[0] = rest[0].subarray(skip);
  }
  return total;
}

/** A message waiting for its mailboxes: its temp file and one prefix per mailbox (in the queue's order). */
interface Delivery {
  id: string;
  /** The message (as stored, without prefix and trailer): in memory, or in a temp file. */
  body: Buffer | null;
  tmp: string | null;
  /** Its octets. */
  bytes: number;
  lastByte: number;
  prefixes: Buffer[];
  /** Answers the session: null once the message is on disk, the error when it is in no mailbox. */
  done: (err: Error | null) => void;
}

/** The deliveries waiting for one set of mailboxes (their folders, sorted). */
interface CommitQueue {
  dirs: string[];
  waiting: Delivery[];
}

/** A mailbox open for a group: its size when the group began and as written so far. */
interface OpenMailbox {
  handle: fs.promises.FileHandle;
  file: string;
  oldSize: number;
  size: number;
}

/** The message ends its last line, and a blank line ends the message (mboxrd). */
function trailerOf(d: Delivery): Buffer {
  return d.lastByte === LF || d.lastByte < 0 ? LF_BUF : LF_LF;
}

/** The next group: the first delivery waiting, and those after it while they fit in GROUP_BYTES. */
function takeGroup(waiting: Delivery[]): Delivery[] {
  let n = 0;
  let bytes = 0;
  while (n < waiting.length && (n === 0 || bytes + waiting[n].bytes <= GROUP_BYTES)) bytes += waiting[n++].bytes;
  return waiting.splice(0, n);
}

/** A message could not be cut back out of a mailbox: nothing more may be appended behind it. */
class PartialMessageError extends Error {
  constructor(override readonly cause: Error) {
    super(cause.message);
    this.name = "PartialMessageError";
  }
}

/** The mbox "From " line's date: asctime(3) in local time, "Mon Nov 23 16:26:00 2026". */
export function asctime(d: Date): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  return `${days[d.getDay()]} ${months[d.getMonth()]} ${String(d.getDate()).padStart(2, " ")} ` +
    `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())} ${d.getFullYear()}`;
}

/** What goes before the message in one mailbox: the From_ line and the trace header fields. */
export function mboxPrefix(m: {
  sender: string; recipient: string; helo: string; ip: string; hostname: string; id: string; protocol: string; date: Date;
}): Buffer {
  // The From_ line is split on spaces by mbox readers: a quoted local part keeps none.
  const envelope = m.sender === "" ? "MAILER-DAEMON" : m.sender.replace(/\s/g, "_");
  const literal = net.isIPv6(m.ip) ? `[IPv6:${m.ip}]` : `[${m.ip}]`;
  const helo = printable(m.helo, 255).replace(/[()\s]/g, "?");
  return Buffer.from(
    `From ${envelope} ${asctime(m.date)}\n` +
    `Return-Path: <${printable(m.sender, 400)}>\n` +
    `Received: from ${helo} (${literal})\n` +
    `\tby ${m.hostname} (mudmail) with ${m.protocol} id ${m.id}\n` +
    `\tfor <${printable(m.recipient, 400)}>; ${rfc5322Date(m.date)}\n`,
  );
}

/* ------------------------------------------------------------------------------------ */
/* The server                                                                            */

class Receiver extends EventEmitter implements ServerHandle {
  address = { host: "", port: 0 };
  readonly journal: Journal;
  readonly locks = new MailboxLocks();
  readonly sessions = new Set<Session>();
  /** Connections answered 421 (too many), until they are gone. */
  private readonly refused = new Set<net.Socket>();
  private readonly listener: net.Server;
  private closing: Promise<void> | null = null;
  private sessionCounter = 0;
  private tmpCounter = 0;

  constructor(readonly options: Resolved) {
    super();
    this.journal = new Journal(path.join(options.maildir, "journal"), options.log);
    this.listener = net.createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
  }

  async listen(): Promise<void> {
    await new Spool(this.options.maildir).init();
    await new Promise<void>((resolve, reject) => {
      this.listener.once("error", reject);
      this.listener.listen({ host: this.options.host, port: this.options.port }, () => {
        this.listener.removeListener("error", reject);
        resolve();
      });
    });
    // After a successful listen the server's errors are per connection; keep them from crashing the host.
    this.listener.on("error", (err) => this.journal.line("-", `error: ${err.message}`));
    const addr = this.listener.address() as net.AddressInfo;
    this.address = { host: addr.address, port: addr.port };
    const tlsNote = this.options.secureContext ? ", STARTTLS offered" : "";
    this.journal.line("-", `listening on ${addr.family === "IPv6" ? `[${addr.address}]` : addr.address}:${addr.port} as ${this.options.hostname}${tlsNote}`);
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopped = new Promise<void>((resolve) => this.listener.close(() => resolve()));
      for (const socket of this.refused) socket.destroy();
      await Promise.all([...this.sessions].map((s) => s.shutdown()));
      await stopped;
      this.journal.line("-", "stopped");
      await this.journal.close();
    })();
    return this.closing;
  }

  private accept(socket: net.Socket): void {
    const ip = clientIp(socket.remoteAddress);
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.on("error", () => undefined);
    if (this.sessions.size >= this.options.maxSessions) {
      this.journal.line(ip, `refused: too many sessions (${this.options.maxSessions})`);
      this.refused.add(socket);
      const kill = setTimeout(() => socket.destroy(), CLOSE_GRACE_MS);
      socket.on("close", () => {
        clearTimeout(kill);
        this.refused.delete(socket);
      });
      socket.on("data", () => undefined); // read and forget, so the close comes
      socket.on("end", () => socket.end());
      socket.end(`421 4.7.0 ${this.options.hostname} Error: too many connections\r\n`);
      return;
    }
    const session = new Session(this, socket, ++this.sessionCounter, ip);
    this.sessions.add(session);
    session.finished.then(() => this.sessions.delete(session));
    session.start();
  }

  /** A name in tmp/ no one else uses: the receiver's own prefix, the pid, a counter. */
  tmpPath(id: string): string {
    return path.join(this.options.maildir, "tmp", `receiver.${process.pid}.${this.tmpCounter++}.${id}`);
  }

  /**
   * The mailbox directory of a local user, or null when there is none. A directory found is
   * remembered for USER_CACHE_MS (a stat per RCPT is a tenth of the receiver's time under a
   * flood); one not found is looked for again at the next RCPT, so a new user works at once.
   */
  async userDir(address: string): Promise<string | null> {
    const name = address.toLowerCase();
    if (name.includes("/") || name.includes("\0") || name === "" || name.startsWith(".")) return null;
    const now = Date.now();
    const known = this.users.get(name);
    if (known && now - known.at < USER_CACHE_MS) return known.dir;
    const dir = path.join(this.options.maildir, "users", name);
    const st = await fs.promises.stat(dir).catch(() => null);
    if (!st || !st.isDirectory()) {
      this.users.delete(name);
      return null;
    }
    if (this.users.size >= USER_CACHE_SIZE) this.users.clear();
    this.users.set(name, { dir, at: now });
    return dir;
  }

  /** Local users found lately: their directory and when it was seen. */
  private readonly users = new Map<string, { dir: string; at: number }>();

  /**
   * Appends the message (`bytes` octets, in memory or in a temp file) to every mailbox, all
   * or none, and resolves once it is on disk there. Messages for the same mailboxes are committed in
   * groups (group commit): while one group is written and synced, the next gathers, and
   * then goes in under one taking of the locks with one fsync per mailbox. A group is every
   * message that waits when its locks are taken, up to GROUP_BYTES.
   */
  deliver(
    id: string, message: { body: Buffer; tmp: null } | { body: null; tmp: string }, bytes: number, lastByte: number,
    boxes: Array<{ dir: string; prefix: Buffer }>,
  ): Promise<void> {
    const sorted = [...boxes].sort((a, b) => (a.dir < b.dir ? -1 : a.dir > b.dir ? 1 : 0));
    const dirs = sorted.map((b) => b.dir);
    const key = dirs.join("\0");
    return new Promise<void>((resolve, reject) => {
      const delivery: Delivery = {
        id, ...message, bytes, lastByte, prefixes: sorted.map((b) => b.prefix), done: (err) => (err ? reject(err) : resolve()),
      };
      const queue = this.commits.get(key);
      if (queue) {
        queue.waiting.push(delivery);
        return;
      }
      const fresh: CommitQueue = { dirs, waiting: [delivery] };
      this.commits.set(key, fresh);
      void this.commitLoop(key, fresh);
    });
  }

  /** Deliveries waiting for their mailboxes, by the mailboxes (sorted, joined); one loop commits each queue. */
  private readonly commits = new Map<string, CommitQueue>();

  private async commitLoop(key: string, queue: CommitQueue): Promise<void> {
    try {
      while (queue.waiting.length > 0) await this.commitGroup(queue);
    } catch (err) {
      // commitGroup settles every delivery it takes; this is for a bug, so no session hangs.
      for (const d of queue.waiting.splice(0)) d.done(err as Error);
    } finally {
      this.commits.delete(key);
    }
  }

  /**
   * One group: the in-process lock and the dotlock of every mailbox in sorted order; then
   * each message appended to every mailbox (a message that fails is cut back out of all of
   * them, the others stay); then one fsync per mailbox and its folder, and only then is any
   * message of the group answered. A failed sync cuts every mailbox back to where the group
   * began: none of the group's messages is stored, every one is answered 451.
   */
  private async commitGroup(queue: CommitQueue): Promise<void> {
    const unlock: Array<() => void | Promise<void>> = [];
    const open: OpenMailbox[] = [];
    let group: Delivery[] = [];
    const failed = new Map<Delivery, Error>();
    try {
      try {
        for (const dir of queue.dirs) {
          unlock.push(await this.locks.acquire(dir));
          unlock.push(await dotlock(dir));
        }
      } finally {
        // Whatever arrived while the locks were being taken joins this group.
        group = takeGroup(queue.waiting);
      }
      for (const dir of queue.dirs) {
        const file = path.join(dir, "mail");
        const { handle, size } = await openMailbox(file);
        open.push({ handle, file, oldSize: size, size });
      }
      const buf = Buffer.allocUnsafe(COPY_CHUNK);
      for (let i = 0; i < group.length;) {
        // Messages held in memory go in together, one write per mailbox; a temp file alone.
        let j = i + 1;
        if (group[i].body) while (j < group.length && group[j].body) j++;
        await this.appendRun(group.slice(i, j), open, buf, failed);
        i = j;
      }
      // Synced even when every message failed: a message cut back out must stay out.
      for (const o of open) await o.handle.sync();
      if (failed.size < group.length) {
        // A mailbox's name is made durable when it is new (or empty: perhaps new); the
        // names of mailboxes with mail in them were made durable when they were new.
        for (let i = 0; i < open.length; i++) if (open[i].oldSize === 0) await syncDir(queue.dirs[i]);
        const ids = group.filter((d) => !failed.has(d)).map((d) => d.id);
        this.journal.line("-", `synced ${ids.length} message${ids.length === 1 ? "" : "s"} (${ids.join(",")}) into ${open.map((o) => o.file).join(",")}`);
      }
    } catch (err) {
      for (const d of group) if (!failed.has(d)) failed.set(d, err as Error);
      for (const o of open) {
        try {
          await o.handle.truncate(o.oldSize);
          await o.handle.sync();
        } catch (undo) {
          this.journal.line("-", `error: cannot truncate ${o.file} back to ${o.oldSize} octets, it may end in a partial message: ${(undo as Error).message}`);
        }
      }
    } finally {
      for (const o of open) await o.handle.close().catch(() => undefined);
      for (const release of unlock.reverse()) await release();
    }
    for (const d of group) d.done(failed.get(d) ?? null);
  }

  /**
   * Appends messages to every open mailbox, all in one write per mailbox; when that fails,
   * one at a time, so that only those that cannot be written fail (in `failed`). Throws
   * only when a mailbox could not be cut back (the group cannot go on).
   */
  private async appendRun(run: Delivery[], open: OpenMailbox[], buf: Buffer, failed: Map<Delivery, Error>): Promise<void> {
    if (run.length > 1) {
      const starts = open.map((o) => o.size);
      try {
        for (let i = 0; i < open.length; i++) {
          open[i].size += await writeAllV(open[i].handle, run.flatMap((d) => [d.prefixes[i], d.body!, trailerOf(d)]));
        }
        return;
      } catch {
        await this.cutBack(open, starts);
      }
    }
    for (const d of run) {
      try {
        await this.append(d, open, buf);
      } catch (err) {
        if (err instanceof PartialMessageError) throw err.cause;
        failed.set(d, err as Error);
      }
    }
  }

  /** Truncates each mailbox back to its size in `starts`; a PartialMessageError when one cannot be. */
  private async cutBack(open: OpenMailbox[], starts: number[], cause?: Error): Promise<void> {
    for (let i = 0; i < open.length; i++) {
      try {
        await open[i].handle.truncate(starts[i]);
        open[i].size = starts[i];
      } catch (undo) {
        this.journal.line("-", `error: cannot truncate ${open[i].file} back to ${starts[i]} octets, it may end in a partial message: ${(undo as Error).message}`);
        throw new PartialMessageError(cause ?? (undo as Error));
      }
    }
  }

  /**
   * Appends one message to every open mailbox: its prefix, the message, the blank line that
   * ends it (mboxrd). On failure each mailbox is truncated back to where the message began
   * and the error is thrown; when that truncation fails too, a PartialMessageError.
   */
  private async append(d: Delivery, open: OpenMailbox[], buf: Buffer): Promise<void> {
    const starts = open.map((o) => o.size);
    const trailer = trailerOf(d);
    let source: fs.promises.FileHandle | null = null;
    try {
      if (d.body) {
        for (let i = 0; i < open.length; i++) open[i].size += await writeAllV(open[i].handle, [d.prefixes[i], d.body, trailer]);
        return;
      }
      // Only a message past HOLD_BYTES has a temp file: copied in pieces of buf.
      source = await fs.promises.open(d.tmp!, "r");
      for (let i = 0; i < open.length; i++) open[i].size += await writeAllV(open[i].handle, [d.prefixes[i]]);
      for (;;) {
        const { bytesRead } = await source.read(buf, 0, buf.length, null);
        if (bytesRead === 0) break;
        for (const o of open) o.size += await writeAllV(o.handle, [buf.subarray(0, bytesRead)]);
      }
      for (const o of open) o.size += await writeAllV(o.handle, [trailer]);
    } catch (err) {
      await this.cutBack(open, starts, err as Error);
      throw err;
    } finally {
      await source?.close().catch(() => undefined);
    }
  }

  report(message: StoredMessage): void {
    try {
      this.emit("message", message);
    } catch (err) {
      this.journal.line("-", `error: a "message" listener threw: ${(err as Error).message}`);
    }
  }
}


function clientIp(address: string | undefined): string {
  if (!address) return "unknown";
  return address.startsWith("::ffff:") && net.isIPv4(address.slice(7)) ? address.slice(7) : address;
}

/* ------------------------------------------------------------------------------------ */
/* Sessions                                                                              */

/** Where a session is; only moves forward within a transaction, back to Helo when one ends. */
enum Stage { Greeting = 0, Helo = 1, Mail = 2, Rcpt = 3, Data = 4 }

/** One DATA transfer: the framing, the encoding, the message held in memory or in a temp file. */
interface Transfer {
  decoder: DotDecoder;
  encoder: MboxEncoder;
  /** The message as encoded so far, while it fits in HOLD_BYTES. */
  held: Buffer[];
  /** The temp file, once the message outgrew HOLD_BYTES. */
  handle: fs.promises.FileHandle | null;
  path: string | null;
  /** Message octets passed on to the encoder (stops at maxSize). */
  stored: number;
  /** Octets encoded and kept (held or written to the temp file). */
  written: number;
  tooBig: boolean;
  failed: Error | null;
}

class Session {
  private socket: net.Socket;
  private stage = Stage.Greeting;
  private helo = "";
  private esmtp = false;
  private tls = false;
  private tlsPending = false;
  /** The transaction: sender, accepted recipients and their mailboxes, refused RCPTs. */
  private sender = "";
  private recipients: string[] = [];
  private boxes = new Map<string, { dir: string; recipient: string }>();
  private refusedRecipients = 0;
  /** RFC 3461: MAIL's RET and ENVID (decoded), and every accepted RCPT's NOTIFY and ORCPT. */
  private ret: "full" | "hdrs" | null = null;
  private envid: string | null = null;
  private dsnRecipients: DsnRecipient[] = [];
  private transfer: Transfer | null = null;
  /** Counters for the journal and the limits. */
  private errors = 0;
  private commands = 0;
  private messages = 0;
  private lastCommand = "CONNECT";
  /** Input not handled yet; a command line in pieces (at most MAX_COMMAND_LINE octets). */
  private pending: Buffer[] = [];
  private partial: Buffer[] = [];
  private partialLength = 0;
  private discarding = false;
  private pumping = false;
  /** Set by STARTTLS: what the client sent behind it is dropped. */
  private upgraded = false;
  private outbox: string[] = [];
  private outboxBytes = 0;
  /** When the client's current time to speak began (Date.now()). */
  private waitingSince = Date.now();
  private timer: NodeJS.Timeout | null = null;
  private killTimer: NodeJS.Timeout | null = null;
  private closing = false;
  private closed = false;
  private peerEnded = false;
  private quit = false;
  private settle!: () => void;
  readonly finished: Promise<void>;

  constructor(private readonly server: Receiver, socket: net.Socket, readonly number: number, readonly ip: string) {
    this.socket = socket;
    this.finished = new Promise((resolve) => { this.settle = resolve; });
  }

  private get o(): Resolved {
    return this.server.options;
  }

  start(): void {
    this.socket.setNoDelay(true);
    this.attach(this.socket);
    this.log(`connect from ${net.isIPv6(this.ip) ? `[${this.ip}]` : this.ip}:${this.socket.remotePort} (session ${this.number}, ${this.server.sessions.size} open)`);
    this.reply(`220 ${this.o.hostname} ESMTP mudmail`);
    this.flush();
    this.armTimer();
  }

  /** close(): 421 to a session that waits for input, or after the step under way. */
  shutdown(): Promise<void> {
    if (!this.closing && !this.pumping) this.close(`421 4.3.2 ${this.o.hostname} Service shutting down, closing transmission channel`, "server shutting down");
    // A pumping session sees `closing` when its step is done (see pump()).
    if (this.pumping && !this.closing) this.shutdownRequested = true;
    return this.finished;
  }

  private shutdownRequested = false;

  private log(text: string): void {
    this.server.journal.line(this.ip, text);
  }

  /* -- the socket ---------------------------------------------------------------------- */

  private readonly onData = (chunk: Buffer) => {
    if (this.closing) return;
    this.pending.push(chunk);
    if (this.transfer) this.waitingSince = Date.now(); // DATA: time runs per piece
    void this.pump();
  };

  private readonly onEnd = () => {
    this.peerEnded = true;
    if (!this.pumping) this.afterPump();
  };

  private readonly onClose = () => {
    this.closed = true;
    this.closing = true;
    this.clearTimer();
    if (this.killTimer) clearTimeout(this.killTimer);
    if (!this.pumping) void this.finish();
  };

  private readonly onError = (err: Error) => {
    if (!this.closing) this.log(`error: ${printable(err.message)}`);
  };

  private attach(socket: net.Socket): void {
    socket.on("data", this.onData);
    socket.on("end", this.onEnd);
    socket.on("close", this.onClose);
    socket.on("error", this.onError);
  }

  private detach(socket: net.Socket): void {
    socket.removeListener("data", this.onData);
    socket.removeListener("end", this.onEnd);
    socket.removeListener("close", this.onClose);
    socket.removeListener("error", this.onError);
    socket.on("error", () => undefined);
  }

  /* -- timers -------------------------------------------------------------------------- */

  private armTimer(): void {
    this.clearTimer();
    if (this.closing) return;
    const left = this.waitingSince + this.o.commandTimeout * 1000 - Date.now();
    this.timer = setTimeout(() => this.timeout(), Math.max(0, left));
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private timeout(): void {
    this.timer = null;
    if (this.closing || this.pumping) return;
    const what = this.transfer ? `timeout after DATA (${this.transfer.decoder.size} octets)` : `timeout after ${this.lastCommand}`;
    if (this.tlsPending) {
      // Nothing can be said: the client owes us a handshake, not a command.
      this.log(`${what}: no TLS handshake`);
      this.closing = true;
      this.socket.destroy();
      return;
    }
    this.close(`421 4.4.2 ${this.o.hostname} Error: timeout exceeded`, what);
  }

  /* -- output -------------------------------------------------------------------------- */

  private reply(text: string): void {
    this.outbox.push(`${text}\r\n`);
    this.outboxBytes += text.length + 2;
  }

  private flush(): void {
    if (this.outbox.length === 0) return;
    const text = this.outbox.join("");
    this.outbox = [];
    this.outboxBytes = 0;
    if (this.closed || this.socket.destroyed || !this.socket.writable) return;
    this.socket.write(text);
  }

  /** A reply that is the client's fault: counted; at maxErrors the session ends. */
  private error(text: string, note?: string): void {
    this.reply(text);
    this.errors++;
    this.log(`${note ?? this.lastCommand}: ${text}`);
    if (this.errors >= this.o.maxErrors) this.close(`421 4.7.0 ${this.o.hostname} Error: too many errors`, `too many errors (${this.errors})`);
  }

  /** Our replies wait until the input runs dry; a client that does not read them stalls us, within the timeout. */
  private async drain(): Promise<void> {
    if (this.outboxBytes >= OUTBOX_FLUSH) this.flush();
    if (!this.socket.writableNeedDrain || this.closed) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(limit);
        this.socket.removeListener("drain", done);
        this.socket.removeListener("close", done);
        resolve();
      };
      const limit = setTimeout(() => {
        this.log(`timeout after ${this.lastCommand}: the client does not read its replies`);
        this.socket.destroy();
        done();
      }, this.o.commandTimeout * 1000);
      this.socket.once("drain", done);
      this.socket.once("close", done);
    });
  }

  /* -- the pump ------------------------------------------------------------------------ */

  /** Handles all input received, strictly in order; one at a time. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    this.clearTimer();
    this.socket.pause();
    try {
      while (this.pending.length > 0 && !this.closing) {
        const chunk = this.pending.shift()!;
        let at = 0;
        while (at < chunk.length && !this.closing) {
          at = this.transfer ? await this.dataBytes(chunk, at) : await this.commandBytes(chunk, at);
          if (this.upgraded) {
            this.dropAfterStartTls(chunk.length - at);
            at = chunk.length;
          }
          await this.drain();
        }
      }
    } catch (err) {
      this.log(`error: ${printable((err as Error).stack ?? String(err), 1000)}`);
      this.close(`421 4.3.0 ${this.o.hostname} Error: internal error`, "internal error");
    } finally {
      this.flush();
      this.pumping = false;
    }
    this.afterPump();
  }

  private afterPump(): void {
    if (this.closed) {
      void this.finish();
      return;
    }
    if (this.shutdownRequested && !this.closing) {
      this.close(`421 4.3.2 ${this.o.hostname} Service shutting down, closing transmission channel`, "server shutting down");
    }
    if (this.peerEnded && !this.closing) {
      // A transfer cut short is reported (and dropped) by finish().
      this.close(null, this.transfer ? null : `lost connection after ${this.lastCommand}`);
    }
    if (this.closing) return;
    if (this.pending.length > 0) {
      void this.pump();
      return;
    }
    this.armTimer();
    this.socket.resume();
  }

  /** Ends the session: the last reply, then FIN; the socket is destroyed if the client lingers. */
  private close(lastReply: string | null, why: string | null): void {
    if (this.closing) return;
    this.closing = true;
    this.clearTimer();
    if (lastReply) this.reply(lastReply);
    if (why) this.log(why);
    this.flush();
    if (!this.closed) {
      this.socket.end();
      this.socket.resume(); // read and forget whatever still comes, so the close comes
      this.killTimer = setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS);
    }
  }

  /** The socket is gone and no step is under way: drop a half-received message, say so, settle. */
  private async finish(): Promise<void> {
    if (this.finishing) return;
    this.finishing = true;
    if (this.killTimer) clearTimeout(this.killTimer);
    const transfer = this.transfer;
    this.transfer = null;
    if (transfer) {
      // Said once the partial file is gone, so "dropped" is true when it is read.
      await discard(transfer);
      this.log(`lost connection after DATA (${transfer.decoder.size} octets): message dropped`);
    }
    this.log(`disconnect${this.quit ? "" : ` after ${this.lastCommand}`} (commands=${this.commands} messages=${this.messages} errors=${this.errors})`);
    this.settle();
  }

  private finishing = false;

  /* -- commands ------------------------------------------------------------------------ */

  /** Takes one command line out of the input (or keeps a piece of one); returns where it stopped. */
  private async commandBytes(chunk: Buffer, at: number): Promise<number> {
    const lf = chunk.indexOf(LF, at);
    if (lf < 0) {
      this.keepPartial(chunk.subarray(at));
      return chunk.length;
    }
    const next = lf + 1;
    if (this.discarding) {
      this.discarding = false;
      this.commands++;
      this.error(R.lineTooLong, "line too long");
      return next;
    }
    let line = chunk.subarray(at, lf);
    if (this.partialLength > 0) {
      line = Buffer.concat([...this.partial, line]);
      this.partial = [];
      this.partialLength = 0;
    }
    if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
    this.commands++;
    if (line.length > lineLimit(line) - 2) {
      this.error(R.lineTooLong, "line too long");
      return next;
    }
    this.waitingSince = Date.now();
    await this.command(line.toString("utf8"));
    return next;
  }

  /** A piece of a command line: kept up to the limit, then dropped as it comes until its line end. */
  private keepPartial(piece: Buffer): void {
    if (this.discarding || piece.length === 0) return;
    // One octet more than a line may hold, for the CR whose LF is still on its way; the
    // verb decides the limit once the line is whole.
    if (this.partialLength + piece.length > MAX_PARAMS_LINE - 1) {
      this.discarding = true;
      this.partial = [];
      this.partialLength = 0;
      return;
    }
    this.partial.push(Buffer.from(piece));
    this.partialLength += piece.length;
  }

  private async command(line: string): Promise<void> {
    // eslint-disable-next-line no-control-regex
    const m = /[\x00-\x08\x0a-\x1f\x7f]/.test(line) ? null : COMMAND.exec(line);
    if (!m) {
      this.lastCommand = "junk";
      this.error(R.badSyntax, `bad syntax: ${JSON.stringify(printable(line, 80))}`);
      return;
    }
    const verb = m[1].toUpperCase();
    const arg = m[2] ?? "";
    this.lastCommand = verb;
    switch (verb) {
      case "HELO":
      case "EHLO": return this.hello(verb, arg);
      case "MAIL": return this.mail(arg);
      case "RCPT": return this.rcpt(arg);
      case "DATA": return this.data(arg);
      case "RSET":
        if (arg) return this.error("501 5.5.4 Syntax: RSET");
        this.resetTransaction();
        this.reply(R.ok);
        return;
      case "NOOP":
        this.reply(R.ok);
        return;
      case "QUIT":
        this.quit = true;
        this.log("quit");
        this.close(`221 2.0.0 ${this.o.hostname} Service closing transmission channel`, null);
        return;
      case "HELP": return this.help(arg);
      case "VRFY":
        if (!arg) return this.error("501 5.5.4 Syntax: VRFY address");
        this.log(`vrfy ${printable(arg, 100)}: 252`);
        this.reply(R.vrfy);
        return;
      case "EXPN": return this.error(R.expn);
      case "STARTTLS": return this.startTls(arg);
      default:
        this.error(R.unknownCommand, `unknown command ${printable(verb, 40)}`);
    }
  }

  private resetTransaction(): void {
    this.sender = "";
    this.recipients = [];
    this.boxes = new Map();
    this.refusedRecipients = 0;
    this.ret = null;
    this.envid = null;
    this.dsnRecipients = [];
    if (this.stage > Stage.Helo) this.stage = Stage.Helo;
  }

  private hello(verb: "HELO" | "EHLO", arg: string): void {
    const name = arg.split(/[ \t]+/)[0];
    if (!name) return this.error(verb === "HELO" ? R.heloSyntax : R.ehloSyntax);
    this.resetTransaction();
    this.helo = name;
    this.esmtp = verb === "EHLO";
    this.stage = Stage.Helo;
    this.log(`${verb.toLowerCase()} ${printable(name, 255)}`);
    if (verb === "HELO") {
      this.reply(`250 ${this.o.hostname}`);
      return;
    }
    const lines = [this.o.hostname, `SIZE ${this.o.maxSize}`, "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"];
    if (this.o.secureContext && !this.tls) lines.push("STARTTLS");
    lines.push("HELP");
    lines.forEach((text, i) => this.reply(`250${i === lines.length - 1 ? " " : "-"}${text}`));
  }

  private mail(arg: string): void {
    if (this.stage < Stage.Helo) return this.error(R.needHelo);
    if (this.stage >= Stage.Mail) return this.error(R.nestedMail);
    const m = /^FROM:(.*)$/is.exec(arg);
    const p = m ? parsePath(m[1]) : null;
    if (!p) return this.error(R.mailSyntax);
    const address = p.address;
    if (address !== "" && addressProblem(address)) {
      return this.error(R.badSender, `mail from=<${printable(address, 100)}>: ${addressProblem(address)}`);
    }
    let size: number | null = null;
    let body = "7BIT";
    let ret: "full" | "hdrs" | null = null;
    let envid: string | null = null;
    const seen = new Set<string>();
    for (const param of p.params) {
      const { key, value } = splitParam(param);
      const note = `mail from=<${printable(address, 400)}> ${printable(param, 200)}`;
      const dsn = key === "RET" || key === "ENVID";
      if (!(key === "SIZE" || key === "BODY" || (dsn && this.esmtp))) {
        // RFC 3461's parameters are an ESMTP extension: after HELO they are as unknown as any other.
        return this.error(`555 5.5.4 Unsupported option: ${printable(key, 40)}`, note);
      }
      if (seen.has(key)) return this.error(duplicate(key), note);
      seen.add(key);
      switch (key) {
        case "SIZE":
          if (value === null || !/^\d{1,15}$/.test(value)) return this.error(R.badSize, note);
          size = Number(value);
          break;
        case "BODY":
          if (value === null || !/^(7BIT|8BITMIME)$/i.test(value)) return this.error(R.badBody, note);
          body = value.toUpperCase();
          break;
        case "RET":
          ret = parseRet(value);
          if (ret === null) return this.error(badValue(key), note);
          break;
        case "ENVID":
          envid = parseEnvid(value);
          if (envid === null) return this.error(badValue(key), note);
          break;
      }
    }
    if (size !== null && size > this.o.maxSize) {
      this.reply(R.sizeExceeded);
      this.log(`mail from=<${printable(address, 100)}> size=${size}: refused: ${R.sizeExceeded}`);
      return;
    }
    this.sender = address;
    this.ret = ret;
    this.envid = envid;
    this.stage = Stage.Mail;
    const dsnNote = `${ret !== null ? ` ret=${ret.toUpperCase()}` : ""}${envid !== null ? ` envid=${xtext(envid)}` : ""}`;
    this.log(`mail from=<${printable(address, 400)}>${size !== null ? ` size=${size}` : ""} body=${body}${dsnNote}`);
    this.reply(R.mailOk);
  }

  private async rcpt(arg: string): Promise<void> {
    if (this.stage < Stage.Mail) return this.error(R.needMail);
    const m = /^TO:(.*)$/is.exec(arg);
    const p = m ? parsePath(m[1]) : null;
    if (!p || p.address === "") return this.error(R.rcptSyntax);
    let shown = `rcpt to=<${printable(p.address, 400)}>`;
    let notify: DsnNotify[] | null = null;
    let orcpt: DsnOrcpt | null = null;
    const seen = new Set<string>();
    for (const param of p.params) {
      const { key, value } = splitParam(param);
      const note = `${shown} ${printable(param, 600)}`;
      if (!((key === "NOTIFY" || key === "ORCPT") && this.esmtp)) return this.error(`555 5.5.4 Unsupported option: ${printable(key, 40)}`, note);
      if (seen.has(key)) return this.error(duplicate(key), note);
      seen.add(key);
      if (key === "NOTIFY") {
        notify = parseNotify(value);
        if (notify === null) return this.error(badValue(key), note);
      } else {
        orcpt = parseOrcpt(value);
        if (orcpt === null) return this.error(badValue(key), note);
      }
    }
    if (notify) shown += ` notify=${notify.join(",").toUpperCase()}`;
    if (orcpt) shown += ` orcpt=${orcpt.type};${xtext(orcpt.address)}`;
    if (this.recipients.length >= this.o.maxRecipients) {
      this.reply(R.tooManyRecipients);
      this.log(`${shown}: refused: ${R.tooManyRecipients}`);
      return;
    }
    // RFC 5321 4.5.1: <postmaster> without a domain must be accepted; it is postmaster@<hostname>.
    const address = /^postmaster$/i.test(p.address) ? `postmaster@${this.o.hostname}` : p.address;
    if (addressProblem(address)) {
      this.refusedRecipients++;
      return this.error(R.badRecipient, `${shown}: ${addressProblem(address)}`);
    }
    const dir = await this.server.userDir(address);
    if (dir === null) {
      this.refusedRecipients++;
      return this.error(`550 5.1.1 <${printable(p.address, 400)}>: Recipient address rejected: User unknown`, `${shown}: refused`);
    }
    const key = address.toLowerCase();
    if (!this.boxes.has(key)) this.boxes.set(key, { dir, recipient: address });
    this.recipients.push(address);
    this.dsnRecipients.push({ rcpt: address, notify, orcpt });
    this.stage = Stage.Rcpt;
    this.log(`${shown}: accepted`);
    this.reply(R.rcptOk);
  }

  private async data(arg: string): Promise<void> {
    if (arg) return this.error("501 5.5.4 Syntax: DATA");
    if (this.stage < Stage.Mail) return this.error(R.needMail);
    if (this.stage < Stage.Rcpt) return this.error(this.refusedRecipients > 0 ? R.noValidRecipients : R.needRcpt);
    this.transfer = { decoder: new DotDecoder(), encoder: new MboxEncoder(), held: [], handle: null, path: null, stored: 0, written: 0, tooBig: false, failed: null };
    this.stage = Stage.Data;
    this.reply(R.startData);
  }

  private help(arg: string): void {
    const topic = arg.trim().toUpperCase();
    if (topic === "") {
      const verbs = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN"];
      if (this.o.secureContext) verbs.push("STARTTLS");
      this.reply(`214-2.0.0 Commands: ${verbs.join(" ")}`);
      this.reply("214 2.0.0 HELP <command> for one of them; mail is accepted for local users only");
      return;
    }
    const text = HELP[topic];
    if (!text || (topic === "STARTTLS" && !this.o.secureContext)) return this.error(R.helpUnknown);
    this.reply(`214 2.0.0 ${text}`);
  }

  /* -- STARTTLS (RFC 3207) ------------------------------------------------------------- */

  private startTls(arg: string): void {
    if (!this.o.secureContext) return this.error(R.unknownCommand, "STARTTLS not offered");
    if (arg) return this.error("501 5.5.4 Syntax: STARTTLS");
    if (this.tls) return this.error(R.tlsActive);
    if (this.stage >= Stage.Mail) return this.error(R.tlsInTransaction);
    this.reply(R.startTls);
    this.flush();
    const raw = this.socket;
    this.detach(raw);
    // Plaintext the client sent behind STARTTLS is dropped, wherever it waits: in this chunk
    // and the ones after it (pump), and in the socket's own buffer (here).
    let dropped = 0;
    for (let b: Buffer | null; (b = raw.read() as Buffer | null) !== null;) dropped += b.length;
    this.droppedPlaintext = dropped;
    const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: this.o.secureContext });
    this.socket = secure;
    this.tlsPending = true;
    this.upgraded = true;
    this.attach(secure);
    secure.once("secure", () => {
      this.tlsPending = false;
      this.tls = true;
      // RFC 3207 4.2: forget everything learned before; the client starts with EHLO again.
      this.resetTransaction();
      this.stage = Stage.Greeting;
      this.helo = "";
      this.esmtp = false;
      const cipher = secure.getCipher();
      this.log(`starttls: ${secure.getProtocol() ?? "TLS"} ${cipher?.name ?? ""}`.trimEnd());
      this.waitingSince = Date.now();
      if (!this.pumping) this.armTimer();
    });
  }

  private droppedPlaintext = 0;

  private dropAfterStartTls(restOfChunk: number): void {
    this.upgraded = false;
    let dropped = this.droppedPlaintext + restOfChunk;
    for (const chunk of this.pending) dropped += chunk.length;
    this.pending = [];
    this.partial = [];
    this.partialLength = 0;
    this.discarding = false;
    this.droppedPlaintext = 0;
    if (dropped > 0) this.log(`starttls: dropped ${dropped} octets the client sent behind STARTTLS`);
    this.waitingSince = Date.now();
  }

  /* -- DATA ---------------------------------------------------------------------------- */

  /** Message bytes: decoded, encoded, held (or written to the temp file); at the end, delivered. */
  private async dataBytes(chunk: Buffer, at: number): Promise<number> {
    const t = this.transfer!;
    const { out, done, next } = t.decoder.push(chunk, at);
    const encoded: Buffer[] = [];
    for (const piece of out) {
      if (t.tooBig) break;
      const room = this.o.maxSize - t.stored;
      const take = piece.length > room ? piece.subarray(0, room) : piece;
      if (piece.length > room) t.tooBig = true;
      t.stored += take.length;
      encoded.push(...t.encoder.push(take));
    }
    if (done && !t.tooBig) encoded.push(...t.encoder.end());
    if (encoded.length > 0 && !t.failed && !t.tooBig) {
      try {
        await this.keep(t, encoded);
      } catch (err) {
        t.failed = err as Error;
      }
    }
    if (done) await this.endOfData(t);
    return next;
  }

  /** Keeps encoded bytes: in memory while the message fits in HOLD_BYTES, else in a temp file (made then). */
  private async keep(t: Transfer, encoded: Buffer[]): Promise<void> {
    const length = encoded.reduce((sum, b) => sum + b.length, 0);
    if (!t.handle && t.written + length <= HOLD_BYTES) {
      // A copy: the socket's chunk it came in is not kept alive by a piece of it.
      t.held.push(encoded.length === 1 ? Buffer.from(encoded[0]) : Buffer.concat(encoded, length));
      t.written += length;
      return;
    }
    if (!t.handle) {
      t.path = this.server.tmpPath(newId());
      t.handle = await fs.promises.open(t.path, "wx", 0o600);
      encoded = [...t.held, ...encoded];
      t.held = [];
    }
    await writeAllV(t.handle, encoded);
    t.written += length;
  }

  private async endOfData(t: Transfer): Promise<void> {
    this.transfer = null;
    const size = t.decoder.size;
    const id = newId();
    try {
      await t.handle?.close().catch((err) => { t.failed ??= err as Error; });
      if (t.tooBig) {
        this.reply(R.tooBig);
        this.log(`message refused: ${size} octets, more than the limit of ${this.o.maxSize}: ${R.tooBig}`);
        return;
      }
      if (t.failed) {
        this.reply(R.writeError);
        this.log(`error: writing ${t.path ?? "the message"}: ${t.failed.message}: ${R.writeError}`);
        return;
      }
      const date = new Date();
      const protocol = this.esmtp ? (this.tls ? "ESMTPS" : "ESMTP") : (this.tls ? "SMTPS" : "SMTP");
      const boxes = [...this.boxes.values()].map((b) => ({
        dir: b.dir,
        prefix: mboxPrefix({ sender: this.sender, recipient: b.recipient, helo: this.helo, ip: this.ip, hostname: this.o.hostname, id, protocol, date }),
      }));
      try {
        const message = t.path ? { tmp: t.path, body: null } : { tmp: null, body: t.held.length === 1 ? t.held[0] : Buffer.concat(t.held) };
        await this.server.deliver(id, message, t.written, t.encoder.lastByte, boxes);
      } catch (err) {
        const reply = err instanceof MailboxBusyError ? R.mailboxBusy : err instanceof MailboxRefusedError ? R.mailboxRefused : R.writeError;
        this.reply(reply);
        this.log(`error: delivering ${id}: ${(err as Error).message}: ${reply}`);
        return;
      }
      const mailboxes = boxes.map((b) => path.join(b.dir, "mail"));
      this.messages++;
      this.reply(`250 2.0.0 Ok: queued as ${id}`);
      this.log(`stored id=${id} from=<${printable(this.sender, 400)}> size=${size} nrcpt=${mailboxes.length} mailboxes=${mailboxes.join(",")}`);
      this.server.report({
        id, from: this.sender, to: [...this.boxes.values()].map((b) => b.recipient), size, mailboxes,
        dsn: { ret: this.ret, envid: this.envid, recipients: this.dsnRecipients },
      });
    } finally {
      t.held = [];
      if (t.path) await fs.promises.unlink(t.path).catch(() => undefined);
      this.resetTransaction();
      this.waitingSince = Date.now();
    }
  }
}

/** The longest a command line may be, CRLF included: MAIL and RCPT may carry RFC 3461's parameters. */
function lineLimit(line: Buffer): number {
  const verb = line.subarray(0, 5).toString("latin1").toUpperCase();
  return /^(MAIL|RCPT)[ \t]$/.test(verb) ? MAX_PARAMS_LINE : MAX_COMMAND_LINE;
}

async function discard(t: Transfer): Promise<void> {
  t.held = [];
  await t.handle?.close().catch(() => undefined);
  if (t.path) await fs.promises.unlink(t.path).catch(() => undefined);
}

/** A message id for replies, the journal and Received:, Postfix-like: 12 hex digits. */
function newId(): string {
  // Random bytes fetched a thousand ids at a time: one call to the system per message cost
  // the receiver's loop 2%.
  if (idBytesUsed + 6 > ID_BYTES.length) {
    randomFillSync(ID_BYTES);
    idBytesUsed = 0;
  }
  idBytesUsed += 6;
  return ID_BYTES.toString("hex", idBytesUsed - 6, idBytesUsed).toUpperCase();
}

const ID_BYTES = Buffer.alloc(6 * 1024);
let idBytesUsed = ID_BYTES.length;
