/*
 * NAME
 *   log.ts - the log: Postfix-shaped lines, batched, with every secret scrubbed
 *
 * SYNOPSIS
 *   const log = new MailLog(options.log, options.syslogName);   // a file, a function, or standard error
 *   log.redact(secretForms(credentials));
 *   log.write("smtp", `${id}: to=<${rcpt}>, relay=..., delay=${seconds(ms)}, ...`);
 *   await log.flush();
 *
 * DESCRIPTION
 *   "<Mmm dd hh:mm:ss> <host> mudmail/<proc>[<pid>]: <text>", SPEC section 4, so Postfix's log
 *   tools read it; "mudmail" is --syslog-name (Postfix's syslog_name), and <proc> is the Postfix
 *   program whose line it is: smtp, qmgr, pickup, cleanup, postsuper. Lines written in one turn of the event loop leave in one write. A password
 *   or token, in any form AUTH puts it on the wire, never reaches a line.
 */

import * as fs from "node:fs";
import * as os from "node:os";
import { syslogDate } from "./compose.js";
import type { MailOptions } from "./options.js";
import type { Credentials } from "./smtp-connection.js";
import { printable } from "./smtp-codes.js";

/** The Postfix programs whose lines mudmail writes. */
export type LogProc = "smtp" | "qmgr" | "pickup" | "cleanup" | "postsuper";

/** Postfix-shaped log lines: "<Mmm dd hh:mm:ss> <host> mudmail/<proc>[<pid>]: <text>". */
export class MailLog {
  private readonly sink: (line: string) => void;
  private readonly stream: fs.WriteStream | null = null;
  private readonly host = os.hostname().split(".")[0];
  private stampSecond = -1;
  private stamp = "";

  constructor(target: MailOptions["log"], private readonly name = "mudmail") {
    if (typeof target === "function") {
      this.sink = target;
    } else if (typeof target === "string") {
      const stream = fs.createWriteStream(target, { flags: "a", mode: 0o600 });
      stream.on("error", (err) => process.stderr.write(`mudmail: cannot write log ${target}: ${err.message}\n`));
      this.stream = stream;
      this.sink = this.batched((text) => stream.write(text));
    } else {
      // On a terminal, a line drawn in place (--flush's progress) is erased first, then drawn again.
      this.sink = this.batched((text) => process.stderr.write(process.stderr.isTTY ? `\r\x1b[K${text}` : text));
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

  write(proc: LogProc, line: string): void {
    let text = line;
    for (const secret of this.secrets) if (text.includes(secret)) text = text.split(secret).join("<redacted>");
    const now = Date.now();
    const second = Math.floor(now / 1000);
    if (second !== this.stampSecond) {
      this.stamp = syslogDate(new Date(now));
      this.stampSecond = second;
    }
    this.sink(`${this.stamp} ${this.host} ${this.name}/${proc}[${process.pid}]: ${text}`);
  }

  /** Lines still batched for this turn go out; the file stays open for a later start(). */
  async flush(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    // An empty write's callback runs once every write before it is on disk.
    if (this.stream && !this.stream.destroyed) await new Promise<void>((resolve) => this.stream!.write("", () => resolve()));
  }
}

/** Postfix's delay format: two significant decimals below 10 s, fewer above. */
export function seconds(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s >= 100) return String(Math.round(s));
  if (s >= 10) return String(Math.round(s * 10) / 10);
  if (s < 0.01) return "0";
  return String(Math.round(s * 100) / 100);
}

/** Every form a credential could take on the wire, so none of them is ever logged. */
export function secretForms(c: Credentials | null): string[] {
  if (!c) return [];
  const b64 = (text: string) => Buffer.from(text, "utf8").toString("base64");
  const forms = [c.password, b64(c.password), b64(`\0${c.user}\0${c.password}`)];
  if (c.token) forms.push(c.token, b64(`user=${c.user}\x01auth=Bearer ${c.token}\x01\x01`));
  return forms;
}

/** The log line of a suspension that begins (policy.ts): once, when it begins. */
export function suspendedLine(key: string, seconds: number, until: number, reason: string): string {
  return `${key}: delivery suspended for ${seconds} s, until ${syslogDate(new Date(until))}: ${printable(reason, 1000)}`;
}

/** The log line of a suspension that ends, or that an operator lifts. */
export function resumedLine(key: string, lifted: boolean): string {
  return `${key}: delivery resumed: ${lifted ? "the suspension was lifted (--resume)" : "the suspension ended"}`;
}

/** Postfix's postsuper lines: what queue control did to one message. */
export const CONTROL_DONE = { delete: "removed", hold: "placed on hold", release: "released from hold", requeue: "requeued" } as const;
