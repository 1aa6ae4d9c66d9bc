// bench/lib/spool.mjs - the benchmark's messages: one body generator and one header block
// for every client (so mudmail's queue files and Nodemailer's raw messages carry the same
// bytes), and fast writers that drop queue files straight into outgoing/ before an engine
// runs (nothing reads the folder then, so no tmp/ + rename is needed).
//
// A queue file (queue.ts) is: the sender line, the recipients line, then the message.

import * as fs from "node:fs";
import * as path from "node:path";
import { execFileSync } from "node:child_process";

export const FROM = "bench@localhost";
/** The sender of the DKIM cases: the key signs mail From this domain. */
export const DKIM_DOMAIN = "bench.test";
export const DKIM_SELECTOR = "bench";
export const DKIM_FROM = `bench@${DKIM_DOMAIN}`;
export const rcpt = (i) => `user${i}@example.test`;

/** A body of exactly `size` bytes (LF line ends), with lines a client must dot-stuff. */
export function makeBody(size) {
  const lines = [];
  let length = 0;
  const words = "the quick brown fox jumps over the lazy dog while the talker keeps on talking".split(" ");
  for (let i = 0; length < size; i++) {
    let line;
    if (i % 10 === 3) line = ".";                                  // a lone dot: would end DATA
    else if (i % 10 === 7) line = `.leading dot on line ${i}`;     // must go out as "..leading"
    else if (i % 10 === 9) line = `..two dots on line ${i}`;
    else line = Array.from({ length: 11 }, (_, k) => words[(i + k) % words.length]).join(" ");
    lines.push(line);
    length += line.length + 1;
  }
  const text = lines.join("\n") + "\n";
  return text.length >= size ? text.slice(0, size - 1) + "\n" : text;
}

export function rfc2822Date(d = new Date()) {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const p = (n) => String(n).padStart(2, "0");
  return `${days[d.getUTCDay()]}, ${d.getUTCDate()} ${months[d.getUTCMonth()]} ${d.getUTCFullYear()} ` +
    `${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000`;
}

/** The header block of message i (LF line ends, ending with the blank line). */
export function headers(i, date, tag = "bench", from = FROM) {
  return `Date: ${date}\n` +
    `Message-ID: <${tag}.${i}@localhost>\n` +
    `From: Bench <${from}>\n` +
    `To: ${rcpt(i)}\n` +
    `Subject: bench message ${i}\n` +
    "\n";
}

/** Queue ids: <unix seconds>.<n>, as queue.ts makes them. */
export const queueId = (seconds, i) => `${seconds}.${i}`;

/**
 * Writes queue files number `from` to `to - 1` of `size`-byte bodies into `dir`, with
 * `concurrency` writes in flight. Returns the seconds it took.
 */
export async function writeQueueFiles(dir, from, to, size, { concurrency = 16, tag = "bench", seconds = Math.floor(Date.now() / 1000) } = {}) {
  const t0 = performance.now();
  await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
  const body = makeBody(size);
  const date = rfc2822Date();
  let next = from;
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, to - from)) }, async () => {
    while (next < to) {
      const i = next++;
      const text = `<${FROM}>\n${rcpt(i)}\n` + headers(i, date, tag) + body;
      await fs.promises.writeFile(path.join(dir, queueId(seconds, i)), text, { mode: 0o600 });
    }
  }));
  return (performance.now() - t0) / 1000;
}

/** n fresh queue files straight into `<maildir>/outgoing/`. Returns the seconds it took. */
export function writeSpool(maildir, n, size, options = {}) {
  return writeQueueFiles(path.join(maildir, "outgoing"), 0, n, size, options);
}

/**
 * syncfs(2) on the file system that holds `dir` (coreutils' `sync -f`): every file written
 * there so far is on disk, its blocks allocated, as if each had been fsynced.
 */
export function syncFs(dir) {
  execFileSync("sync", ["-f", dir], { timeout: 120_000 });
}

/**
 * A stock of queue files written once per run and size, handed to each case in its own
 * outgoing/: copyInto() copies them (new inodes, new blocks) and syncs the file system, so
 * the spool is what another program leaves when it drops fsynced files in outgoing/, and
 * the engine's unlink frees real blocks, as with the queue files send() writes by default.
 * linkInto() hard-links them instead (the bench's old, cheap method: an unlink then only
 * drops a link), kept for one labelled row.
 *
 * Why a stock: on this kind of machine (a Firecracker VM, memory backed by the host on first
 * touch) writing a 1 KB file with Node costs 10 µs one minute and 800 µs the next; a copy
 * of a file written once is the cheapest way to a fresh spool for every case.
 */
export class Stock {
  constructor(dir, size, { concurrency = 16 } = {}) {
    this.dir = dir;
    this.size = size;
    this.concurrency = concurrency;
    this.count = 0;
    this.seconds = Math.floor(Date.now() / 1000);
    this.writeSeconds = 0;
  }

  /** Makes sure the stock holds at least n files. */
  async ensure(n) {
    if (n <= this.count) return;
    this.writeSeconds += await writeQueueFiles(this.dir, this.count, n, this.size, { concurrency: this.concurrency, seconds: this.seconds });
    this.count = n;
  }

  /**
   * Copies the first n files into `<maildir>/outgoing/` and syncs the file system. Returns
   * { seconds, syncSeconds }: the copying and the sync.
   */
  async copyInto(maildir, n) {
    const seconds = await this.#put(maildir, n, fs.copyFileSync);
    const t0 = performance.now();
    syncFs(maildir);
    return { seconds, syncSeconds: (performance.now() - t0) / 1000 };
  }

  /** Links the first n files into `<maildir>/outgoing/`. Returns the seconds it took. */
  linkInto(maildir, n) {
    return this.#put(maildir, n, fs.linkSync);
  }

  /** put(stockFile, outgoingFile) for the first n files; the seconds it took (not the stock's writing). */
  async #put(maildir, n, put) {
    await this.ensure(n);
    const t0 = performance.now();
    const outgoing = path.join(maildir, "outgoing");
    fs.mkdirSync(outgoing, { recursive: true, mode: 0o700 });
    for (let i = 0; i < n; i++) {
      const name = queueId(this.seconds, i);
      put(path.join(this.dir, name), path.join(outgoing, name));
    }
    return (performance.now() - t0) / 1000;
  }
}

/**
 * What unlinking a 1 KB file costs here, in µs (over n files each): one on disk (written,
 * then the file system synced: what the bench's spools and send()'s fsynced files are), one
 * never synced (the old bench's fresh files: ext4 has not given it blocks yet), and a hard
 * link that is not the last (the old bench's linked spools).
 */
export function unlinkCost(dir, n = 2000) {
  fs.mkdirSync(dir, { recursive: true });
  const body = "x".repeat(1200);
  const names = (tag) => Array.from({ length: n }, (_, i) => path.join(dir, `${tag}${i}`));
  const time = (files) => {
    const t0 = performance.now();
    for (const f of files) fs.unlinkSync(f);
    return Math.round(((performance.now() - t0) * 10_000) / n) / 10;
  };
  const synced = names("s");
  for (const f of synced) fs.writeFileSync(f, body);
  syncFs(dir);
  const syncedUs = time(synced);
  const fresh = names("f");
  for (const f of fresh) fs.writeFileSync(f, body);
  for (const f of fresh) fs.linkSync(f, `${f}.l`);
  const notLastUs = time(fresh.map((f) => `${f}.l`));
  const unsyncedUs = time(fresh);
  fs.rmSync(dir, { recursive: true, force: true });
  return { syncedUs, unsyncedUs, notLastUs };
}

/**
 * Writes one queue file of about `bytes` bytes to `file`, in 1 MiB pieces (never the whole
 * message in memory).
 */
export async function writeBigMessage(file, bytes, i = 0) {
  const piece = makeBody(1024 * 1024);
  const fh = await fs.promises.open(file, "w", 0o600);
  try {
    await fh.write(`<${FROM}>\n${rcpt(i)}\n` + headers(i, rfc2822Date(), "big"));
    for (let written = 0; written < bytes; written += piece.length) await fh.write(piece);
  } finally {
    await fh.close();
  }
}

