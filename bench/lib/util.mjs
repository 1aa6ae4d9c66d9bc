// bench/lib/util.mjs - small helpers shared by bench/run.mjs and bench/worker.mjs: child
// processes with a hard time limit (every one of them killed on exit or Ctrl-C), a
// memory sampler, an event-loop-delay summary, percentiles and number formatting.

import { spawn } from "node:child_process";
import * as fs from "node:fs";
import { monitorEventLoopDelay } from "node:perf_hooks";

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const MB = 1024 * 1024;
export const round = (x, digits = 2) => (x == null || !Number.isFinite(x) ? null : Math.round(x * 10 ** digits) / 10 ** digits);
export const toMB = (bytes) => round(bytes / MB, 1);

/* ---------------------------------------------------------------------------------- */
/* Child processes                                                                     */

/** Every child still running, so a Ctrl-C or an exception never leaves one behind. */
const children = new Set();

export function killAllChildren() {
  for (const child of children) {
    try { child.kill("SIGKILL"); } catch { /* gone */ }
  }
}

/**
 * Runs a command to completion, or kills it (SIGTERM, then SIGKILL after 3 s) after
 * `timeoutMs`. stdout and stderr go to files (smtp-sink and friends can write a lot).
 * Resolves { code, signal, ms, timedOut, error }; never rejects.
 */
export function run(cmd, args, { timeoutMs, stdoutFile = null, stderrFile = null, env = process.env } = {}) {
  return new Promise((resolve) => {
    const out = stdoutFile ? fs.openSync(stdoutFile, "w") : "ignore";
    const err = stderrFile ? fs.openSync(stderrFile, "w") : "ignore";
    let child;
    const t0 = performance.now();
    try {
      child = spawn(cmd, args, { stdio: ["ignore", out, err], env });
    } catch (e) {
      resolve({ code: null, signal: null, ms: 0, timedOut: false, error: e.message });
      return;
    } finally {
      if (typeof out === "number") fs.closeSync(out);
      if (typeof err === "number") fs.closeSync(err);
    }
    children.add(child);
    let timedOut = false;
    let killTimer = null;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGTERM");
      killTimer = setTimeout(() => child.kill("SIGKILL"), 3000);
    }, timeoutMs);
    let error = null;
    child.once("error", (e) => { error = e.message; });
    child.once("close", (code, signal) => {
      const ms = performance.now() - t0;
      clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      children.delete(child);
      resolve({ code, signal, ms, timedOut, error });
    });
  });
}

/** Starts a long-lived child (a server); the caller stops it. Tracked like run()'s. */
export function startChild(cmd, args, { stdoutFile, stderrFile }) {
  const out = fs.openSync(stdoutFile, "w");
  const err = fs.openSync(stderrFile, "w");
  let child;
  try {
    child = spawn(cmd, args, { stdio: ["ignore", out, err] });
  } finally {
    fs.closeSync(out);
    fs.closeSync(err);
  }
  children.add(child);
  let exited = null;
  const exitPromise = new Promise((resolve) => {
    child.once("exit", (code, signal) => { exited = `${cmd} exited (code ${code}, signal ${signal})`; children.delete(child); resolve(); });
    child.once("error", (e) => { exited = `cannot run ${cmd}: ${e.message}`; children.delete(child); resolve(); });
  });
  return {
    child,
    exited: () => exited,
    async stop() {
      if (exited) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 3000);
      await exitPromise;
      clearTimeout(t);
    },
  };
}

/* ---------------------------------------------------------------------------------- */
/* Measuring inside a worker                                                           */

/** Samples process RSS every `everyMs`; stop() returns the peak in bytes. */
export function rssSampler(everyMs) {
  let peak = process.memoryUsage.rss();
  const timer = setInterval(() => {
    const now = process.memoryUsage.rss();
    if (now > peak) peak = now;
  }, everyMs);
  return {
    stop() {
      clearInterval(timer);
      return Math.max(peak, process.memoryUsage.rss());
    },
  };
}

/** monitorEventLoopDelay at 1 ms resolution; stop() disables it and returns ms figures. */
export function loopDelay() {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  return {
    stop() {
      h.disable();
      const ms = (ns) => round(ns / 1e6, 2);
      return { p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max), mean: ms(h.mean), samples: h.count };
    },
  };
}

export function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

/* ---------------------------------------------------------------------------------- */
/* Formatting                                                                          */

export const fmtInt = (x) => (x == null || !Number.isFinite(x) ? "-" : Math.round(x).toLocaleString("en-US"));
export const fmt = (x, digits = 1) => (x == null || !Number.isFinite(x) ? "-" : x.toFixed(digits));

/** A target's measured ÷ wanted (1 is the line itself), for the targets tables; "-" when not measured. */
export const margin = (t) => (t.ratio == null ? "-" : `${fmt(t.ratio, 2)}`);

/** A plain text table: rows of cells, the first row the header; numbers right-aligned. */
export function table(rows) {
  const widths = [];
  for (const row of rows) row.forEach((cell, i) => { widths[i] = Math.max(widths[i] ?? 0, String(cell).length); });
  const line = (row) => row.map((cell, i) => {
    const s = String(cell);
    return i > 0 && /^[-+~<>≥≤]?[\d,.]+/.test(s) ? s.padStart(widths[i]) : s.padEnd(widths[i]);
  }).join("  ").trimEnd();
  return [line(rows[0]), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}
