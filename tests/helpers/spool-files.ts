// Test helper: queue files as another program (the C talker) drops them into outgoing/,
// and the comparison of what a real server stored with what was queued; runCli runs dist/mail.js.

import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { run, type RunOptions, type RunResult } from "./daemon.js";

export const MAIL_JS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../dist/mail.js");

export async function tempMaildir(prefix = "mudmail-test-"): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  return path.join(dir, "maildir");
}

export async function makeSpool(maildir: string): Promise<void> {
  for (const f of ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"]) {
    await fs.mkdir(path.join(maildir, f), { recursive: true, mode: 0o700 });
  }
}

/** Writes a queue file the SPEC way (tmp/, then rename into outgoing/) and returns its id. */
export async function dropQueueFile(maildir: string, id: string, content: string | Buffer): Promise<string> {
  const tmp = path.join(maildir, "tmp", `drop.${id}`);
  await fs.writeFile(tmp, content, { mode: 0o600 });
  await fs.rename(tmp, path.join(maildir, "outgoing", id));
  return id;
}

/**
 * The message lines of test message n: a header block that starts with X-Mudmail-Test (so
 * the copy a server stored can be found behind the trace headers it prepends), then a body
 * with the lines that break naive senders: dot lines, a lone dot, mixed line ends, 8-bit text.
 */
export function testMessage(n: number, opts: { bodyLines?: number; crlf?: boolean } = {}): string {
  const eol = opts.crlf ? "\r\n" : "\n";
  const headers = [
    `X-Mudmail-Test: ${n}`,
    `From: talker@test.example`,
    `To: user${n}@test.example`,
    `Subject: test message ${n}`,
    `Date: Mon, 23 Nov 2026 12:00:00 +0000`,
    `Message-ID: <test.${n}@test.example>`,
    `MIME-Version: 1.0`,
    `Content-Type: text/plain; charset=utf-8`,
    `Content-Transfer-Encoding: 8bit`,
  ];
  const body = [`Hello user ${n},`, ".", ".leading dot", "..two dots", "caf\u00e9 and na\u00efve", ""];
  for (let i = 0; i < (opts.bodyLines ?? 5); i++) body.push(`line ${i} of message ${n} ${"x".repeat(i % 70)}`);
  body.push(".");
  return headers.join(eol) + eol + eol + body.join(eol) + eol;
}

export function queueFile(sender: string, recipients: string[], message: string): string {
  return `${sender}\n${recipients.join(", ")}\n${message}`;
}

/** LF line ends: how Postfix (and most stores) keep a message; "\r\n", lone "\r" and "\n" all become "\n". */
export function normaliseLineEnds(text: string): string {
  return text.replace(/\r\n|\r|\n/g, "\n");
}

/** The part of a stored message from our first header on (the server's trace headers cut off). */
export function fromTestHeader(stored: Buffer | string): string | null {
  const text = stored.toString();
  const at = text.startsWith("X-Mudmail-Test:") ? 0 : text.indexOf("\nX-Mudmail-Test:") + 1;
  return at > 0 || text.startsWith("X-Mudmail-Test:") ? text.slice(at) : null;
}

export function testNumber(stored: Buffer | string): number | null {
  const m = /(?:^|\n)X-Mudmail-Test: (\d+)/.exec(stored.toString());
  return m ? Number(m[1]) : null;
}

export async function listFolder(maildir: string, folder: string): Promise<string[]> {
  return (await fs.readdir(path.join(maildir, folder)).catch(() => [] as string[])).filter((n) => !n.startsWith("."));
}

/** Runs `node dist/mail.js ARGS` with daemon.ts's run(): bounded in time, optional standard input. */
export function runCli(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [MAIL_JS, ...args], opts);
}
