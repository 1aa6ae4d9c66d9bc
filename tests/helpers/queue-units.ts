// Test helper for the unit tests of queue.ts (tests/spool/): a fresh spool in a temp dir
// (tempSpool), a fixed clock (atTime, fixedNow), folder access (list, put, read, exists), a
// seeded generator (prng), and a reference stuffer / un-stuffer with the bodies that break
// naive ones (stuff, unstuff, normalise, expectedLines, STUFFER_BODIES).

import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Test } from "tap";
import { Spool, Stuffer, type Folder } from "../../queue.js";

export const latin1 = (s: string): Buffer => Buffer.from(s, "latin1");
export const show = (b: Buffer): string => JSON.stringify(b.toString("latin1"));

/* ------------------------------------------------------------------------------------ */
/* Helpers                                                                               */

/** A fresh spool in its own temp dir, removed when the test ends. */
export async function tempSpool(t: Test, opts: { fsync?: boolean } = {}): Promise<Spool> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-queue-test-"));
  t.teardown(() => fs.rm(root, { recursive: true, force: true }));
  const spool = new Spool(path.join(root, "maildir"), opts);
  await spool.init();
  return spool;
}

/** Runs fn with Date.now() fixed at `ms`, restoring the real clock afterwards. */
export async function atTime<T>(ms: number, fn: () => Promise<T>): Promise<T> {
  const real = Date.now;
  Date.now = () => ms;
  try {
    return await fn();
  } finally {
    Date.now = real;
  }
}

/** A time in the middle of the current second, so the seconds part is fixed. */
export function fixedNow(): { ms: number; sec: number } {
  const sec = Math.floor(Date.now() / 1000);
  return { ms: sec * 1000 + 500, sec };
}

export async function list(spool: Spool, folder: Folder | "tmp"): Promise<string[]> {
  return (await fs.readdir(path.join(spool.dir, folder))).sort();
}

export async function put(spool: Spool, folder: Folder, name: string, content: string | Buffer): Promise<void> {
  await fs.writeFile(spool.pathOf(folder, name), content, { mode: 0o600 });
}

export async function read(spool: Spool, folder: Folder, name: string): Promise<Buffer> {
  return fs.readFile(spool.pathOf(folder, name));
}

export async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(() => true, () => false);
}

export async function collect(gen: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of gen) parts.push(Buffer.from(b));
  return Buffer.concat(parts);
}

/** A deterministic pseudo-random generator (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/* ------------------------------------------------------------------------------------ */
/* The stuffer                                                                           */

/** Stuffs the chunks with one Stuffer: output of every push, then end(). */
export function stuff(chunks: Buffer[]): { body: Buffer; end: Buffer; eightBit: boolean } {
  const s = new Stuffer();
  const parts = chunks.map((c) => Buffer.from(s.push(c)));
  return { body: Buffer.concat(parts), end: s.end(), eightBit: s.eightBit };
}

/** The input with every CRLF, bare CR and bare LF made CRLF (the reference, by regex). */
export function normalise(input: Buffer): string {
  return input.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
}

/**
 * A reference un-stuffer, independent of the implementation: checks the wire form of DATA
 * (no bare CR or LF, terminator once and at the end, every dot line stuffed) and returns
 * the lines it carries. Problems go into `problems`.
 */
export function unstuff(wire: Buffer, problems: string[]): string[] {
  const s = wire.toString("latin1");
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\r" && s[i + 1] !== "\n") problems.push(`bare CR at ${i}`);
    if (s[i] === "\n" && s[i - 1] !== "\r") problems.push(`bare LF at ${i}`);
  }
  if (s === ".\r\n") return [];
  let count = 0;
  for (let i = s.indexOf("\r\n.\r\n"); i >= 0; i = s.indexOf("\r\n.\r\n", i + 1)) count++;
  if (s.startsWith(".\r\n")) count++; // a terminator right after the DATA line's CRLF
  if (count !== 1) problems.push(`terminator found ${count} times`);
  if (!s.endsWith("\r\n.\r\n")) problems.push("does not end with CRLF.CRLF");
  const lines = s.slice(0, -3).split("\r\n");
  lines.pop(); // the empty string after the last line's CRLF
  return lines.map((line, n) => {
    if (!line.startsWith(".")) return line;
    if (!line.startsWith("..")) problems.push(`line ${n} starts with an unstuffed dot: ${JSON.stringify(line)}`);
    return line.slice(1);
  });
}

/** The lines the input holds, as the receiver should see them. */
export function expectedLines(input: Buffer): string[] {
  const n = normalise(input);
  if (n === "") return [];
  const lines = (n.endsWith("\r\n") ? n.slice(0, -2) : n).split("\r\n");
  return lines;
}

export const STUFFER_BODIES: Array<[string, Buffer]> = [
  ["line starting with a dot", latin1(".hello\r\nworld\r\n")],
  ["line starting with two dots", latin1("..x\r\n..\r\n")],
  ["a lone dot line", latin1("a\r\n.\r\nb\r\n")],
  ["bare CR", latin1("a\rb\r.c\r")],
  ["bare LF", latin1("a\nb\n.c\n")],
  ["CRLF", latin1("a\r\nb\r\n")],
  ["CR CR LF", latin1("a\r\r\nb\r\r\n.")],
  ["LF dot LF", latin1("x\n.\ny")],
  ["CRLF dot CR", latin1("x\r\n.\ry")],
  ["CRLF dot CRLF inside", latin1("head\r\n.\r\ntail\r\n")],
  ["starts with CRLF dot CRLF", latin1("\r\n.\r\n")],
  ["no final newline", latin1("line1\r\nline2")],
  ["empty", latin1("")],
  ["just a dot", latin1(".")],
  ["just a newline", latin1("\n")],
  ["dot CR", latin1(".\r")],
  ["only line ends", latin1("\n\n\r\r\n\r\n\r")],
  ["LF CR", latin1("a\n\rb\n\r.")],
  ["NUL bytes", latin1("a\0b\r\n\0.\r\n.\0\n\0")],
  ["8-bit bytes", Buffer.from([0x80, 0xff, 0x0a, 0x2e, 0xe9, 0x0d, 0x2e, 0x2e, 0xc3, 0xa9])],
  ["UTF-8 text", Buffer.from("caf\u00e9\n.na\u00efve\r\n", "utf8")],
];
{
  // One longer body mixing everything, for the two-chunk and byte-by-byte splits.
  const rnd = prng(42);
  const alphabet = [".", ".", "\r", "\n", "\r\n", "a", "b", " ", "\0", "\u00e9", "xyz"];
  let s = "";
  while (s.length < 300) s += alphabet[Math.floor(rnd() * alphabet.length)];
  STUFFER_BODIES.push(["random mix", latin1(s)]);
}
