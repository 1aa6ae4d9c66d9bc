// Test helper: a seeded pseudo-random generator for the torture suite, so a failing run can be
// repeated exactly. Each file has a fixed default seed (CI runs are repeatable); the environment
// variable TORTURE_SEED overrides it (a number, or "random" for one from the clock). The test
// logs the seed it used (t.comment) either way. watchProcess() collects what escapes to the
// process (uncaught exceptions, unhandled rejections) while a test runs: there must be none.

import type { Test } from "tap";

/** mulberry32: 32 bits of state, good enough to pick bytes, lengths and moments. */
export class Prng {
  private state: number;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  /** A float in [0, 1). */
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** An integer in [lo, hi] (both included). */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }

  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }

  /** A weighted choice: [[weight, value], ...]. */
  weighted<T>(table: ReadonlyArray<readonly [number, T]>): T {
    const total = table.reduce((sum, [w]) => sum + w, 0);
    let x = this.next() * total;
    for (const [w, v] of table) {
      if ((x -= w) < 0) return v;
    }
    return table[table.length - 1][1];
  }
}

/** TORTURE_SEED when set (a number, or "random": one from the clock), else the file's default. */
export function torturePrng(defaultSeed: number): Prng {
  const given = process.env.TORTURE_SEED?.trim();
  if (given === "random") return new Prng((Date.now() ^ (process.pid << 16)) >>> 0);
  if (given !== undefined && /^\d+$/.test(given)) return new Prng(Number(given) >>> 0);
  return new Prng(defaultSeed);
}

/** Exceptions that escape to the process while a test runs: there must be none. */
export function watchProcess(tt: Test): { escaped: unknown[] } {
  const escaped: unknown[] = [];
  const onError = (err: unknown) => escaped.push(err);
  process.on("uncaughtException", onError);
  process.on("unhandledRejection", onError);
  tt.teardown(() => {
    process.off("uncaughtException", onError);
    process.off("unhandledRejection", onError);
  });
  return { escaped };
}
