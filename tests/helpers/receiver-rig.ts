// Test helper for the tests of the built-in SMTP receiver (--serve, tests/receiver/): setup()
// starts a receiver on a loopback port with a fresh maildir and users, and gives its log lines,
// its message events, a connect() that returns the raw client of smtp-raw.ts past the greeting,
// the mbox path of a user, the files left in tmp/ and a bounded waitForLine(); envelope() sends
// EHLO, MAIL, RCPT and DATA one at a time; withoutDates(), splitMbox() and readLatin1() read
// the mbox; limitFileSize() lowers this process's file size limit (writes past it fail, EFBIG).

import type { Test } from "tap";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { startServer, type ServerHandle, type ServerOptions, type StoredMessage } from "../../receiver.js";
import { RawClient } from "./smtp-raw.js";
import { run, sleep } from "./daemon.js";

export const SWAKS = "/usr/bin/swaks";
export const HOST = "mx.local.test";
export const USER = "user@local.test";
export const PRLIMIT = "/usr/bin/prlimit";
export { sleep };

export interface Setup {
  maildir: string;
  server: ServerHandle;
  lines: string[];
  messages: StoredMessage[];
  connect: () => Promise<RawClient>;
  mbox: (user?: string) => string;
  tmpFiles: () => Promise<string[]>;
  waitForLine: (pattern: RegExp, timeoutMs?: number) => Promise<string>;
}

export async function setup(t: Test, opts: Partial<ServerOptions> = {}, users = [USER]): Promise<Setup> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-receiver-"));
  t.teardown(() => fs.rm(base, { recursive: true, force: true }));
  const maildir = path.join(base, "maildir");
  for (const u of users) await fs.mkdir(path.join(maildir, "users", u), { recursive: true });
  const lines: string[] = [];
  const server = await startServer({ maildir, listen: "127.0.0.1:0", hostname: HOST, log: (l) => lines.push(l), ...opts });
  t.teardown(() => server.close());
  const messages: StoredMessage[] = [];
  server.on("message", (m) => messages.push(m));
  const connect = async () => {
    const c = await RawClient.connect(server.address.port);
    t.teardown(() => c.destroy());
    t.equal(await c.text(), `220 ${HOST} ESMTP mudmail`, "greeting");
    return c;
  };
  const waitForLine = async (pattern: RegExp, timeoutMs = 5000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = lines.find((l) => pattern.test(l));
      if (hit) return hit;
      if (Date.now() > deadline) throw new Error(`no log line matching ${pattern} within ${timeoutMs} ms:\n${lines.join("\n")}`);
      await sleep(10);
    }
  };
  return {
    maildir, server, lines, messages, connect, waitForLine,
    mbox: (user = USER) => path.join(maildir, "users", user, "mail"),
    tmpFiles: async () => (await fs.readdir(path.join(maildir, "tmp"))).sort(),
  };
}

/** EHLO, MAIL, RCPT, DATA one at a time; returns the client ready for the body. */
export async function envelope(t: Test, c: RawClient, from = "a@x.test", to: string[] = [USER]): Promise<void> {
  t.match(await c.cmd("EHLO client.test"), /^250-mx\.local\.test\n/);
  t.equal(await c.cmd(`MAIL FROM:<${from}>`), "250 2.1.0 Ok");
  for (const rcpt of to) t.equal(await c.cmd(`RCPT TO:<${rcpt}>`), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
}

/** The mbox with its two time-dependent parts (From_ line date, Received date) replaced by DATE. */
export function withoutDates(text: string): string {
  return text
    .replace(/^(From \S+) [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}$/gm, "$1 DATE")
    .replace(/; [A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$/gm, "; DATE");
}

/** Messages of an mboxrd file: split at unquoted From_ lines. */
export function splitMbox(text: string): string[] {
  return text.split(/^(?=From )/m).filter((m) => m !== "");
}

export async function readLatin1(file: string): Promise<string> {
  return (await fs.readFile(file)).toString("latin1");
}

export const queuedAs = /^250 2\.0\.0 Ok: queued as ([0-9A-F]{12})$/;

/**
 * Lowers this process's file size limit (RLIMIT_FSIZE) until the test ends: a write past it
 * fails with EFBIG, a real write error on a regular file. Returns the function that puts the
 * limit back.
 */
export async function limitFileSize(t: Test, bytes: number): Promise<() => Promise<void>> {
  // Node ignores SIGXFSZ, but the test runner's signal-exit listens for it and, when it is
  // the only listener, raises it again to die of it; a listener of our own keeps it harmless.
  const harmless = () => undefined;
  const pid = String(process.pid);
  const was = await run(PRLIMIT, ["--pid", pid, "--fsize", "--output=SOFT", "--noheadings", "--raw"], { timeoutMs: 10_000 });
  if (was.code !== 0) throw new Error(`prlimit: ${was.stderr}`);
  let restored = false;
  const restore = async () => {
    if (restored) return;
    restored = true;
    const back = await run(PRLIMIT, ["--pid", pid, `--fsize=${was.stdout.trim()}:`], { timeoutMs: 10_000 });
    if (back.code !== 0) throw new Error(`prlimit: ${back.stderr}`);
    process.off("SIGXFSZ", harmless);
  };
  process.on("SIGXFSZ", harmless);
  t.teardown(restore);
  const lowered = await run(PRLIMIT, ["--pid", pid, `--fsize=${bytes}:`], { timeoutMs: 10_000 });
  if (lowered.code !== 0) throw new Error(`prlimit: ${lowered.stderr}`);
  return restore;
}
