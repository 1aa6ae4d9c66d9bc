/*
 * NAME
 *   compose.ts - the messages and dates the engine writes: send()'s message, added headers
 *
 * SYNOPSIS
 *   const bytes = composeMessage({ from, to, subject, text }, helo);  // a queue file for send()
 *   addedHeaders(facts, msg, helo);   // Date:, Message-ID:, From: when the message lacks them
 *   rfc5322Date(d); compactDate(d); syslogDate(d); formatAge(ms);
 *
 * DESCRIPTION
 *   The one place that formats what the engine puts into mail and log lines: RFC 5322
 *   messages from send()'s fields (RFC 2047 words for header values that are not ASCII), the
 *   header fields SPEC section 2 has the engine add, and the dates every other module writes
 *   (bounce reports, the receiver's trace lines, the log's stamp).
 *
 * DIAGNOSTICS
 *   composeMessage() throws a MailError (EENVELOPE) for a bad sender or recipient, and
 *   checkDsn() a UsageError naming --notify, --ret or envid.
 */

import { randomBytes } from "node:crypto";
import { MailError, xtext } from "./smtp-codes.js";
import { UsageError } from "./options.js";
import { addressProblem, type DsnRequest, type HeaderFacts, type QueuedMessage } from "./queue.js";

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

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const pad = (n: number) => String(n).padStart(2, "0");

/** RFC 5322 date: "Mon, 23 Nov 2026 15:44:09 +0000" in local time. */
export function rfc5322Date(date = new Date()): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  const abs = Math.abs(offset);
  return `${days[date.getDay()]}, ${date.getDate()} ${MONTHS[date.getMonth()]} ${date.getFullYear()} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())} ${sign}${pad(Math.floor(abs / 60))}${pad(abs % 60)}`;
}

/** Syslog's stamp, as Postfix's log lines begin: "Nov 23 16:05:01" in local time. */
export function syslogDate(d: Date): string {
  return `${MONTHS[d.getMonth()]} ${String(d.getDate()).padStart(2, " ")} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** "2d 3h", "5h 12m", "40m": how long a message has waited, for people. */
export function formatAge(ms: number): string {
  const m = Math.floor(ms / 60000);
  const d = Math.floor(m / 1440), h = Math.floor((m % 1440) / 60), min = m % 60;
  return d > 0 ? `${d}d ${h}h` : h > 0 ? `${h}h ${min}m` : `${min}m`;
}

/** 20261123154409: the arrival time in a Message-ID, as Postfix writes it. */
export function compactDate(d: Date): string {
  return `${d.getUTCFullYear()}${pad(d.getUTCMonth() + 1)}${pad(d.getUTCDate())}${pad(d.getUTCHours())}${pad(d.getUTCMinutes())}${pad(d.getUTCSeconds())}`;
}

/** The header fields SPEC section 2 has the engine add when the message lacks them. */
export function addedHeaders(facts: HeaderFacts, msg: QueuedMessage, helo: string): Buffer {
  let text = "";
  if (!facts.hasDate) text += `Date: ${rfc5322Date(new Date(msg.arrival))}\r\n`;
  // Derived from the queue id alone, so every attempt (and every recipient) sees the same one.
  if (!facts.hasMessageId) text += `Message-ID: <${compactDate(new Date(msg.arrival))}.${msg.id}@${helo}>\r\n`;
  if (!facts.hasFrom) text += `From: ${msg.sender === "" ? `MAILER-DAEMON@${helo}` : msg.sender}\r\n`;
  if (!facts.startsWithHeader) text += "\r\n";
  return Buffer.from(text);
}

/**
 * The Message-ID field's value in a header block (folded lines unfolded), or null when it
 * has none. Given a whole message, only its header block is read.
 */
export function messageIdOf(message: Buffer): string | null {
  const lines = message.subarray(0, headerBlockEnd(message)).toString("latin1").split(/\r?\n/);
  for (let i = 0; i < lines.length && lines[i] !== ""; i++) {
    const m = /^message-id[ \t]*:(.*)$/i.exec(lines[i]);
    if (!m) continue;
    let value = m[1];
    while (i + 1 < lines.length && /^[ \t]/.test(lines[i + 1])) value += lines[++i];
    return value.trim().replace(/\s+/g, " ").slice(0, 998) || null;
  }
  return null;
}

/** Where a message's header block ends: after the line end before its first empty line. */
function headerBlockEnd(message: Buffer): number {
  for (let lf = message.indexOf(0x0a); lf >= 0; lf = message.indexOf(0x0a, lf + 1)) {
    const next = message[lf + 1];
    if (next === 0x0a || (next === 0x0d && message[lf + 2] === 0x0a)) return lf + 1;
  }
  return message.length;
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
