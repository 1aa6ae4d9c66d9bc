// Fuzzed replies: the ReplyParser fed 20,000 seeded transcripts, valid ones and ones mutated
// (bit flips, truncation, duplication, deletion, inserted bytes, endless lines, swapped
// separators), each pushed whole and again split at random points. No exception; every reply
// well formed; the same replies whatever the split; never more held than MAX_REPLY_LINE x
// MAX_REPLY_LINES; after a 600 (or the end) no more input taken.
//
// TORTURE_SEED=<n> (or "random") changes the seed; the seed used is printed as a comment.

import t from "tap";
import {
  CODE_GARBAGE, CODE_PREMATURE_EOF, MAX_REPLY_LINE, MAX_REPLY_LINES, ReplyParser, type Reply,
} from "../../smtp-codes.js";
import { Prng, torturePrng, watchProcess } from "../helpers/prng.js";

const base = torturePrng(7_2026_1123);
t.comment(`seed ${base.seed} (TORTURE_SEED=${base.seed} repeats this run)`);

const ITERATIONS = 20_000;

const CODES = [211, 214, 220, 221, 235, 250, 251, 252, 334, 354, 421, 450, 451, 452, 454, 500, 501, 502, 503, 504, 530, 535, 550, 551, 552, 553, 554];

/** Text of a reply line: printable ASCII, sometimes UTF-8, sometimes an enhanced code first. */
function replyTextLine(r: Prng, code: number): string {
  let text = "";
  if (r.chance(0.3)) {
    const cls = r.chance(0.85) ? Math.floor(code / 100) : r.pick([2, 4, 5]);
    text += `${cls}.${r.int(8)}.${r.int(30)}${r.pick([" ", " ", ""])}`;
  }
  const length = r.weighted([[85, r.int(60)], [12.5, r.range(60, 400)], [2, r.range(400, 4000)], [0.5, MAX_REPLY_LINE - 4 - r.int(3)]]);
  const pieces = ["ok", " ", "mx.example.org", "ESMTP", "PIPELINING", "SIZE 10240000", "<a@b.example>", "queued as 4F2A", "caf\u00e9", "\u2603", "-", "\t"];
  while (text.length < length) text += r.chance(0.7) ? r.pick(pieces) : String.fromCharCode(r.range(0x20, 0x7e));
  // Keep within one line of at most MAX_REPLY_LINE octets, code and separator included.
  while (Buffer.byteLength(text) > MAX_REPLY_LINE - 4) text = text.slice(0, -1);
  return text;
}

/** A valid server transcript and the replies it holds. */
function validTranscript(r: Prng): { bytes: Buffer; replies: Array<{ code: number; lines: string[] }> } {
  const replies: Array<{ code: number; lines: string[] }> = [];
  let text = "";
  const count = r.weighted([[50, r.range(1, 3)], [45, r.range(4, 12)], [5, r.range(13, 40)]]);
  for (let i = 0; i < count; i++) {
    const code = r.chance(0.9) ? r.pick(CODES) : r.range(200, 599);
    const n = r.weighted([[70, 1], [25.5, r.range(2, 12)], [4, r.range(13, 200)], [0.5, r.range(MAX_REPLY_LINES - 5, MAX_REPLY_LINES)]]);
    const lines: string[] = [];
    for (let j = 0; j < n; j++) {
      const last = j === n - 1;
      const bare = last && r.chance(0.05);
      const line = bare ? "" : replyTextLine(r, code);
      lines.push(line);
      const eol = r.chance(0.85) ? "\r\n" : "\n";
      text += bare ? `${code}${eol}` : `${code}${last ? " " : "-"}${line}${eol}`;
    }
    replies.push({ code, lines });
  }
  return { bytes: Buffer.from(text, "utf8"), replies };
}

/** Mutations of a transcript, as a broken or hostile server produces them. */
function mutate(r: Prng, input: Buffer): { bytes: Buffer; how: string[] } {
  let b = Buffer.from(input);
  const how: string[] = [];
  const rounds = r.weighted([[50, 1], [35, 2], [15, r.range(3, 8)]]);
  for (let i = 0; i < rounds; i++) {
    const at = r.int(b.length + 1);
    const kind = r.weighted([
      [20, "bitflip"], [12, "truncate"], [12, "duplicate"], [10, "delete"], [10, "insert-random"],
      [6, "endless"], [8, "swap-separator"], [8, "drop-lf"], [6, "lf-to-cr"], [2, "many-lines"], [4, "code-change"],
    ] as const);
    how.push(kind);
    switch (kind) {
      case "bitflip": {
        const flips = r.range(1, 8);
        for (let k = 0; k < flips && b.length > 0; k++) b[r.int(b.length)] ^= 1 << r.int(8);
        break;
      }
      case "truncate":
        b = b.subarray(0, at);
        break;
      case "duplicate": {
        const end = Math.min(b.length, at + r.int(400));
        const copies = r.weighted([[85, 1], [13, r.range(2, 10)], [2, r.range(10, 100)]]);
        b = Buffer.concat([b.subarray(0, end), ...Array(copies).fill(b.subarray(at, end)), b.subarray(end)]);
        break;
      }
      case "delete":
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + r.range(1, 50)))]);
        break;
      case "insert-random":
        b = Buffer.concat([b.subarray(0, at), r.bytes(r.range(1, 64)), b.subarray(at)]);
        break;
      case "endless": {
        // A run without LF around the line limit, or far past it.
        const length = r.weighted([[45, MAX_REPLY_LINE - 8 + r.int(16)], [50, r.range(1, 9000)], [5, r.range(9000, 70_000)]]);
        const fill = Buffer.alloc(length, r.pick([0x41, 0x2d, 0x20, 0x0d, 0x00, 0xff, 0x35]));
        b = Buffer.concat([b.subarray(0, at), fill, b.subarray(at)]);
        break;
      }
      case "swap-separator": {
        for (let k = 0; k < 4; k++) {
          const p = b.indexOf(r.chance(0.5) ? "-" : " ", r.int(b.length + 1));
          if (p >= 0) b[p] = b[p] === 0x2d ? 0x20 : 0x2d;
        }
        break;
      }
      case "drop-lf": {
        const p = b.indexOf(0x0a, at);
        if (p >= 0) b = Buffer.concat([b.subarray(0, p), b.subarray(p + 1)]);
        break;
      }
      case "lf-to-cr": {
        const p = b.indexOf(0x0a, at);
        if (p >= 0) b[p] = 0x0d;
        break;
      }
      case "many-lines": {
        // A multi-line reply around MAX_REPLY_LINES lines, or past it.
        const n = r.weighted([[50, MAX_REPLY_LINES - 2 + r.int(5)], [50, r.range(MAX_REPLY_LINES, 3 * MAX_REPLY_LINES)]]);
        const code = r.pick(CODES);
        const lines = Array.from({ length: n }, (_, k) => `${code}${k === n - 1 && r.chance(0.7) ? " " : "-"}line ${k}\r\n`).join("");
        b = Buffer.concat([b.subarray(0, at), Buffer.from(lines), b.subarray(at)]);
        break;
      }
      case "code-change": {
        const p = r.int(Math.max(1, b.length - 3));
        b.write(String(r.pick([0, 99, 100, 199, 600, 621, 700, 999, 250, 354])).padStart(3, "0"), p, "latin1");
        break;
      }
    }
  }
  return { bytes: b, how };
}

/** Split points: one push, a few pieces, many small ones, or byte by byte (short inputs only). */
function split(r: Prng, b: Buffer): Buffer[] {
  const mode = r.weighted([[15, "whole"], [45, "few"], [30, "many"], [10, "bytes"]] as const);
  if (mode === "whole" || b.length === 0) return [b];
  if (mode === "bytes" && b.length <= 600) return Array.from({ length: b.length }, (_, i) => b.subarray(i, i + 1));
  const pieces: Buffer[] = [];
  const cuts = mode === "few" ? r.range(1, 6) : r.range(7, Math.min(100, Math.max(7, b.length)));
  const points = Array.from({ length: cuts }, () => r.int(b.length + 1)).sort((x, y) => x - y);
  let last = 0;
  for (const p of points) {
    pieces.push(b.subarray(last, p));
    last = p;
  }
  pieces.push(b.subarray(last));
  return pieces;
}

interface ParserPeek {
  partialLength?: number;
  partial?: Buffer[];
  lines?: string[];
}

/** What a reply may look like; returns the problems found. */
function replyProblems(reply: Reply): string[] {
  const problems: string[] = [];
  if (typeof reply !== "object" || reply === null) return [`not an object: ${String(reply)}`];
  const { code, enhanced, lines } = reply;
  const keys = Object.keys(reply).sort().join(",");
  if (keys !== "code,enhanced,lines") problems.push(`keys ${keys}`);
  if (!Number.isInteger(code)) problems.push(`code ${String(code)}`);
  const parsed = code >= 200 && code <= 599;
  if (!parsed && code !== CODE_GARBAGE && code !== CODE_PREMATURE_EOF) problems.push(`code ${code} out of range`);
  if (!Array.isArray(lines) || lines.length === 0) return [...problems, "no lines"];
  if (lines.some((l) => typeof l !== "string")) problems.push("a line that is not a string");
  if (parsed) {
    if (lines.length > MAX_REPLY_LINES) problems.push(`${lines.length} lines`);
    // Each input octet gives at most one UTF-16 unit: the text after code and separator.
    const longest = Math.max(...lines.map((l) => l.length));
    if (longest > MAX_REPLY_LINE - 4) problems.push(`a line of ${longest} characters`);
    if (lines.some((l) => l.includes("\n"))) problems.push("LF inside a line");
  } else if (code === CODE_GARBAGE) {
    if (lines.length !== 1 || !/^(reply line longer than|Improperly-formatted smtp reply|multi-line reply longer than)/.test(lines[0])) {
      problems.push(`600 says ${JSON.stringify(lines).slice(0, 200)}`);
    }
    if (lines[0].length > 400) problems.push(`600 text of ${lines[0].length} characters`);
  } else {
    if (lines[0] !== "Premature EOF during smtp reply.") problems.push(`621 says ${JSON.stringify(lines[0])}`);
    // The lines so far, and the unfinished one (CR included) at most one line long.
    if (lines.length > MAX_REPLY_LINES + 2) problems.push(`621 with ${lines.length} lines`);
    if (Math.max(...lines.map((l) => l.length)) > MAX_REPLY_LINE + 1) problems.push("621 with an over-long line");
  }
  if (enhanced !== null) {
    const m = /^([245])\.\d{1,3}\.\d{1,3}$/.exec(String(enhanced));
    if (!m) problems.push(`enhanced ${JSON.stringify(enhanced)}`);
    else if (Number(m[1]) !== Math.floor(code / 100)) problems.push(`enhanced ${enhanced} with code ${code}`);
    else if (!lines[0].startsWith(String(enhanced))) problems.push(`enhanced ${enhanced} not from the first line`);
  }
  return problems;
}

/** Feeds the chunks; checks what the parser holds after every push. */
function run(chunks: Buffer[], held: { max: number; problems: string[] }): { replies: Reply[]; end: Reply | null; refusedAfter: boolean } {
  const parser = new ReplyParser();
  const peek = parser as unknown as ParserPeek;
  const replies: Reply[] = [];
  let broken = false;
  for (const chunk of chunks) {
    const out = parser.push(chunk);
    if (broken && out.length > 0) held.problems.push("replies after a 600");
    replies.push(...out);
    if (out.some((x) => x.code === CODE_GARBAGE)) {
      broken = true;
      if (out[out.length - 1].code !== CODE_GARBAGE) held.problems.push("a reply after the 600 in the same push");
    }
    if (typeof peek.partialLength === "number" && Array.isArray(peek.lines)) {
      const partial = peek.partialLength;
      const lineBytes = peek.lines.reduce((sum, l) => sum + l.length, 0);
      held.max = Math.max(held.max, partial + lineBytes);
      if (partial > MAX_REPLY_LINE + 1) held.problems.push(`holds a partial line of ${partial} octets`);
      if (peek.lines.length > MAX_REPLY_LINES) held.problems.push(`holds ${peek.lines.length} lines`);
      if (partial + lineBytes > MAX_REPLY_LINE * MAX_REPLY_LINES) held.problems.push(`holds ${partial + lineBytes} octets`);
    }
  }
  const end = parser.end();
  // After a 600, or a 621 at the end, the parser takes nothing more (the caller drops the
  // connection). A clean end() between replies leaves it usable.
  const after = parser.push(Buffer.from("250 2.0.0 more\r\n"));
  const refusedAfter = broken || end !== null ? after.length === 0 && parser.end() === null : after.length === 1;
  return { replies, end, refusedAfter };
}

t.test(`fuzzed replies: ${ITERATIONS} valid and mutated transcripts, whole and split`, async (t) => {
  const { escaped } = watchProcess(t);
  const r = new Prng(base.seed ^ 0x5eed_0001);
  const held = { max: 0, problems: [] as string[] };
  const failures: string[] = [];
  const stats = { valid: 0, mutated: 0, replies: 0, garbage: 0, eof: 0, bytes: 0, pushes: 0 };
  const fail = (i: number, input: Buffer, what: string) => {
    if (failures.length < 20) failures.push(`#${i}: ${what}; input ${JSON.stringify(input.subarray(0, 300).toString("latin1"))}${input.length > 300 ? `... (${input.length} octets)` : ""}`);
    else failures.push("");
  };
  for (let i = 0; i < ITERATIONS; i++) {
    const valid = validTranscript(r);
    const mutated = r.chance(0.75);
    const { bytes, how } = mutated ? mutate(r, valid.bytes) : { bytes: valid.bytes, how: [] as string[] };
    if (mutated) stats.mutated++;
    else stats.valid++;
    stats.bytes += bytes.length;
    const chunks = split(r, bytes);
    stats.pushes += chunks.length;
    let whole: ReturnType<typeof run>;
    let pieces: ReturnType<typeof run>;
    try {
      whole = run([bytes], held);
      pieces = run(chunks, held);
    } catch (err) {
      fail(i, bytes, `threw ${(err as Error).stack ?? String(err)} (${how.join(", ")})`);
      continue;
    }
    for (const reply of [...pieces.replies, ...(pieces.end ? [pieces.end] : [])]) {
      const problems = replyProblems(reply);
      if (problems.length > 0) fail(i, bytes, `${problems.join("; ")} in ${JSON.stringify(reply).slice(0, 300)}`);
    }
    const same = JSON.stringify([whole.replies, whole.end]) === JSON.stringify([pieces.replies, pieces.end]);
    if (!same) fail(i, bytes, `split into ${chunks.length} pushes the replies differ (${how.join(", ")})`);
    if (!pieces.refusedAfter || !whole.refusedAfter) fail(i, bytes, "input taken after a 600 or a 621 (or refused after a clean end)");
    const garbage = pieces.replies.filter((x) => x.code === CODE_GARBAGE).length;
    if (garbage > 1 || (garbage === 1 && pieces.replies[pieces.replies.length - 1].code !== CODE_GARBAGE)) fail(i, bytes, "a reply after the 600");
    if (garbage === 1 && pieces.end !== null) fail(i, bytes, "end() after a 600 gave a reply");
    if (!mutated) {
      const got = pieces.replies.map((x) => ({ code: x.code, lines: x.lines }));
      if (JSON.stringify(got) !== JSON.stringify(valid.replies) || pieces.end !== null) fail(i, bytes, "a valid transcript was not parsed as written");
    }
    stats.replies += pieces.replies.length;
    stats.garbage += garbage;
    if (pieces.end) stats.eof++;
  }
  for (const p of [...new Set(held.problems)].slice(0, 10)) failures.push(`parser state: ${p}`);
  t.same(failures.filter(Boolean).slice(0, 20), [], `no failures in ${ITERATIONS} iterations (${failures.length} in all)`);
  t.equal(escaped.length, 0, `no exception escaped: ${escaped.map(String).join("; ")}`);
  t.ok(held.max <= MAX_REPLY_LINE * MAX_REPLY_LINES, `the most the parser held: ${held.max} octets (bound ${MAX_REPLY_LINE * MAX_REPLY_LINES})`);
  t.ok(stats.garbage > 100 && stats.eof > 100 && stats.valid > 1000, "the fuzz reached 600s, 621s and valid transcripts");
  t.comment(`replies fuzz: ${stats.valid} valid + ${stats.mutated} mutated transcripts, ${(stats.bytes / 2 ** 20).toFixed(1)} MB in ${stats.pushes} pushes; ` +
    `${stats.replies} replies, ${stats.garbage} ended in 600, ${stats.eof} in 621; most held ${held.max} octets`);
});

t.test("fuzzed replies: an endless line streamed in random pieces is cut at MAX_REPLY_LINE", async (t) => {
  const r = new Prng(base.seed ^ 0x5eed_0002);
  for (const start of ["", "250-", "250 ", "220-greeting\r\n250"]) {
    const parser = new ReplyParser();
    const peek = parser as unknown as ParserPeek;
    let fed = 0;
    let most = 0;
    const replies: Reply[] = [];
    replies.push(...parser.push(Buffer.from(start)));
    // 20 MB without LF, in pieces of 1 octet to 64 KB.
    const block = Buffer.alloc(65536, 0x78);
    while (fed < 20 * 2 ** 20) {
      const n = r.chance(0.5) ? r.range(1, 100) : r.range(100, 65536);
      replies.push(...parser.push(block.subarray(0, n)));
      fed += n;
      most = Math.max(most, peek.partialLength ?? 0);
    }
    t.match(replies.map((x) => x.code), [CODE_GARBAGE], `${JSON.stringify(start)} then 20 MB: one 600`);
    t.ok(most <= MAX_REPLY_LINE + 1, `held at most ${most} octets of it`);
    t.equal(parser.end(), null, "and nothing at the end");
  }
});
