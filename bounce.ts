/*
 * NAME
 *   bounce.ts - delivery status notifications: the bounce, the delay warning, the success report
 *
 * SYNOPSIS
 *   const file = composeBounce({
 *     queueId: "1763900000.0", sender: "alice@example.org", arrival, reportingMta: "mail.example.net",
 *     recipients: [{ recipient: "bob@example.com", action: "failed", status: "5.1.1",
 *                    remoteMta: "mx.example.com", diagnostic: "550 5.1.1 <bob@example.com>: no such user",
 *                    reason: "host mx.example.com[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO command)" }],
 *     originalHeaders,                            // the header block of the message that failed
 *   });
 *   await spool.create(file);                     // a queue file from <> to alice@example.org
 *
 * DESCRIPTION
 *   What Postfix's bounce(8) does for mudmail: turns the outcome of some recipients of one
 *   message into a delivery status notification for its envelope sender, as a complete queue
 *   file (SPEC section 2): line 1 "<>" (a DSN has the null sender, so it is never bounced in
 *   turn), line 2 the original sender, then the message with LF line ends.
 *
 *   The message is a multipart/report; report-type=delivery-status (RFC 6522, was 3462) with
 *   Auto-Submitted: auto-replied (RFC 3834) and three parts:
 *
 *     1. text/plain      Postfix's human explanation ("This is the mail system at host ...")
 *                        and one "<recipient>: reason" line per recipient, wrapped at 76
 *                        columns. us-ascii, or utf-8 quoted-printable when a reason or an
 *                        address is not ASCII.
 *     2. message/delivery-status   RFC 3464: the per-message fields (Original-Envelope-Id,
 *                        Reporting-MTA, X-Mudmail-Queue-ID, X-Mudmail-Sender, Arrival-Date),
 *                        then one block per recipient (Original-Recipient, Final-Recipient,
 *                        Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date,
 *                        Will-Retry-Until), in the order of RFC 3464's grammar.
 *     3. text/rfc822-headers (RET=HDRS, the default) with the original header block, or
 *        message/rfc822 (RET=FULL) with the whole original message; either unchanged apart
 *        from line ends (and never the body with "headers", even when given one).
 *
 *   The kind of report follows the actions: any "failed" makes it a non-delivery report
 *   (Undelivered Mail Returned to Sender); else any "delayed" a delay warning (Delayed Mail
 *   (still being retried)); else a success report (Successful Mail Delivery Report).
 *   Recipients of another action in the same report are listed under their own heading.
 *
 *   Everything this module writes is 7-bit and no line is longer than 998 octets: header
 *   and DSN fields are folded (RFC 5322 section 2.2.3) at white space, so unfolding gives the
 *   value back; a non-ASCII address is written as "utf-8;" utf-8-addr-xtext (RFC 6533,
 *   \x{HEX} for each non-ASCII code point and for SP, "+", "=", "\"), a non-ASCII host name
 *   in its A-label form, and other non-ASCII or control characters in a field as \x{HEX}.
 *   Only the original message in part 3 goes as it came (8bit then in
 *   Content-Transfer-Encoding), and To: keeps a sender whose local part is not ASCII (there
 *   is no ASCII form of it; such a DSN needs SMTPUTF8 like the message it answers).
 *
 *   Diagnostic-Code has the type "smtp" when the text is an SMTP reply ("550 5.1.1 ...") and
 *   "X-Mudmail" otherwise (a connection failure, a local reason), as Postfix writes
 *   "X-Postfix". Last-Attempt-Date defaults to now; Will-Retry-Until is written for
 *   "delayed" recipients only.
 *
 *   Owns: the DSN's wording, its MIME structure and its RFC 3464 fields. It does not decide
 *   who gets a DSN (NOTIFY, notify_classes, the null-sender rule are the caller's), and it
 *   does not queue it: the caller hands the result to Spool.create().
 *
 * DIAGNOSTICS
 *   composeBounce() throws a BounceError for input it cannot turn into a valid DSN: the null
 *   sender ("" or "<>": a bounce of a bounce is never sent), a sender that is not an address,
 *   no recipients, a Status that is not x.y.z, a bad host name, an invalid date, "full"
 *   without originalBody, a given boundary that MIME forbids or that occurs in the content.
 */

import { randomBytes } from "node:crypto";
import { domainToASCII } from "node:url";
import { addressProblem } from "./queue.js";
import { compactDate, rfc5322Date } from "./compose.js";

export interface BounceRecipient {
  /** The envelope recipient (Final-Recipient: rfc822; ...). */
  recipient: string;
  /** ORCPT if known (Original-Recipient: rfc822; ...); "rfc822;addr" is accepted too. */
  originalRecipient?: string;
  action: "failed" | "delayed" | "delivered" | "relayed" | "expanded";
  /** RFC 3463 status, "5.1.1". */
  status: string;
  /** Host name of the server that said it (Remote-MTA: dns; ...). */
  remoteMta?: string;
  /** The server's reply, e.g. "550 5.1.1 <x@y>: Recipient address rejected" (Diagnostic-Code: smtp; ...). */
  diagnostic?: string;
  /** Human-readable reason for the text part (our log text). */
  reason: string;
  /** Last-Attempt-Date; now when not given. */
  lastAttempt?: Date;
  /** For "delayed": Will-Retry-Until. */
  willRetryUntil?: Date;
}

export interface BounceInput {
  /** The original message's queue id (X-Mudmail-Queue-ID, as Postfix's X-Postfix-Queue-ID). */
  queueId: string;
  /** The original envelope sender: the DSN goes to it. "" (the null sender) is never bounced: composeBounce throws. */
  sender: string;
  /** Arrival-Date. */
  arrival: Date;
  /** Our host name: Reporting-MTA: dns; ..., From: MAILER-DAEMON@..., the Message-ID's domain. */
  reportingMta: string;
  recipients: BounceRecipient[];
  /** The original message's header block, as bytes (LF or CRLF line ends); body never needed. */
  originalHeaders: Buffer;
  /** "headers" (RET=HDRS and the default: text/rfc822-headers) or "full" with originalBody. */
  returnContent?: "headers" | "full";
  /** Only with "full". */
  originalBody?: Buffer;
  /** ORIGINAL ENVELOPE ID (Original-Envelope-Id). */
  envid?: string;
  now?: Date;
  /** For deterministic tests; default random. */
  boundary?: string;
}

export class BounceError extends Error {
  constructor(message: string) {
    super(`composeBounce: ${message}`);
    this.name = "BounceError";
  }
}

/** RFC 5322 section 2.1.1: the line length everything we write stays under (SHOULD 78). */
const FOLD_AT = 78;
/** RFC 5322 section 2.1.1: the hard limit, CRLF excluded. */
const MAX_LINE = 998;
/** Text lines of part 1, as Postfix wraps them, and the indent of a wrapped line. */
const TEXT_WIDTH = 76;
const TEXT_INDENT = "    ";
/** A word longer than this is cut to keep text lines under MAX_LINE. */
const LONGEST_WORD = 900;

const SUCCESS_ACTIONS = new Set(["delivered", "relayed", "expanded"]);
const ACTIONS = new Set(["failed", "delayed", "delivered", "relayed", "expanded"]);
const BOUNDARY = /^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$/;

type Kind = "failed" | "delayed" | "success";

/** Per-call uniqueness on top of the random bytes, for two calls in one millisecond. */
let serial = 0;

/**
 * The complete queue file content (SPEC section 2): line 1 "<>" (null sender), line 2 the
 * original sender, then the DSN message with LF line ends.
 */
export function composeBounce(input: BounceInput): Buffer {
  const sender = checkSender(input.sender);
  const host = hostName(input.reportingMta, "reportingMta");
  const now = checkDate(input.now ?? new Date(), "now");
  const arrival = checkDate(input.arrival, "arrival");
  const recipients = input.recipients ?? [];
  if (recipients.length === 0) throw new BounceError("no recipients");
  for (const r of recipients) checkRecipient(r);
  const full = (input.returnContent ?? "headers") === "full";
  if (input.returnContent !== undefined && input.returnContent !== "headers" && input.returnContent !== "full") {
    throw new BounceError(`returnContent must be "headers" or "full", not ${JSON.stringify(input.returnContent)}`);
  }
  if (full && !Buffer.isBuffer(input.originalBody)) throw new BounceError('returnContent "full" needs originalBody');
  if (!Buffer.isBuffer(input.originalHeaders)) throw new BounceError("originalHeaders must be a Buffer");

  const kind: Kind = recipients.some((r) => r.action === "failed") ? "failed"
    : recipients.some((r) => r.action === "delayed") ? "delayed" : "success";

  // Part 3 first: the boundary must not occur in it.
  let headers = toLF(headerBlock(input.originalHeaders));
  if (headers.length > 0 && headers[headers.length - 1] !== 0x0a) headers = Buffer.concat([headers, Buffer.from("\n")]);
  const original = full ? Buffer.concat([headers, Buffer.from("\n"), toLF(input.originalBody as Buffer)]) : headers;
  const original8bit = hasHighBit(original);

  const notice = noticeText(kind, host, recipients, arrival, now);
  const noticeAscii = /^[\x00-\x7f]*$/.test(notice);
  const noticeBody = noticeAscii ? notice : quotedPrintable(Buffer.from(notice, "utf8"));
  const report = deliveryStatus(input, sender, host, arrival, now, recipients);

  const boundary = chooseBoundary(input, host, [Buffer.from(noticeBody), Buffer.from(report), original]);
  const what = kind === "failed" ? "Undelivered" : kind === "delayed" ? "Delayed" : "Delivered";
  const subject = kind === "failed" ? "Undelivered Mail Returned to Sender"
    : kind === "delayed" ? "Delayed Mail (still being retried)" : "Successful Mail Delivery Report";

  const top = [
    field("From", `MAILER-DAEMON@${host} (Mail Delivery System)`),
    field("To", toHeaderAddress(sender)),
    field("Subject", subject),
    field("Date", rfc5322Date(now)),
    field("Message-ID", `<${compactDate(now)}.${randomBytes(8).toString("hex")}${(serial++ % 0x10000).toString(16)}@${host}>`),
    field("Auto-Submitted", "auto-replied"),
    field("MIME-Version", "1.0"),
    field("Content-Type", `multipart/report; report-type=delivery-status; boundary="${boundary}"`),
    field("Content-Transfer-Encoding", original8bit ? "8bit" : "7bit"),
  ].join("");

  const text =
    `<>\n${sender}\n` +
    top +
    "\nThis is a MIME-encapsulated message.\n" +
    `\n--${boundary}\n` +
    field("Content-Description", "Notification") +
    field("Content-Type", `text/plain; charset=${noticeAscii ? "us-ascii" : "utf-8"}`) +
    (noticeAscii ? "" : field("Content-Transfer-Encoding", "quoted-printable")) +
    `\n${noticeBody}` +
    `\n--${boundary}\n` +
    field("Content-Description", "Delivery report") +
    field("Content-Type", "message/delivery-status") +
    `\n${report}` +
    `\n--${boundary}\n` +
    field("Content-Description", `${what} Message${full ? "" : " Headers"}`) +
    field("Content-Type", full ? "message/rfc822" : "text/rfc822-headers") +
    field("Content-Transfer-Encoding", original8bit ? "8bit" : "7bit") +
    "\n";
  // The LF before each delimiter belongs to the delimiter (RFC 2046 section 5.1.1), so every
  // part's content is exactly what was written, its own last line end included.
  return Buffer.concat([Buffer.from(text, "utf8"), original, Buffer.from(`\n--${boundary}--\n`)]);
}

/**
 * A notice to the postmaster (notify_classes: protocol, resource, software): a plain text
 * message from the null sender, so that it can never bounce back, as a queue file.
 */
export function composeNotice(input: { to: string; subject: string; text: string; reportingMta: string; now?: Date }): Buffer {
  const to = checkSender(input.to);
  const host = hostName(input.reportingMta, "reportingMta");
  const now = checkDate(input.now ?? new Date(), "now");
  const body = input.text.replace(/\n$/, "").split("\n").map((line) => wrap(fieldText(line))).join("");
  const top = [
    field("From", `MAILER-DAEMON@${host} (Mail Delivery System)`),
    field("To", toHeaderAddress(to)),
    field("Subject", fieldText(input.subject)),
    field("Date", rfc5322Date(now)),
    field("Message-ID", `<${compactDate(now)}.${randomBytes(8).toString("hex")}${(serial++ % 0x10000).toString(16)}@${host}>`),
    field("Auto-Submitted", "auto-generated"),
    field("MIME-Version", "1.0"),
    field("Content-Type", "text/plain; charset=us-ascii"),
  ].join("");
  return Buffer.from(`<>\n${to}\n${top}\n${body}${body.endsWith("\n") ? "" : "\n"}`, "utf8");
}

/* ------------------------------------------------------------------------------------ */
/* Checks                                                                                */

function checkSender(raw: string): string {
  if (typeof raw !== "string") throw new BounceError("sender must be a string");
  const text = raw.trim();
  if (text === "" || text === "<>") throw new BounceError("the null sender is never sent a DSN");
  const problem = addressProblem(text);
  if (problem) throw new BounceError(`bad sender ${JSON.stringify(raw)}: ${problem}`);
  return text.startsWith("<") ? text.slice(1, -1) : text;
}

function checkRecipient(r: BounceRecipient): void {
  if (!r || typeof r.recipient !== "string" || r.recipient.trim() === "") throw new BounceError("a recipient without an address");
  if (!ACTIONS.has(r.action)) throw new BounceError(`bad action ${JSON.stringify(r.action)} for ${r.recipient}`);
  if (typeof r.status !== "string" || !/^[245]\.\d{1,3}\.\d{1,3}$/.test(r.status)) {
    throw new BounceError(`bad status ${JSON.stringify(r.status)} for ${r.recipient}: not an RFC 3463 x.y.z code`);
  }
  if (r.lastAttempt !== undefined) checkDate(r.lastAttempt, "lastAttempt");
  if (r.willRetryUntil !== undefined) checkDate(r.willRetryUntil, "willRetryUntil");
}

function checkDate(d: Date, what: string): Date {
  if (!(d instanceof Date) || Number.isNaN(d.getTime())) throw new BounceError(`${what} is not a valid Date`);
  return d;
}

/** An ASCII host name (A-label form) or address literal, or a BounceError. */
function hostName(raw: string, what: string): string {
  const name = typeof raw === "string" ? raw.trim() : "";
  const ascii = /^[\x00-\x7f]*$/.test(name) ? name : domainToASCII(name);
  if (/^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$/.test(ascii) && !ascii.includes("..")) return ascii;
  if (/^\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]$/.test(ascii)) return ascii;
  throw new BounceError(`bad ${what} ${JSON.stringify(raw)}: not a host name`);
}

/* ------------------------------------------------------------------------------------ */
/* Part 1: the notification                                                              */

const HEADINGS: Record<Kind, string> = {
  failed: "Your message could not be delivered to the following recipient(s):",
  delayed: "Delivery to the following recipient(s) is delayed. The mail system will\n" +
    "keep trying; you do not need to resend your message to them:",
  success: "Your message was successfully delivered to the following recipient(s):",
};

function noticeText(kind: Kind, host: string, recipients: BounceRecipient[], arrival: Date, now: Date): string {
  const postmaster =
    "For further assistance, please send mail to postmaster.\n\n" +
    "If you do so, please include this problem report. You can\n" +
    "delete your own text from the attached returned message.\n\n";
  const signature = "                   The mail system\n";
  let text = `This is the mail system at host ${host}.\n\n`;
  if (kind === "failed") {
    text +=
      "I'm sorry to have to inform you that your message could not\n" +
      "be delivered to one or more recipients. It's attached below.\n\n" +
      postmaster + signature;
  } else if (kind === "delayed") {
    const until = recipients
      .filter((r) => r.action === "delayed" && r.willRetryUntil)
      .reduce<Date | null>((max, r) => (max && max >= r.willRetryUntil! ? max : r.willRetryUntil!), null);
    text +=
      "####################################################################\n" +
      "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n" +
      "####################################################################\n\n" +
      `Your message could not be delivered for ${span(now.getTime() - arrival.getTime())}.\n` +
      (until ? `It will be retried until it is ${span(until.getTime() - arrival.getTime())} old.\n` : "") +
      "\n" + postmaster + signature;
  } else {
    text +=
      "Your message was successfully delivered to the destination(s)\n" +
      "listed below. If the message was delivered to mailbox you will\n" +
      "receive no further notifications. Otherwise you may still receive\n" +
      "notifications of mail delivery errors from other systems.\n\n" +
      signature;
  }
  const groups: Record<Kind, BounceRecipient[]> = { failed: [], delayed: [], success: [] };
  for (const r of recipients) groups[r.action === "failed" ? "failed" : r.action === "delayed" ? "delayed" : "success"].push(r);
  const order: Kind[] = [kind, ...(["failed", "delayed", "success"] as Kind[]).filter((k) => k !== kind)];
  for (const k of order) {
    if (groups[k].length === 0) continue;
    if (k !== kind) text += `\n${HEADINGS[k]}\n`;
    for (const r of groups[k]) text += `\n${wrap(recipientLine(r))}`;
  }
  return text;
}

/** "<rcpt> (expanded from <orig>): reason", as in Postfix's notices. */
function recipientLine(r: BounceRecipient): string {
  const rcpt = bare(r.recipient);
  const orig = r.originalRecipient === undefined ? undefined : bare(r.originalRecipient.replace(/^rfc822\s*;\s*/i, ""));
  const expanded = orig && orig.toLowerCase() !== rcpt.toLowerCase() ? ` (expanded from <${orig}>)` : "";
  // eslint-disable-next-line no-control-regex
  const reason = (r.reason ?? "").replace(/\r\n|[\r\n\t]/g, " ").replace(/[\x00-\x1f\x7f]/g, "?");
  return `<${rcpt}>${expanded}: ${reason}`;
}

function span(ms: number): string {
  const minutes = Math.max(0, Math.round(ms / 60000));
  if (minutes < 60) return `${minutes} minute(s)`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `${hours} hour(s)`;
  return `${Math.round(hours / 24)} day(s)`;
}

/** Word wrap at TEXT_WIDTH with an indent for continuation lines; no line over MAX_LINE. */
function wrap(line: string): string {
  const words = line.split(" ").filter(Boolean).flatMap((w) => {
    const pieces: string[] = [];
    for (let i = 0; i < w.length; i += LONGEST_WORD) pieces.push(w.slice(i, i + LONGEST_WORD));
    return pieces;
  });
  const out: string[] = [];
  let current = "";
  for (const w of words) {
    if (current === "") current = (out.length ? TEXT_INDENT : "") + w;
    else if (current.length + 1 + w.length <= TEXT_WIDTH) current += ` ${w}`;
    else {
      out.push(current);
      current = TEXT_INDENT + w;
    }
  }
  if (current !== "" || out.length === 0) out.push(current);
  return out.map((l) => `${l}\n`).join("");
}

/** RFC 2045 section 6.7, lines of at most 76 characters; the text's LFs stay hard line breaks. */
function quotedPrintable(bytes: Buffer): string {
  const lines: string[] = [];
  let line = "";
  const hex = (b: number) => `=${b.toString(16).toUpperCase().padStart(2, "0")}`;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0x0a) {
      lines.push(line);
      line = "";
      continue;
    }
    const next = bytes[i + 1];
    const atEnd = next === undefined || next === 0x0a;
    const plain = (b >= 0x21 && b <= 0x7e && b !== 0x3d) || ((b === 0x20 || b === 0x09) && !atEnd);
    const token = plain ? String.fromCharCode(b) : hex(b);
    // A UTF-8 sequence is kept on one line (RFC 2047 asks it of encoded words; here it is politeness).
    let units = token;
    if (!plain && b >= 0xc0) {
      const len = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : 2;
      for (let k = 1; k < len && i + 1 < bytes.length && (bytes[i + 1] & 0xc0) === 0x80; k++) units += hex(bytes[++i]);
    }
    const endsLine = i + 1 >= bytes.length || bytes[i + 1] === 0x0a;
    if (line.length + units.length > (endsLine ? 76 : 75)) {
      lines.push(`${line}=`);
      line = "";
    }
    line += units;
  }
  if (line !== "") lines.push(`${line}=`);
  return lines.map((l) => `${l}\n`).join("");
}

/* ------------------------------------------------------------------------------------ */
/* Part 2: message/delivery-status                                                       */

function deliveryStatus(input: BounceInput, sender: string, host: string, arrival: Date, now: Date, recipients: BounceRecipient[]): string {
  let text = "";
  if (input.envid !== undefined && input.envid !== "") text += field("Original-Envelope-Id", fieldText(input.envid));
  text += field("Reporting-MTA", `dns; ${host}`);
  text += field("X-Mudmail-Queue-ID", fieldText(input.queueId));
  text += field("X-Mudmail-Sender", dsnAddress(sender));
  text += field("Arrival-Date", rfc5322Date(arrival));
  for (const r of recipients) {
    text += "\n";
    if (r.originalRecipient !== undefined && r.originalRecipient.trim() !== "") {
      const typed = /^([A-Za-z0-9-]+)\s*;\s*(.*)$/s.exec(r.originalRecipient.trim());
      text += field("Original-Recipient", !typed ? dsnAddress(bare(r.originalRecipient))
        : typed[1].toLowerCase() === "rfc822" ? dsnAddress(bare(typed[2]))
          : `${typed[1]}; ${fieldText(typed[2])}`);
    }
    text += field("Final-Recipient", dsnAddress(bare(r.recipient)));
    text += field("Action", r.action);
    text += field("Status", r.status);
    if (r.remoteMta !== undefined && r.remoteMta.trim() !== "") text += field("Remote-MTA", `dns; ${mtaName(r.remoteMta)}`);
    if (r.diagnostic !== undefined && r.diagnostic.trim() !== "") {
      const diagnostic = fieldText(r.diagnostic);
      text += field("Diagnostic-Code", `${/^\d{3}(?:[ -]|$)/.test(diagnostic) ? "smtp" : "X-Mudmail"}; ${diagnostic}`);
    }
    text += field("Last-Attempt-Date", rfc5322Date(r.lastAttempt ?? now));
    if (r.action === "delayed" && r.willRetryUntil) text += field("Will-Retry-Until", rfc5322Date(r.willRetryUntil));
  }
  return text;
}

/** A host name for Remote-MTA: its A-label form; anything else made ASCII. */
function mtaName(raw: string): string {
  const name = raw.trim();
  if (/^[\x21-\x7e]+$/.test(name)) return name;
  const ascii = domainToASCII(name);
  return ascii !== "" ? ascii : fieldText(name);
}

function bare(address: string): string {
  const text = address.trim();
  return text.startsWith("<") && text.endsWith(">") ? text.slice(1, -1) : text;
}

/** "rfc822; addr" for an ASCII address, else "utf-8; " and RFC 6533's utf-8-addr-xtext. */
function dsnAddress(address: string): string {
  if (/^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/.test(address)) return `rfc822; ${address}`;
  let out = "";
  for (const c of address) {
    const cp = c.codePointAt(0)!;
    const qchar = cp >= 0x21 && cp <= 0x7e && c !== "+" && c !== "=" && c !== "\\";
    out += qchar ? c : embedded(cp);
  }
  return `utf-8; ${out}`;
}

/** RFC 6533 EmbeddedUnicodeChar: \x{HEX}, upper case, no leading zeros beyond two digits. */
function embedded(cp: number): string {
  return `\\x{${cp.toString(16).toUpperCase().padStart(2, "0")}}`;
}

/** A field value in 7-bit text: line ends and tabs become spaces, other controls and non-ASCII \x{HEX}. */
function fieldText(raw: string): string {
  let out = "";
  for (const c of String(raw).replace(/\r\n|[\r\n\t]/g, " ").trim()) {
    const cp = c.codePointAt(0)!;
    out += cp >= 0x20 && cp <= 0x7e ? c : embedded(cp);
  }
  return out;
}

/* ------------------------------------------------------------------------------------ */
/* Part 3 and the frame                                                                  */

/** The header block of what was given: up to and including the first empty line's predecessor. */
function headerBlock(bytes: Buffer): Buffer {
  // An empty first line means no headers at all.
  if (bytes[0] === 0x0a) return Buffer.alloc(0);
  if (bytes[0] === 0x0d && bytes[1] === 0x0a) return Buffer.alloc(0);
  for (let at = bytes.indexOf(0x0a); at >= 0; at = bytes.indexOf(0x0a, at + 1)) {
    const next = bytes[at + 1];
    if (next === 0x0a || (next === 0x0d && bytes[at + 2] === 0x0a)) return bytes.subarray(0, at + 1);
  }
  return bytes;
}

/** CRLF and bare CR become LF, as in the rest of the queue file. */
function toLF(bytes: Buffer): Buffer {
  if (bytes.indexOf(0x0d) < 0) return bytes;
  const out = Buffer.allocUnsafe(bytes.length);
  let j = 0;
  let from = 0;
  for (let cr = bytes.indexOf(0x0d); cr >= 0; cr = bytes.indexOf(0x0d, from)) {
    j += bytes.copy(out, j, from, cr);
    out[j++] = 0x0a;
    from = bytes[cr + 1] === 0x0a ? cr + 2 : cr + 1;
  }
  j += bytes.copy(out, j, from);
  return out.subarray(0, j);
}

function hasHighBit(bytes: Buffer): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] & 0x80) return true;
  return false;
}

/** The sender in To:, in its ASCII form where there is one. */
function toHeaderAddress(sender: string): string {
  if (/^[\x20-\x7e]+$/.test(sender)) return sender;
  const at = sender.lastIndexOf("@");
  const domain = sender.slice(at + 1);
  const ascii = /^[\x00-\x7f]*$/.test(domain) ? domain : domainToASCII(domain) || domain;
  return `${sender.slice(0, at)}@${ascii}`;
}

function chooseBoundary(input: BounceInput, host: string, contents: Buffer[]): string {
  const occurs = (b: string) => contents.some((c) => c.includes(`--${b}`));
  if (input.boundary !== undefined) {
    if (!BOUNDARY.test(input.boundary)) throw new BounceError(`boundary ${JSON.stringify(input.boundary)} is not a valid MIME boundary`);
    if (occurs(input.boundary)) throw new BounceError(`boundary ${JSON.stringify(input.boundary)} occurs in the content`);
    return input.boundary;
  }
  const id = String(input.queueId).replace(/[^A-Za-z0-9._-]/g, "").slice(0, 24);
  for (;;) {
    // Postfix's shape, queue id and time over host, with random bytes to make it unique.
    const candidate = `${id}.${randomBytes(9).toString("hex")}/${host}`.slice(0, 70).replace(/[ ]+$/, "");
    if (!occurs(candidate)) return candidate;
  }
}

/**
 * One header or DSN field, folded (RFC 5322 section 2.2.3): a line is broken before a space
 * that is followed by a non-space, preferably within FOLD_AT columns and always within
 * MAX_LINE, so that removing the line breaks gives the value back. A run of more than
 * MAX_LINE octets without such a space is cut anyway, and gains a space there.
 */
function field(name: string, value: string): string {
  let rest = `${name}: ${value}`;
  const lines: string[] = [];
  const minimum = name.length + 2;
  while (rest.length > FOLD_AT) {
    let cut = -1;
    for (let i = Math.min(FOLD_AT, rest.length - 1); i > (lines.length ? 1 : minimum); i--) {
      if (rest[i] === " " && rest[i + 1] !== " " && rest[i + 1] !== undefined) {
        cut = i;
        break;
      }
    }
    if (cut < 0) {
      for (let i = FOLD_AT + 1; i <= MAX_LINE && i < rest.length - 1; i++) {
        if (rest[i] === " " && rest[i + 1] !== " ") {
          cut = i;
          break;
        }
      }
    }
    if (cut < 0) {
      if (rest.length <= MAX_LINE) break;
      lines.push(rest.slice(0, MAX_LINE));
      rest = ` ${rest.slice(MAX_LINE)}`;
      continue;
    }
    lines.push(rest.slice(0, cut));
    rest = rest.slice(cut);
  }
  lines.push(rest);
  return lines.map((l) => `${l}\n`).join("");
}
