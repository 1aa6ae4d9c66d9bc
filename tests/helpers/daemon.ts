// Test helper: the suite's child processes, and the plumbing of its throw-away servers.
//
//   run(cmd, args, { input?, stdinFile?, timeoutMs?, env?, cwd? })
//       the one runner of a command that ends: bounded in time (SIGKILL, then a rejection naming
//       the command), optional standard input; resolves { code, signal, stdout, stderr }.
//   spawnDaemon(cmd, args, dir, name, { env? })
//       the one starter of a process that runs until stopped (a server, mail.js in run mode, a
//       flush to be killed): its own process group, stdout/stderr in files in dir, killed at
//       process exit if the test forgets; kill(signal) and stop() end it, bounded.
//   waitForGreeting  polls a port until a 220 greeting comes (with the raw client of smtp-raw.ts)
//   requireAll / needFile / needUser / needRoot   a missing tool FAILS under CI, skips elsewhere
//   bounded(promise, ms, what)  the promise, or a rejection naming `what` after ms
//   waitForText(read, re, what, ms)  reads again until the text matches: a log, a scrape, a screen
//   atExit, removeAtExit, readTail, lookupId, listMaildir, waitForFiles, sleep

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import type { Test } from "tap";
import { RawClient } from "./smtp-raw.js";

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Calls read() every 50 ms until its text matches re; resolves with that text, or rejects after ms with the last one. */
export async function waitForText(read: () => Promise<string>, re: RegExp, what: string, ms = 10_000): Promise<string> {
  const deadline = Date.now() + ms;
  let text = "";
  while (Date.now() < deadline) {
    text = await read().catch(() => "");
    if (re.test(text)) return text;
    await sleep(50);
  }
  throw new Error(`no ${re} in ${what} within ${ms} ms:\n${text}`);
}

/** The promise's result, or a rejection naming `what` once ms have passed. */
export function bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** uid (from /etc/passwd) or gid (from /etc/group) of a name; undefined when there is none. */
export function lookupId(file: "/etc/passwd" | "/etc/group", name: string): number | undefined {
  try {
    for (const line of readFileSync(file, "utf8").split("\n")) {
      const f = line.split(":");
      if (f[0] === name) return Number(f[2]);
    }
  } catch {
    /* fall through */
  }
  return undefined;
}

/**
 * Like postfix.ts's requireTool, for a list of checks that each return a reason when something
 * is missing: under CI (process.env.CI set) a missing piece FAILS the test, otherwise the test
 * is skipped with the reason. Returns true when all is there.
 */
export function requireAll(t: Test, checks: Array<() => string | null>): boolean {
  const missing = checks.map((c) => c()).filter((r): r is string => r !== null);
  if (missing.length === 0) return true;
  const what = `${missing.join("; ")} (scripts/pretest.sh, run by \`npm test\` as root, should provide it)`;
  if (process.env.CI) {
    t.fail(what);
    t.end();
  } else {
    t.plan(0, what);
  }
  return false;
}

export const needFile = (p: string) => () => (existsSync(p) ? null : `missing ${p}`);
export const needUser = (name: string) => () => (lookupId("/etc/passwd", name) !== undefined ? null : `no user ${name}`);
export const needRoot = (why: string) => () => (process.getuid?.() === 0 ? null : `needs root: ${why}`);

// ---------------------------------------------------------------------------------------------
// Cleanup at exit

const cleanups = new Set<() => void>();
let hooked = false;
/** Runs fn at process exit (or on SIGINT/SIGTERM/SIGHUP) unless the returned function is called first. */
export function atExit(fn: () => void): () => void {
  if (!hooked) {
    hooked = true;
    const runAll = () => {
      for (const f of [...cleanups]) {
        try {
          f();
        } catch {
          /* best effort */
        }
      }
      cleanups.clear();
    };
    process.on("exit", runAll);
    for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
      const onSig = () => {
        runAll();
        if (process.listenerCount(sig) === 1) {
          process.removeListener(sig, onSig);
          process.kill(process.pid, sig);
        }
      };
      process.on(sig, onSig);
    }
  }
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

// ---------------------------------------------------------------------------------------------
// The greeting

async function probeGreeting(host: string, port: number, timeoutMs: number): Promise<boolean> {
  let c: RawClient | undefined;
  try {
    c = await RawClient.connect(port, host, timeoutMs);
    const ok = /^220 /.test((await c.reply(timeoutMs)).at(-1) ?? "");
    if (ok) c.write("QUIT\r\n");
    return ok;
  } catch {
    return false;
  } finally {
    const sock = c;
    if (sock) setTimeout(() => sock.destroy(), 200).unref();
  }
}

/** Polls until a 220 greeting comes, at most totalMs; abort() returning a reason stops early. */
export async function waitForGreeting(
  host: string,
  port: number,
  totalMs: number,
  abort?: () => string | undefined,
): Promise<{ ok: true } | { ok: false; why: string }> {
  const deadline = Date.now() + totalMs;
  let delay = 20;
  while (Date.now() < deadline) {
    const why = abort?.();
    if (why) return { ok: false, why };
    if (await probeGreeting(host, port, Math.max(100, Math.min(2000, deadline - Date.now())))) return { ok: true };
    await sleep(delay);
    delay = Math.min(200, delay * 2);
  }
  return { ok: false, why: `no 220 greeting on ${host}:${port} within ${totalMs} ms` };
}

export async function readTail(file: string, max = 20000): Promise<string> {
  try {
    const s = await fs.readFile(file, "utf8");
    return s.length > max ? "...\n" + s.slice(-max) : s;
  } catch (e) {
    return `(cannot read ${file}: ${(e as Error).message})`;
  }
}

// ---------------------------------------------------------------------------------------------
// A foreground daemon

export interface Daemon {
  child: ChildProcess;
  /** Why it is gone, once it has exited (code/signal), or undefined while it runs. */
  exited(): string | undefined;
  /** Resolves when it has exited: its exit code and signal. */
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stdoutFile: string;
  stderrFile: string;
  /** What it wrote so far to stdout, then stderr. */
  output(): string;
  /** Polls output() until it matches re; rejects after timeoutMs (or once it has exited) with the output. */
  waitForOutput(re: RegExp, timeoutMs: number): Promise<void>;
  /** Sends sig to its process group; resolves once it has exited, rejects after timeoutMs. */
  kill(sig?: NodeJS.Signals, timeoutMs?: number): Promise<void>;
  /** SIGTERM to its process group, SIGKILL after graceMs; resolves once it has exited. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * Spawns cmd in its own process group (so stop() also reaches the children it forks: Exim's
 * deliveries, OpenSMTPD's privilege-separated processes), stdout/stderr into files in dir.
 */
export function spawnDaemon(cmd: string, args: string[], dir: string, name: string, env?: NodeJS.ProcessEnv): Daemon {
  const stdoutFile = path.join(dir, `${name}.stdout`);
  const stderrFile = path.join(dir, `${name}.stderr`);
  const out = openSync(stdoutFile, "a");
  const err = openSync(stderrFile, "a");
  let child: ChildProcess;
  try {
    child = spawn(cmd, args, { stdio: ["ignore", out, err], detached: true, env: env ?? process.env });
  } finally {
    closeSync(out);
    closeSync(err);
  }
  let why: string | undefined;
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => {
      why = `${name} exited (code ${code}, signal ${signal})`;
      resolve({ code, signal });
    });
    child.once("error", (e) => {
      why = `cannot run ${cmd}: ${e.message}`;
      resolve({ code: null, signal: null });
    });
  });
  const killGroup = (sig: NodeJS.Signals) => {
    if (!child.pid) return;
    try {
      process.kill(-child.pid, sig);
    } catch {
      try {
        process.kill(child.pid, sig);
      } catch {
        /* gone */
      }
    }
  };
  const forget = atExit(() => killGroup("SIGKILL"));
  const read = (f: string) => {
    try {
      return readFileSync(f, "utf8");
    } catch {
      return "";
    }
  };
  const output = () => read(stdoutFile) + read(stderrFile);
  return {
    child,
    exited: () => why,
    done,
    stdoutFile,
    stderrFile,
    output,
    async waitForOutput(re, timeoutMs) {
      const deadline = Date.now() + timeoutMs;
      while (!re.test(output())) {
        if (why || Date.now() > deadline) throw new Error(`${name}: no ${re} within ${timeoutMs} ms${why ? ` (${why})` : ""}; it said: ${output()}`);
        await sleep(25);
      }
    },
    async kill(sig = "SIGKILL", timeoutMs = 10_000) {
      if (!why) killGroup(sig);
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${name}: still running ${timeoutMs} ms after ${sig}`)), timeoutMs);
      });
      try {
        await Promise.race([done, late]);
      } finally {
        clearTimeout(timer);
      }
      forget();
    },
    async stop(graceMs = 3000) {
      if (!why) {
        killGroup("SIGTERM");
        const timer = setTimeout(() => killGroup("SIGKILL"), graceMs);
        await done;
        clearTimeout(timer);
      }
      // Children that outlived the leader (a delivery under way) go too.
      killGroup("SIGKILL");
      forget();
    },
  };
}

/** A temp dir removed at process exit unless removeNow() ran first. */
export function removeAtExit(dir: string): () => Promise<void> {
  const forget = atExit(() => rmSync(dir, { recursive: true, force: true }));
  return async () => {
    forget();
    await fs.rm(dir, { recursive: true, force: true });
  };
}

// ---------------------------------------------------------------------------------------------
// Maildir

/** Full paths of the messages in a Maildir (new/ and cur/), sorted by file name. */
export async function listMaildir(maildir: string): Promise<string[]> {
  const files: { name: string; full: string }[] = [];
  for (const sub of ["new", "cur"]) {
    let names: string[] = [];
    try {
      names = await fs.readdir(path.join(maildir, sub));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    for (const name of names) files.push({ name, full: path.join(maildir, sub, name) });
  }
  files.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return files.map((f) => f.full);
}

/**
 * Polls list() every 50 ms until it names at least n files, then reads them; rejects after
 * timeoutMs with what diagnose() says (the server's log).
 */
export async function waitForFiles(
  list: () => Promise<string[]>,
  n: number,
  timeoutMs: number,
  diagnose: () => Promise<string>,
): Promise<Buffer[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const files = await list();
    if (files.length >= n) return Promise.all(files.map((f) => fs.readFile(f)));
    if (Date.now() >= deadline) {
      throw new Error(`${files.length} of ${n} messages stored after ${timeoutMs} ms\n${await diagnose()}`);
    }
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------------------------
// A command that ends

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Standard input (default: none, stdin is closed at once). */
  input?: string | Buffer;
  /** Standard input from this file instead. */
  stdinFile?: string;
  /** Default 30 s; then the command is SIGKILLed and the promise rejects. */
  timeoutMs?: number;
  /** Added to process.env. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Runs a command without blocking the event loop, bounded in time; rejects when it cannot start or run out of time. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...opts.env }, cwd: opts.cwd });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => err.push(d));
    const text = (chunks: Buffer[]) => Buffer.concat(chunks).toString("utf8");
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} ${args.join(" ").slice(0, 200)} did not finish within ${timeoutMs} ms\n${text(err)}`));
    }, timeoutMs);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: text(out), stderr: text(err) });
    });
    child.stdin.on("error", () => undefined); // a child that exits before reading all of it
    if (opts.stdinFile) {
      fs.open(opts.stdinFile).then((h) => h.createReadStream().pipe(child.stdin), reject);
    } else {
      child.stdin.end(opts.input ?? "");
    }
  });
}
