// Test harness: Python's aiosmtpd (Debian's python3-aiosmtpd 1.4) on loopback, run by
// aiosmtpd-server.py beside this file, which stores every message once per recipient.
//
// Facts about aiosmtpd 1.4.3 on Debian 12 that this module relies on:
// - Debian's interpreter is /usr/bin/python3; the first python3 on PATH may be another one
//   without Debian's modules.
// - It advertises SIZE, 8BITMIME (as long as decode_data is off), SMTPUTF8 (the Controller turns
//   it on), STARTTLS (with a tls_context), but NOT PIPELINING, although it reads pipelined
//   commands in order.
// - envelope.original_content is the message as received, un-dot-stuffed, CRLF line ends, with
//   no trace header added (the handler adds none either).
// - DATA is read a line at a time (readuntil CRLF): lines over 1001 octets are refused with
//   "500 Line too long"; data_size_limit (default 32 MiB) gives 552 after the dot.

import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Test } from "tap";
import { freePort } from "./postfix.js";
import { needFile, readTail, removeAtExit, requireAll, spawnDaemon, waitForFiles, waitForGreeting } from "./daemon.js";

export const PYTHON = "/usr/bin/python3";
export const AIOSMTPD_MODULE = "/usr/lib/python3/dist-packages/aiosmtpd";
export const AIOSMTPD_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), "aiosmtpd-server.py");

export function requireAiosmtpd(t: Test): boolean {
  return requireAll(t, [needFile(PYTHON), needFile(AIOSMTPD_MODULE), needFile(AIOSMTPD_SCRIPT)]);
}

export interface AiosmtpdOptions {
  host?: string;
  domain?: string;
  /** Addresses refused at RCPT with 550 5.1.1 (default ["nobody@<domain>"]). */
  refuse?: string[];
  tls?: { certFile: string; keyFile: string };
}

/** One stored copy and what the handler saw of its session. */
export interface AiosmtpdMessage {
  bytes: Buffer;
  meta: {
    from: string;
    rcpt: string;
    mail_options: string[];
    rcpt_options: string[];
    tls: boolean;
    tls_version: string | null;
    helo: string;
    size: number;
  };
}

export interface AiosmtpdInstance {
  host: string;
  port: number;
  domain: string;
  dir: string;
  readMessages(): Promise<Buffer[]>;
  waitForMessages(n: number, timeoutMs: number): Promise<Buffer[]>;
  /** Every stored copy with its metadata, in arrival order. */
  readStored(): Promise<AiosmtpdMessage[]>;
  log(): Promise<string>;
  stop(): Promise<void>;
}

export async function startAiosmtpd(opts: AiosmtpdOptions = {}): Promise<AiosmtpdInstance> {
  const host = opts.host ?? "127.0.0.1";
  const domain = opts.domain ?? "test.example";
  const refuse = opts.refuse ?? [`nobody@${domain}`];
  if (!existsSync(PYTHON) || !existsSync(AIOSMTPD_MODULE)) {
    throw new Error(`startAiosmtpd: needs ${PYTHON} with python3-aiosmtpd; run scripts/pretest.sh as root`);
  }
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-aiosmtpd-"));
  const remove = removeAtExit(dir);
  const store = path.join(dir, "store");
  await fs.mkdir(store);
  const errFile = path.join(dir, "aiosmtpd.stderr");
  const list = async () =>
    (await fs.readdir(store)).filter((n) => n.endsWith(".json")).sort().map((n) => path.join(store, n.replace(/\.json$/, ".eml")));
  const log = () => readTail(errFile, 1e6);

  let port = 0;
  let lastWhy = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    port = await freePort(host);
    const args = [AIOSMTPD_SCRIPT, "--host", host, "--port", String(port), "--dir", store, "--domain", domain];
    for (const r of refuse) args.push("--refuse", r);
    if (opts.tls) args.push("--cert", opts.tls.certFile, "--key", opts.tls.keyFile);
    const d = spawnDaemon(PYTHON, args, dir, "aiosmtpd");
    const said = await d.waitForOutput(/READY/, 15_000).then(() => null, (e: Error) => e.message);
    const ready = said === null ? await waitForGreeting(host, port, 5000, () => d.exited()) : { ok: false as const, why: said };
    if (ready.ok) {
      let stopped = false;
      const inst: AiosmtpdInstance = {
        host,
        port,
        domain,
        dir,
        readMessages: async () => Promise.all((await list()).map((f) => fs.readFile(f))),
        waitForMessages: (n, timeoutMs) => waitForFiles(list, n, timeoutMs, async () => `--- aiosmtpd stderr ---\n${await log()}`),
        async readStored() {
          const out: AiosmtpdMessage[] = [];
          for (const f of await list()) {
            out.push({ bytes: await fs.readFile(f), meta: JSON.parse(await fs.readFile(f.replace(/\.eml$/, ".json"), "utf8")) });
          }
          return out;
        },
        log,
        async stop() {
          if (stopped) return;
          stopped = true;
          await d.stop();
          await remove();
        },
      };
      return inst;
    }
    await d.kill("SIGKILL");
    lastWhy = ready.why;
    if (!/in use/i.test(await log())) break;
    await fs.writeFile(errFile, "");
  }
  const text = await log();
  await remove();
  throw new Error(`startAiosmtpd failed: ${lastWhy}\n--- stderr ---\n${text}`);
}
