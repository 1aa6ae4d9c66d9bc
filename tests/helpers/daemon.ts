// Test harness plumbing shared by the throw-away servers of the interop matrix (exim.ts,
// opensmtpd.ts, aiosmtpd.ts): a daemon started in the foreground in its own process group with
// its output in files, killed at process exit if the test forgets; the wait for its 220
// greeting; Maildir reading. postfix.ts keeps its own copies of these (it came first).

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import type { Test } from "tap";

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

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

function probeGreeting(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    let buf = "";
    let done = false;
    const sock = net.connect({ host, port });
    const finish = (ok: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (ok) sock.end("QUIT\r\n");
      setTimeout(() => sock.destroy(), 200).unref();
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    sock.setEncoding("latin1");
    sock.on("data", (d: string) => {
      buf += d;
      if (/(^|\r\n)220 [^\r\n]*\r\n/.test(buf)) finish(true);
      else if (/(^|\r\n)\d{3} [^\r\n]*\r\n/.test(buf)) finish(false);
    });
    sock.on("error", () => finish(false));
    sock.on("close", () => finish(false));
  });
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
  stdoutFile: string;
  stderrFile: string;
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
  const exitP = new Promise<void>((resolve) => {
    child.once("exit", (code, sig) => {
      why = `${name} exited (code ${code}, signal ${sig})`;
      resolve();
    });
    child.once("error", (e) => {
      why = `cannot run ${cmd}: ${e.message}`;
      resolve();
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
  return {
    child,
    exited: () => why,
    stdoutFile,
    stderrFile,
    async stop(graceMs = 3000) {
      if (!why) {
        killGroup("SIGTERM");
        const timer = setTimeout(() => killGroup("SIGKILL"), graceMs);
        await exitP;
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
