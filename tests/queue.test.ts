// Unit tests of queue.ts: the stuffer, the header scan, the spool's folders and ids, the
// queue-file parser and the wire form of a message.
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import {
  CHUNK,
  CorruptMessageError,
  FOLDERS,
  HeaderScan,
  Spool,
  Stuffer,
  addressProblem,
  measureWire,
  splitRecipients,
  wireChunks,
  type Folder,
  type HeaderFacts,
  type QueuedMessage,
} from "../queue.js";

const latin1 = (s: string): Buffer => Buffer.from(s, "latin1");
const show = (b: Buffer): string => JSON.stringify(b.toString("latin1"));

/* ------------------------------------------------------------------------------------ */
/* Helpers                                                                               */

/** A fresh spool in its own temp dir, removed when the test ends. */
async function tempSpool(t: Test, opts: { fsync?: boolean } = {}): Promise<Spool> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-queue-test-"));
  t.teardown(() => fs.rm(root, { recursive: true, force: true }));
  const spool = new Spool(path.join(root, "maildir"), opts);
  await spool.init();
  return spool;
}

/** Runs fn with Date.now() fixed at `ms`, restoring the real clock afterwards. */
async function atTime<T>(ms: number, fn: () => Promise<T>): Promise<T> {
  const real = Date.now;
  Date.now = () => ms;
  try {
    return await fn();
  } finally {
    Date.now = real;
  }
}

/** A time in the middle of the current second, so the seconds part is fixed. */
function fixedNow(): { ms: number; sec: number } {
  const sec = Math.floor(Date.now() / 1000);
  return { ms: sec * 1000 + 500, sec };
}

async function list(spool: Spool, folder: Folder | "tmp"): Promise<string[]> {
  return (await fs.readdir(path.join(spool.dir, folder))).sort();
}

async function put(spool: Spool, folder: Folder, name: string, content: string | Buffer): Promise<void> {
  await fs.writeFile(spool.pathOf(folder, name), content, { mode: 0o600 });
}

async function read(spool: Spool, folder: Folder, name: string): Promise<Buffer> {
  return fs.readFile(spool.pathOf(folder, name));
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(() => true, () => false);
}

async function collect(gen: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of gen) parts.push(Buffer.from(b));
  return Buffer.concat(parts);
}

/** A deterministic pseudo-random generator (mulberry32). */
function prng(seed: number): () => number {
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
function stuff(chunks: Buffer[]): { body: Buffer; end: Buffer; eightBit: boolean } {
  const s = new Stuffer();
  const parts = chunks.map((c) => Buffer.from(s.push(c)));
  return { body: Buffer.concat(parts), end: s.end(), eightBit: s.eightBit };
}

/** The input with every CRLF, bare CR and bare LF made CRLF (the reference, by regex). */
function normalise(input: Buffer): string {
  return input.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
}

/**
 * A reference un-stuffer, independent of the implementation: checks the wire form of DATA
 * (no bare CR or LF, terminator once and at the end, every dot line stuffed) and returns
 * the lines it carries. Problems go into `problems`.
 */
function unstuff(wire: Buffer, problems: string[]): string[] {
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
function expectedLines(input: Buffer): string[] {
  const n = normalise(input);
  if (n === "") return [];
  const lines = (n.endsWith("\r\n") ? n.slice(0, -2) : n).split("\r\n");
  return lines;
}

const STUFFER_BODIES: Array<[string, Buffer]> = [
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

t.test("the reference un-stuffer catches bad wire forms", async (t) => {
  const check = (s: string) => {
    const problems: string[] = [];
    const lines = unstuff(latin1(s), problems);
    return { lines, problems };
  };
  t.same(check("a\r\n..b\r\n.\r\n"), { lines: ["a", ".b"], problems: [] });
  t.same(check(".\r\n"), { lines: [], problems: [] });
  t.match(check("a\n.\r\n").problems, [/bare LF/]);
  t.match(check("a\rb\r\n.\r\n").problems, [/bare CR/]);
  t.match(check("a\r\n.b\r\n.\r\n").problems, [/unstuffed dot/]);
  t.match(check("a\r\n.\r\nb\r\n.\r\n").problems, [/terminator found 2 times/]);
  t.match(check("a\r\n").problems, [/terminator found 0 times/, /does not end/]);
  t.same(expectedLines(latin1("a\rb\r\n\nc")), ["a", "b", "", "c"]);
});

t.test("Stuffer", async (t) => {
  for (const [name, body] of STUFFER_BODIES) {
    t.test(name, async (t) => {
      const one = stuff([body]);
      const wire = Buffer.concat([one.body, one.end]);

      // Properties of the output, checked without the implementation's help.
      const problems: string[] = [];
      const lines = unstuff(wire, problems);
      t.same(problems, [], `wire form is well-formed: ${show(wire)}`);
      t.same(lines, expectedLines(body), "un-stuffing gives the input's lines");
      const rebuilt = lines.map((l) => l + "\r\n").join("");
      const n = normalise(body);
      t.equal(rebuilt, n === "" || n.endsWith("\r\n") ? n : n + "\r\n", "un-stuffed = input with CRLF line ends");
      if (body.length === 0) t.equal(wire.toString("latin1"), ".\r\n", "empty body: just the dot line");
      t.equal(one.eightBit, body.some((b) => b >= 0x80), "eightBit iff a byte >= 0x80");
      t.notOk(one.body.includes("\r\n.\r\n"), "no terminator inside the stuffed body");

      // Every split into two chunks gives the same bytes.
      const bad2: number[] = [];
      for (let i = 0; i <= body.length; i++) {
        const got = stuff([body.subarray(0, i), body.subarray(i)]);
        if (!Buffer.concat([got.body, got.end]).equals(wire) || got.eightBit !== one.eightBit) bad2.push(i);
      }
      t.same(bad2, [], "every two-chunk split");

      // Every split into three chunks, for the short bodies.
      if (body.length <= 64) {
        const bad3: Array<[number, number]> = [];
        for (let i = 0; i <= body.length; i++) {
          for (let j = i; j <= body.length; j++) {
            const got = stuff([body.subarray(0, i), body.subarray(i, j), body.subarray(j)]);
            if (!Buffer.concat([got.body, got.end]).equals(wire)) bad3.push([i, j]);
          }
        }
        t.same(bad3, [], "every three-chunk split");
      }

      // Byte by byte.
      const bytes = stuff([...body].map((b) => Buffer.from([b])));
      t.ok(Buffer.concat([bytes.body, bytes.end]).equals(wire), "byte by byte");
      t.equal(bytes.eightBit, one.eightBit, "eightBit byte by byte");
    });
  }
});

t.test("Stuffer: known outputs", async (t) => {
  const w = (s: string | Buffer) => {
    const r = stuff([typeof s === "string" ? latin1(s) : s]);
    return Buffer.concat([r.body, r.end]).toString("latin1");
  };
  t.equal(w(""), ".\r\n");
  t.equal(w("."), "..\r\n.\r\n");
  t.equal(w("a"), "a\r\n.\r\n");
  t.equal(w("a\n"), "a\r\n.\r\n");
  t.equal(w("a\r\r\nb"), "a\r\n\r\nb\r\n.\r\n", "CR then CRLF: two line ends");
  t.equal(w("\n.\n"), "\r\n..\r\n.\r\n");
  t.equal(w("x\r\n.\ry"), "x\r\n..\r\ny\r\n.\r\n");
  t.equal(w("a.b\n. c"), "a.b\r\n.. c\r\n.\r\n", "a dot inside a line is left alone");
  // eightBit sticks once seen.
  const s = new Stuffer();
  s.push(Buffer.from([0x41, 0xe9]));
  s.push(latin1("plain\n"));
  t.equal(s.eightBit, true);
  const plain = new Stuffer();
  plain.push(Buffer.from([0x00, 0x7f, 0x0d, 0x0a, 0x2e]));
  t.equal(plain.eightBit, false);
});

/* ------------------------------------------------------------------------------------ */
/* The header scan                                                                       */

function scan(chunks: Array<string | Buffer>): HeaderFacts {
  const h = new HeaderScan();
  for (const c of chunks) h.push(typeof c === "string" ? latin1(c) : c);
  return { ...h.end() };
}

t.test("HeaderScan", async (t) => {
  t.same(scan(["Date: Mon, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <a@b>\r\nFrom: a@b.org\r\nSubject: x\r\n\r\nbody\r\n"]), {
    hasDate: true, hasMessageId: true, hasFrom: true, startsWithHeader: true, complete: true,
  }, "all three present");
  t.same(scan(["DATE: x\nmessage-id: <y>\nfRoM: z\n\n"]), {
    hasDate: true, hasMessageId: true, hasFrom: true, startsWithHeader: true, complete: true,
  }, "names are case-insensitive");
  t.same(scan(["Subject: hi\r\nTo: r@x.org\r\n\r\nFrom: in the body\r\nDate: also body\r\nMessage-ID: <body>\r\n"]), {
    hasDate: false, hasMessageId: false, hasFrom: false, startsWithHeader: true, complete: true,
  }, "stops at the blank line: headers in the body do not count");
  t.same(scan(["Subject: hi\n\nFrom: x\n"]), {
    hasDate: false, hasMessageId: false, hasFrom: false, startsWithHeader: true, complete: true,
  }, "LF-only blank line");

  const folded = scan(["Subject: a long\r\n subject\r\n\tFrom: not a header, a fold\r\nTo: r@x.org,\r\n  s@x.org\r\nDate: x\r\n\r\n"]);
  t.equal(folded.hasFrom, false, "a folded line is not a header");
  t.equal(folded.hasDate, true, "headers after folded lines are still seen");
  t.equal(folded.startsWithHeader, true);

  const noHeaders = scan(["Hello there,\nFrom: me\n"]);
  t.equal(noHeaders.startsWithHeader, false, "a body without headers");
  t.equal(noHeaders.hasFrom, false, "a From: after a body line does not count");
  t.equal(scan(["\nFrom: x\n"]).startsWithHeader, false, "blank first line");
  t.equal(scan([" indented: first line\n"]).startsWithHeader, false, "continuation as first line");
  t.equal(scan([""]).startsWithHeader, false, "empty content");
  t.equal(scan([""]).complete, true);
  t.equal(scan(["From: a@b.org"]).hasFrom, true, "a last line without a newline counts");
  t.equal(scan(["Received: from x\r\nFrom: a@b.org\r\n"]).hasFrom, true, "content that is all headers");
  t.equal(scan(["X-Long: " + "y".repeat(5000) + "\r\nFrom: a@b.org\r\n\r\n"]).hasFrom, true, "a long header line before From");
  t.equal(scan(["Fromage: cheese\r\nDates: x\r\nMessage-IDs: y\r\n\r\n"]).hasFrom, false, "prefixes of other names do not count");

  // Incomplete until the blank line or end().
  const h = new HeaderScan();
  h.push(latin1("From: a@b.org\r\n"));
  t.equal(h.facts.complete, false, "not complete before the blank line");
  h.push(latin1("\r\nbody"));
  t.equal(h.facts.complete, true, "complete at the blank line");
});

t.test("HeaderScan: headers split across chunks at every position", async (t) => {
  const texts = [
    "Subject: hello\r\n  folded\r\nDate: Mon, 1 Jan 2026\r\nMessage-ID: <1@x>\r\nFrom: a@b.org\r\n\r\nFrom: body\r\n",
    "To: r@x.org\nmessage-id: <2@x>\n\tcont\n\nDate: in body\n",
    "Hello,\nFrom: not a header\n",
    "X: y\r\n\r\n",
  ];
  for (const text of texts) {
    const all = latin1(text);
    const want = scan([all]);
    const bad: number[] = [];
    for (let i = 0; i <= all.length; i++) {
      if (JSON.stringify(scan([all.subarray(0, i), all.subarray(i)])) !== JSON.stringify(want)) bad.push(i);
    }
    t.same(bad, [], `every two-chunk split of ${JSON.stringify(text.slice(0, 20))}`);
    t.same(scan([...all].map((b) => Buffer.from([b]))), want, "byte by byte");
  }
  t.same(scan(["Da", "te: x\r", "\nFro", "m: y\r\n\r", "\n"]), {
    hasDate: true, hasMessageId: false, hasFrom: true, startsWithHeader: true, complete: true,
  }, "hand-picked splits inside names and line ends");
});

t.test("HeaderScan sees the lines the wire will carry (a bare CR is a line end)", async (t) => {
  // The stuffer turns every bare CR into CRLF, so the header block the server gets is cut
  // at those CRs. If the scan reads the file's lines differently, the engine adds a second
  // From: (or none where one is missing on the wire).
  const cases = [
    "Subject: s\rFrom: a@b.org\r\rbody\r",
    "Subject: s\r\r\nFrom: a@b.org\r\n\r\nbody\r\n",
    "Date: x\rMessage-ID: <1@x>\n\nbody\n",
  ];
  for (const text of cases) {
    const file = latin1(text);
    const wire = latin1(normalise(file));
    t.same(scan([file]), scan([wire]), `facts of ${JSON.stringify(text)} match its wire form ${JSON.stringify(wire.toString("latin1"))}`);
  }
});

/* ------------------------------------------------------------------------------------ */
/* The spool                                                                             */

t.test("Spool.init creates the folders, mode 0700", async (t) => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-queue-test-"));
  t.teardown(() => fs.rm(root, { recursive: true, force: true }));
  const dir = path.join(root, "deep", "maildir");
  const spool = new Spool(dir);
  t.same(await spool.init(), { recovered: [] });
  t.equal((await fs.stat(dir)).mode & 0o777, 0o700, "the maildir");
  for (const f of ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"]) {
    t.ok(FOLDERS.includes(f as (typeof FOLDERS)[number]), `${f} is a spool folder`);
  }
  for (const f of FOLDERS) {
    const st = await fs.stat(path.join(dir, f));
    t.ok(st.isDirectory(), `${f}/ exists`);
    t.equal(st.mode & 0o777, 0o700, `${f}/ is mode 0700`);
  }
  // A second init is harmless and keeps what is there.
  await fs.writeFile(path.join(dir, "outgoing", "1.0"), "a@b.org\nr@x.org\n");
  t.same(await spool.init(), { recovered: [] });
  t.ok(await exists(path.join(dir, "outgoing", "1.0")));
});

t.test("Spool.create: 1,000 concurrent creates in one second", async (t) => {
  const spool = await tempSpool(t);
  const { ms, sec } = fixedNow();
  const bodies = Array.from({ length: 1000 }, (_, i) => `s${i}@x.org\nr${i}@x.org\nSubject: ${i}\n\n${"body ".repeat(i % 50)}${i}\n`);
  const ids = await atTime(ms, () => Promise.all(bodies.map((b) => spool.create(b))));
  t.equal(new Set(ids).size, 1000, "1,000 distinct ids");
  const bad = ids.filter((id) => !new RegExp(`^${sec}\\.(0|[1-9]\\d*)$`).test(id));
  t.same(bad, [], "every id is <seconds>.<n> in the fixed second");
  const subs = ids.map((id) => Number(id.split(".")[1])).sort((a, b) => a - b);
  t.same(subs, Array.from({ length: 1000 }, (_, i) => i), "subtimes 0..999: no ceiling at 100");
  const wrong: string[] = [];
  for (let i = 0; i < ids.length; i++) {
    if ((await read(spool, "outgoing", ids[i])).toString() !== bodies[i]) wrong.push(ids[i]);
  }
  t.same(wrong, [], "each file's content intact, under the id create() returned");
  t.equal((await list(spool, "outgoing")).length, 1000, "1,000 files in outgoing/");
  t.same(await list(spool, "tmp"), [], "nothing left in tmp/");
  for (const id of ids.slice(0, 5)) {
    t.equal((await fs.stat(spool.pathOf("outgoing", id))).mode & 0o777, 0o600, `${id} is mode 0600`);
  }
});

t.test("Spool.create never reuses an id taken in any folder", async (t) => {
  const spool = await tempSpool(t);
  const { ms, sec } = fixedNow();
  const taken: Array<[Folder, string]> = [
    ["outgoing_active", `${sec}.0`],
    ["deferred", `${sec}.1`],
    ["corrupt", `${sec}.2`],
    ["outgoing", `${sec}.3`],
    ["deferred", `${sec}.5`],
  ];
  for (const [folder, id] of taken) await put(spool, folder, id, `old ${folder} ${id}\n`);
  const ids = await atTime(ms, async () => [
    await spool.create("a@b.org\nr@x.org\n\none\n"),
    await spool.create("a@b.org\nr@x.org\n\ntwo\n"),
    await spool.create("a@b.org\nr@x.org\n\nthree\n"),
  ]);
  t.same(ids, [`${sec}.4`, `${sec}.6`, `${sec}.7`], "taken ids skipped");
  for (const [folder, id] of taken) {
    t.equal((await read(spool, folder, id)).toString(), `old ${folder} ${id}\n`, `${folder}/${id} untouched`);
  }
  t.same(await list(spool, "tmp"), []);

  // The clock stepping back does not bring old ids back.
  const later = await atTime(ms - 5000, () => spool.create("a@b.org\nr@x.org\n\nfour\n"));
  t.notOk(ids.includes(later) || taken.some(([, id]) => id === later), `clock step back: fresh id ${later}`);
  t.ok(await exists(spool.pathOf("outgoing", later)));
});

t.test("Spool.claim, release, complete", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const content = "a@b.org\nr@x.org\n\nbody\n";
  const id = await spool.create(content);
  t.same(await spool.claim(id), { id, booked: false }, "claimed under its own name");
  t.same(await list(spool, "outgoing"), [], "gone from outgoing/");
  t.same(await list(spool, "outgoing_active"), [id], "now in outgoing_active/");
  t.equal(await spool.claim(id), null, "a second claim finds nothing");
  t.equal(await spool.claim("1234567890.99"), null, "a missing id: null");

  t.equal(await spool.release(id), id, "released under the same id");
  t.same(await list(spool, "outgoing"), [id]);
  t.same(await list(spool, "outgoing_active"), []);

  t.same(await spool.claim(id), { id, booked: false });
  const book = { attempts: 2, nextAttempt: 1_800_000_000_000, lastError: "451 4.3.0 try later" };
  t.equal(await spool.release(id, "deferred", book), id, "deferred");
  t.same(await list(spool, "deferred"), [`.${id}`, id], "message and bookkeeping in deferred/");
  t.same(await spool.readBookkeeping(id, "deferred"), book, "bookkeeping readable");
  t.equal((await read(spool, "deferred", id)).toString(), content, "content unchanged");
  t.same(await list(spool, "outgoing_active"), []);

  t.same(await spool.claim(id, "deferred"), { id, booked: true }, "claimed from deferred/ with its bookkeeping");
  t.same(await list(spool, "deferred"), []);
  t.same(await list(spool, "outgoing_active"), [`.${id}`, id]);
  t.same(await spool.readBookkeeping(id, "outgoing_active"), book);

  await spool.complete(id);
  t.same(await list(spool, "outgoing_active"), [], "complete removes the message and its bookkeeping");
  t.equal(await spool.readBookkeeping(id, "outgoing_active"), null);
  await t.rejects(spool.complete(id), "completing a message that is not active fails");
});

t.test("Spool.claim never overwrites a message of the same name in outgoing_active/", async (t) => {
  // Another program may drop a file into outgoing/ under a name that is, at that moment,
  // claimed by a slot (the name left outgoing/ when it was claimed). Claiming it must not
  // destroy the message in flight. (The spool's lock means only this Spool claims.)
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing", "1700000003.0", "in flight\n");
  t.same(await spool.claim("1700000003.0"), { id: "1700000003.0", booked: false });
  await put(spool, "outgoing", "1700000003.0", "dropped later\n");
  const second = await spool.claim("1700000003.0");
  t.not(second?.id, "1700000003.0", "the second message is claimed under a fresh id");
  const contents: string[] = [];
  for (const f of ["outgoing", "outgoing_active", "deferred", "corrupt"] as const) {
    for (const name of await list(spool, f)) if (!name.startsWith(".")) contents.push((await read(spool, f, name)).toString());
  }
  t.same(contents.sort(), ["dropped later\n", "in flight\n"], "both messages still in the spool");
});

t.test("Spool.init({ recover: true }) puts crashed claims back", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing_active", "1700000000.0", "a@b.org\nr@x.org\n\nzero\n");
  await put(spool, "outgoing_active", "1700000000.1", "a@b.org\nr@x.org\n\none\n");
  await put(spool, "outgoing_active", ".1700000000.1", JSON.stringify({ attempts: 3, nextAttempt: null, lastError: "x" }));
  await put(spool, "outgoing", "1700000000.2", "a@b.org\nr@x.org\n\ntwo\n");

  const plain = new Spool(spool.dir);
  t.same(await plain.init(), { recovered: [] }, "without recover nothing moves");
  t.same(await list(spool, "outgoing_active"), [".1700000000.1", "1700000000.0", "1700000000.1"]);

  const { recovered } = await new Spool(spool.dir).init({ recover: true });
  t.same([...recovered].sort(), ["1700000000.0", "1700000000.1"]);
  t.same(await list(spool, "outgoing_active"), [], "outgoing_active/ emptied");
  t.same(await list(spool, "outgoing"), [".1700000000.1", "1700000000.0", "1700000000.1", "1700000000.2"]);
  t.equal((await read(spool, "outgoing", "1700000000.0")).toString(), "a@b.org\nr@x.org\n\nzero\n");
  t.equal((await spool.readBookkeeping("1700000000.1", "outgoing"))?.attempts, 3, "bookkeeping follows");
});

t.test("Spool.init({ recover: true }) with a name taken in outgoing/", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing_active", "1700000000.7", "active\n");
  await put(spool, "outgoing", "1700000000.7", "queued\n");
  const { recovered } = await new Spool(spool.dir).init({ recover: true });
  const names = (await list(spool, "outgoing")).filter((n) => !n.startsWith("."));
  t.equal(names.length, 2, "both messages in outgoing/");
  t.equal((await read(spool, "outgoing", "1700000000.7")).toString(), "queued\n", "the queued one is not overwritten");
  const other = names.find((n) => n !== "1700000000.7")!;
  t.equal((await read(spool, "outgoing", other)).toString(), "active\n", "the recovered one under a fresh id");
  t.same(recovered, [other], "init reports the id the recovered message now has");
});

t.test("Spool.move never overwrites", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const id = "1700000001.0";
  await put(spool, "outgoing_active", id, "moving\n");
  await put(spool, "outgoing_active", `.${id}`, JSON.stringify({ attempts: 1, nextAttempt: null, lastError: "moving" }));
  await put(spool, "deferred", id, "staying\n");
  await put(spool, "deferred", `.${id}`, JSON.stringify({ attempts: 9, nextAttempt: null, lastError: "staying" }));
  const fresh = await spool.move(id, "outgoing_active", "deferred");
  t.not(fresh, id, "a fresh id");
  t.match(fresh, /^\d+\.\d+$/);
  t.equal((await read(spool, "deferred", id)).toString(), "staying\n", "the file already there is intact");
  t.equal((await read(spool, "deferred", fresh)).toString(), "moving\n", "the moved file is intact");
  t.equal((await spool.readBookkeeping(id, "deferred"))?.lastError, "staying", "its bookkeeping too");
  t.equal((await spool.readBookkeeping(fresh, "deferred"))?.lastError, "moving", "bookkeeping follows to the fresh id");
  t.same(await list(spool, "outgoing_active"), [], "nothing left behind");

  // Without a clash the id stays.
  await put(spool, "outgoing", "1700000001.5", "plain\n");
  t.equal(await spool.move("1700000001.5", "outgoing", "deferred"), "1700000001.5");
  t.equal((await read(spool, "deferred", "1700000001.5")).toString(), "plain\n");
});

t.test("Spool.move: the fresh id is not taken in any other folder", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const { ms, sec } = fixedNow();
  // Another program's messages hold the next ids of this second, in other folders.
  await put(spool, "outgoing", `${sec}.0`, "other 0\n");
  await put(spool, "outgoing_active", `${sec}.1`, "other 1\n");
  await put(spool, "corrupt", `${sec}.2`, "other 2\n");
  await put(spool, "outgoing_active", "1700000002.0", "moving\n");
  await put(spool, "deferred", "1700000002.0", "staying\n");
  const fresh = await atTime(ms, () => spool.move("1700000002.0", "outgoing_active", "deferred"));
  t.equal((await read(spool, "deferred", fresh)).toString(), "moving\n");
  const elsewhere: string[] = [];
  for (const f of ["outgoing", "outgoing_active", "corrupt"] as const) {
    if (await exists(spool.pathOf(f, fresh))) elsewhere.push(`${f}/${fresh}`);
  }
  t.same(elsewhere, [], `fresh id ${fresh} names no other message (one id, one message)`);
});

t.test("Spool.quarantine", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const id = await spool.create("not an address\nr@x.org\n\nbody\n");
  const reason = 'bad sender "not an address": not of the form addr@domain';
  t.equal(await spool.quarantine(id, "outgoing", reason), id);
  t.same(await list(spool, "outgoing"), [], "gone from outgoing/");
  t.same(await list(spool, "corrupt"), [`.${id}`, id]);
  t.equal((await spool.readBookkeeping(id, "corrupt"))?.lastError, reason, "the reason is readable");
  t.equal((await read(spool, "corrupt", id)).toString(), "not an address\nr@x.org\n\nbody\n", "content kept for a human");

  // A clash in corrupt/: fresh id, both kept, reason under the new id.
  await put(spool, "outgoing_active", id, "second\n");
  const other = await spool.quarantine(id, "outgoing_active", "second reason");
  t.not(other, id);
  t.equal((await read(spool, "corrupt", id)).toString(), "not an address\nr@x.org\n\nbody\n");
  t.equal((await read(spool, "corrupt", other)).toString(), "second\n");
  t.equal((await spool.readBookkeeping(other, "corrupt"))?.lastError, "second reason");
  t.equal((await spool.readBookkeeping(id, "corrupt"))?.lastError, reason);
  t.same(await list(spool, "outgoing_active"), []);
  t.same(await list(spool, "tmp"), []);
});

t.test("Spool.rewriteRecipients", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rest = latin1("Subject: x\r\nFrom: a@b.org\r\n\r\nbody\n.\nline \0 with NUL \xe9\rend");
  const file = Buffer.concat([latin1("a@b.org\nr1@x.org, r2@x.org \"john doe\"@x.org, r3@x.org\n"), rest]);
  const id = await spool.create(file);
  await spool.claim(id);
  const msg = await spool.open(id);
  t.same(msg.recipients, ["r1@x.org", "r2@x.org", '"john doe"@x.org', "r3@x.org"]);
  await spool.rewriteRecipients(msg, ["r2@x.org", '"john doe"@x.org']);
  t.same(msg.recipients, ["r2@x.org", '"john doe"@x.org'], "the message object follows");
  const after = await read(spool, "outgoing_active", id);
  const lines = after.toString("latin1").split("\n");
  t.equal(lines[0], "a@b.org", "line 1 unchanged");
  t.same(splitRecipients(lines[1]), ["r2@x.org", '"john doe"@x.org'], "line 2 holds the pending ones");
  const firstTwo = lines[0].length + lines[1].length + 2;
  t.ok(after.subarray(firstTwo).equals(rest), "message lines byte for byte");
  const again = await spool.open(id);
  t.same(again.recipients, ["r2@x.org", '"john doe"@x.org'], "re-read");
  t.equal(again.sender, "a@b.org");
  t.ok(again.head.equals(rest));
  t.same(await list(spool, "tmp"), [], "nothing left in tmp/");
  t.same(await list(spool, "outgoing_active"), [id]);

  // Null sender stays the null sender.
  const nid = await spool.create(Buffer.concat([latin1("<>\nr1@x.org r2@x.org\n"), rest]));
  await spool.claim(nid);
  const nmsg = await spool.open(nid);
  await spool.rewriteRecipients(nmsg, ["r1@x.org"]);
  const nagain = await spool.open(nid);
  t.equal(nagain.sender, "", "null sender kept");
  t.same(nagain.recipients, ["r1@x.org"]);
  t.ok(nagain.head.equals(rest));
});

t.test("Spool.rewriteRecipients: a message bigger than CHUNK", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rnd = prng(7);
  const rest = Buffer.alloc(3 * CHUNK + 12345);
  for (let i = 0; i < rest.length; i++) rest[i] = Math.floor(rnd() * 256);
  const head = latin1("<sender@b.org>\n<r1@x.org>,<r2@x.org>\n");
  const id = await spool.create(Buffer.concat([head, rest]));
  await spool.claim(id);
  const msg = await spool.open(id);
  t.equal(msg.whole, false);
  await spool.rewriteRecipients(msg, ["r2@x.org"]);
  const after = await read(spool, "outgoing_active", id);
  const text = after.toString("latin1");
  const nl1 = text.indexOf("\n");
  const nl2 = text.indexOf("\n", nl1 + 1);
  t.ok(after.subarray(nl2 + 1).equals(rest), "every byte of the message lines kept");
  t.equal(after.length - nl2 - 1, rest.length);
  const again = await spool.open(id);
  t.equal(again.sender, "sender@b.org");
  t.same(again.recipients, ["r2@x.org"]);
  t.ok((await collect(spool.content(again))).equals(rest));
  t.same(await list(spool, "tmp"), []);
});

t.test("Spool.scan", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  for (const name of ["1700000000.0", "1700000000.12", "abc_def-1", ".1700000000.0", ".hidden", ".", "bad name", "x".repeat(200), "\u00fcml", "a:b"]) {
    if (name === ".") continue;
    await put(spool, "outgoing", name, "a@b.org\nr@x.org\n");
  }
  const got = await spool.scan();
  t.same([...got.ids].sort(), ["1700000000.0", "1700000000.12", "abc_def-1"], "queue ids");
  t.same([...got.booked].sort(), ["1700000000.0", "hidden"], "dot files: bookkeeping, never ids");
  t.same([...got.badNames].sort(), ["a:b", "bad name", "x".repeat(200), "\u00fcml"].sort(), "bad names apart");
  for (const n of [...got.ids, ...got.badNames]) t.notOk(n.startsWith("."), `${n} is not a dot file`);
  const empty = await spool.scan("deferred");
  t.same(empty.ids, []);
  t.same(empty.badNames, []);
});

/* ------------------------------------------------------------------------------------ */
/* Queue-file parsing                                                                    */

/** Drops a file into outgoing/ and opens it there. */
async function parse(spool: Spool, content: string | Buffer): Promise<QueuedMessage> {
  const id = await spool.create(content);
  return spool.open(id, "outgoing");
}

t.test("queue files that parse", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const body = "Subject: hi\n\nbody\n";

  const lf = await parse(spool, "a@b.org\nr@x.org\n" + body);
  t.equal(lf.sender, "a@b.org");
  t.same(lf.recipients, ["r@x.org"]);
  t.equal(lf.head.toString(), body);
  t.equal(lf.size, body.length);
  t.equal(lf.contentOffset, "a@b.org\nr@x.org\n".length);
  t.equal(lf.whole, true);
  t.equal(lf.folder, "outgoing");
  t.equal(lf.arrival, Number(lf.id.split(".")[0]) * 1000, "arrival from the id's seconds");
  t.equal((await collect(spool.content(lf))).toString(), body);

  const cases: Array<[string, string, string, string[], string?]> = [
    ["CRLF line ends", "a@b.org\r\nr@x.org\r\nSubject: hi\r\n\r\nbody\r\n", "a@b.org", ["r@x.org"], "Subject: hi\r\n\r\nbody\r\n"],
    ["CRLF, two recipients", "<a@b.org>\r\nr1@x.org, r2@x.org\r\n\r\nbody\r\n", "a@b.org", ["r1@x.org", "r2@x.org"], "\r\nbody\r\n"],
    ["LF sender line, CRLF recipient line", "a@b.org\nr@x.org\r\nbody\r\n", "a@b.org", ["r@x.org"], "body\r\n"],
    ["CRLF, null sender", "\r\nr@x.org\r\nbody\r\n", "", ["r@x.org"], "body\r\n"],
    ["angle brackets", "<a@b.org>\n<r@x.org>\n" + body, "a@b.org", ["r@x.org"], body],
    ["null sender, empty line", "\nr@x.org\n" + body, "", ["r@x.org"], body],
    ["null sender <>", "<>\nr@x.org\n" + body, "", ["r@x.org"], body],
    ["sender with spaces around", "  a@b.org \nr@x.org\n" + body, "a@b.org", ["r@x.org"], body],
    ["commas, spaces and tabs", "a@b.org\nr1@x.org,r2@x.org  r3@x.org\t r4@x.org ,<r5@x.org>,, \t\n" + body, "a@b.org",
      ["r1@x.org", "r2@x.org", "r3@x.org", "r4@x.org", "r5@x.org"], body],
    ["quoted local part with a space", 'a@b.org\n"john doe"@example.org, r@x.org\n' + body, "a@b.org", ['"john doe"@example.org', "r@x.org"], body],
    ["quoted local part with comma and escaped quote", 'a@b.org\n"a,b \\" c"@x.org\n' + body, "a@b.org", ['"a,b \\" c"@x.org'], body],
    ["duplicates dropped", "a@b.org\nr@x.org, <r@x.org> r@x.org s@x.org r@x.org\n" + body, "a@b.org", ["r@x.org", "s@x.org"], body],
    ["address literal", "a@b.org\nuser@[127.0.0.1]\n" + body, "a@b.org", ["user@[127.0.0.1]"], body],
    ["IPv6 literal", "a@b.org\n<user@[IPv6:2001:db8::1]>\n" + body, "a@b.org", ["user@[IPv6:2001:db8::1]"], body],
    ["no message lines, no newline", "a@b.org\nr@x.org", "a@b.org", ["r@x.org"], ""],
    ["no message lines", "a@b.org\nr@x.org\n", "a@b.org", ["r@x.org"], ""],
    ["UTF-8 addresses", "a@b.org\nj\u00f6rg@b\u00fccher.example\n" + body, "a@b.org", ["j\u00f6rg@b\u00fccher.example"], body],
    ["special atom characters", "a@b.org\nfirst.last+tag!#$%&'*/=?^_`{|}~-@sub-domain.x.org\n" + body, "a@b.org",
      ["first.last+tag!#$%&'*/=?^_`{|}~-@sub-domain.x.org"], body],
  ];
  for (const [name, content, sender, recipients, head] of cases) {
    try {
      const msg = await parse(spool, content);
      t.equal(msg.sender, sender, `${name}: sender`);
      t.same(msg.recipients, recipients, `${name}: recipients`);
      t.equal(msg.head.toString(), head, `${name}: message lines`);
      t.equal(msg.size, Buffer.byteLength(head ?? ""), `${name}: size`);
      t.equal(msg.whole, true, `${name}: whole`);
      t.equal((await collect(spool.content(msg))).toString(), head, `${name}: content()`);
    } catch (err) {
      t.fail(`${name}: rejected: ${(err as Error).message}`);
    }
  }
});

t.test("queue files larger than CHUNK", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rnd = prng(3);
  const make = (n: number) => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(rnd() * 256);
    return b;
  };
  const env = latin1("a@b.org\nr@x.org\n");
  for (const total of [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 77]) {
    const content = make(total - env.length);
    const msg = await parse(spool, Buffer.concat([env, content]));
    t.equal(msg.size, content.length, `file of ${total}: size`);
    t.equal(msg.whole, total <= CHUNK, `file of ${total}: whole ${total <= CHUNK}`);
    t.ok(content.subarray(0, msg.head.length).equals(msg.head), `file of ${total}: head is the start of the content`);
    t.ok((await collect(spool.content(msg))).equals(content), `file of ${total}: content() yields the exact bytes`);
  }
  // An envelope that does not fit in the first read.
  const many = Array.from({ length: 9000 }, (_, i) => `r${i}@x.org`);
  const content = make(3 * CHUNK);
  const msg = await parse(spool, Buffer.concat([latin1(`a@b.org\n${many.join(", ")}\n`), content]));
  t.equal(msg.recipients.length, 9000, "a recipient line longer than CHUNK");
  t.same(msg.recipients.slice(-2), ["r8998@x.org", "r8999@x.org"]);
  t.equal(msg.size, content.length);
  t.ok((await collect(spool.content(msg))).equals(content), "content() after a long envelope");
});

t.test("queue files that are corrupt", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const body = "\nSubject: x\n\nbody\n";
  const cases: Array<[string, string | Buffer, RegExp]> = [
    ["empty file", "", /empty/],
    ["only a sender line", "a@b.org\n", /recipient/],
    ["only a sender, no newline", "a@b.org", /recipient/],
    ["empty recipient line", "a@b.org\n\nSubject: x\n\nbody\n", /no recipients/],
    ["recipient line of separators", "a@b.org\n , ,\t\nbody\n", /no recipients/],
    ["recipient without @", "a@b.org\nnobody" + body, /bad recipient "nobody".*addr@domain/],
    ["recipient with \\x01", "a@b.org\nr\x01@x.org" + body, /bad recipient.*control/],
    ["recipient with CR inside", "a@b.org\nr\rx@x.org" + body, /bad recipient.*control/],
    ["recipient with NUL", "a@b.org\nr\0@x.org" + body, /bad recipient.*control/],
    ["recipient with DEL", "a@b.org\nr\x7f@x.org" + body, /bad recipient.*control/],
    ["sender with a control character", "a\x01@b.org\nr@x.org" + body, /bad sender.*control/],
    ["space in an unquoted local part (sender)", "john doe@b.org\nr@x.org" + body, /bad sender.*" " not allowed/],
    ["space in an unquoted local part (recipient in <>)", "a@b.org\n<john doe@x.org>" + body, /bad recipient.*" " not allowed/],
    ["space in an unquoted local part (recipient)", "a@b.org\njohn doe@x.org" + body, /bad recipient "john"/],
    ["< inside an address", "a@b.org\na<b@x.org" + body, /unbalanced/],
    ["> inside an address", "a@b.org\na>b@x.org" + body, /bad recipient.*">" not allowed/],
    ["< inside an address in <>", "a@b.org\n<a<b@x.org>" + body, /bad recipient.*"<" not allowed/],
    ["unbalanced < in the sender", "<a@b.org\nr@x.org" + body, /bad sender.*unbalanced angle/],
    ["unbalanced > in the sender", "a@b.org>\nr@x.org" + body, /bad sender.*unbalanced angle/],
    ["unbalanced quotes (recipient)", 'a@b.org\n"john@x.org' + body, /unbalanced quotes/],
    ["unbalanced quotes (sender)", '"john@b.org\nr@x.org' + body, /bad sender.*quoted/],
    ["quote inside a quoted local part", 'a@b.org\n"jo"hn"@x.org' + body, /unbalanced quotes|quoted/],
    ["double dot in the local part", "a@b.org\na..b@x.org" + body, /bad recipient.*(double dot|empty atom)/],
    ["leading dot in the local part", "a@b.org\n.a@x.org" + body, /bad recipient.*(leading|empty atom)/],
    ["trailing dot in the local part", "a@b.org\na.@x.org" + body, /bad recipient.*(trailing|empty atom)/],
    ["domain starting with a hyphen", "a@b.org\na@-x.org" + body, /bad recipient.*bad domain/],
    ["domain ending with a hyphen", "a@b.org\na@x-.org" + body, /bad recipient.*bad domain/],
    ["double dot in the domain", "a@b.org\na@x..org" + body, /bad recipient.*bad domain/],
    ["trailing dot in the domain", "a@b.org\na@x.org." + body, /bad recipient.*bad domain/],
    ["underscore in the domain", "a@b.org\na@x_y.org" + body, /bad recipient.*bad domain/],
    ["empty domain", "a@b.org\na@" + body, /bad recipient.*empty domain/],
    ["empty local part", "a@b.org\n@x.org" + body, /bad recipient.*empty local part/],
    ["bad address literal", "a@b.org\na@[1.2.3]" + body, /bad recipient.*address literal/],
    ["one bad among good", "a@b.org\nr@x.org, bad@, s@x.org" + body, /bad recipient "bad@"/],
    ["address too long", `a@b.org\n${"l".repeat(100)}@${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(60)}.${"g".repeat(60)}.org` + body, /bad recipient.*(320|longer)/],
  ];
  for (const [name, content, reason] of cases) {
    const id = await spool.create(content);
    try {
      const msg = await spool.open(id, "outgoing");
      t.fail(`${name}: accepted as ${JSON.stringify({ sender: msg.sender, recipients: msg.recipients })}`);
    } catch (err) {
      t.ok(err instanceof CorruptMessageError, `${name}: CorruptMessageError`);
      const e = err as CorruptMessageError;
      t.equal(e.queueId, id, `${name}: names the queue id`);
      t.match(e.reason, reason, `${name}: reason says what is wrong (${e.reason})`);
      t.match(e.message, id, `${name}: message carries the id`);
    }
  }
});

t.test("open() of a missing file is a file-system error, not a corrupt message", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  let caught: unknown = null;
  await spool.open("1700000000.0").catch((err: unknown) => { caught = err; });
  t.ok(caught, "rejected");
  t.notOk(caught instanceof CorruptMessageError, "not a CorruptMessageError (nothing to quarantine)");
  t.equal((caught as NodeJS.ErrnoException | null)?.code, "ENOENT");
});

t.test("addressProblem", async (t) => {
  const good = [
    "a@b.org", "<a@b.org>", "first.last@sub.example.org", '"john doe"@example.org', '"a\\"b"@x.org', '""@x.org',
    "user@[127.0.0.1]", "user@[IPv6:::1]", "x@localhost", "j\u00f6rg@b\u00fccher.example", "a+b@x-y.org", "1@2.3",
  ];
  for (const a of good) t.equal(addressProblem(a), null, `${a} is fine`);
  const bad: Array<[string, RegExp]> = [
    ["", /addr@domain/],
    ["<>", /addr@domain/],
    ["nobody", /addr@domain/],
    ["<a@b.org", /unbalanced angle/],
    ["a@b.org>", /unbalanced angle/],
    ["a\x01@b.org", /control/],
    ["a@b.org\r", /control/],
    ["a\0@b.org", /control/],
    ["a b@x.org", /" " not allowed/],
    ["a<b@x.org", /"<" not allowed/],
    ["a>b@x.org", /">" not allowed/],
    ["a,b@x.org", /"," not allowed/],
    ["a..b@x.org", /empty atom/],
    [".a@x.org", /empty atom/],
    ["a.@x.org", /empty atom/],
    ["@x.org", /empty local part/],
    ["a@", /empty domain/],
    ["a@-x.org", /bad domain/],
    ["a@x..org", /bad domain/],
    ["a@x.org.", /bad domain/],
    ["a@x y.org", /bad domain/],
    ["a@[300.1.1]", /address literal/],
    ['"john@x.org', /quoted/],
    ['"jo"hn"@x.org', /quoted/],
    [`a@${"d".repeat(64)}.org`, /bad domain/],
    [`${"l".repeat(300)}@${"d".repeat(30)}.org`, /320/],
  ];
  for (const [a, re] of bad) {
    const p = addressProblem(a);
    t.ok(p !== null, `${JSON.stringify(a)} is refused`);
    t.match(p ?? "", re, `${JSON.stringify(a)}: ${p}`);
  }
});

t.test("splitRecipients", async (t) => {
  t.same(splitRecipients(""), []);
  t.same(splitRecipients(" , \t,"), []);
  t.same(splitRecipients("a@x.org"), ["a@x.org"]);
  t.same(splitRecipients("a@x.org,b@x.org"), ["a@x.org", "b@x.org"]);
  t.same(splitRecipients("a@x.org b@x.org\tc@x.org , d@x.org"), ["a@x.org", "b@x.org", "c@x.org", "d@x.org"]);
  t.same(splitRecipients('"john doe"@x.org, "a,b"@x.org'), ['"john doe"@x.org', '"a,b"@x.org'], "quotes protect commas and spaces");
  t.same(splitRecipients('"a\\"b c"@x.org d@x.org'), ['"a\\"b c"@x.org', "d@x.org"], "escaped quote inside quotes");
  t.same(splitRecipients("<a b@x.org>, <c@x.org>"), ["<a b@x.org>", "<c@x.org>"], "angle brackets protect too");
  t.same(splitRecipients("<a@x.org><b@x.org>"), ["<a@x.org><b@x.org>"], "no separator, one token");
  t.equal(splitRecipients('"john@x.org'), null, "unbalanced quote");
  t.equal(splitRecipients("<a@x.org"), null, "unbalanced bracket");
  t.equal(splitRecipients("a@x.org, <b@x.org"), null);
});

/* ------------------------------------------------------------------------------------ */
/* The wire form                                                                         */

const PREFIX = latin1("Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <t@mudmail>\r\n");

t.test("measureWire: a whole message", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const content = latin1("Subject: x\nTo: r@x.org\n\n.hidden\nbody\r\n.\r\nlast \xe9 line");
  const id = await spool.create(Buffer.concat([latin1("a@b.org\nr@x.org\n"), content]));
  await spool.claim(id);
  const msg = await spool.open(id);
  t.equal(msg.whole, true);
  const seen: HeaderFacts[] = [];
  const wire = await measureWire(spool, msg, (facts) => {
    seen.push({ ...facts });
    return PREFIX;
  });
  t.equal(seen.length, 1, "makePrefix called once");
  t.same(seen[0], { hasDate: false, hasMessageId: false, hasFrom: false, startsWithHeader: true, complete: true });
  t.same(wire.facts, seen[0]);
  const expected = latin1(
    "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <t@mudmail>\r\n" +
      "Subject: x\r\nTo: r@x.org\r\n\r\n..hidden\r\nbody\r\n..\r\nlast \xe9 line\r\n.\r\n",
  );
  t.ok(wire.bytes, "bytes for a whole message");
  t.equal(show(wire.bytes!), show(expected), "prefix + stuffed content + terminator");
  t.equal(wire.size, expected.length, "size is the length of the wire form");
  t.equal(wire.eightBit, true);
  t.ok((await collect(wireChunks(spool, msg, PREFIX))).equals(expected), "wireChunks gives the same bytes");

  // An empty message: the terminator alone after the prefix.
  const eid = await spool.create("a@b.org\nr@x.org\n");
  await spool.claim(eid);
  const emsg = await spool.open(eid);
  const ewire = await measureWire(spool, emsg, () => Buffer.alloc(0));
  t.equal(show(ewire.bytes!), show(latin1(".\r\n")));
  t.equal(ewire.size, 3);
  t.equal(ewire.eightBit, false);
  t.equal(ewire.facts.startsWithHeader, false);
});

t.test("measureWire + wireChunks: a 3 MB message", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const envelope = latin1("a@b.org\nr@x.org\n");
  const size = 3 * 1024 * 1024;
  const content = Buffer.alloc(size);
  const rnd = prng(99);
  const header = latin1("Subject: big\r\nFrom: a@b.org\r\n\r\n");
  header.copy(content, 0);
  const pieces = [".", "..", "\n", "\r\n", "\r", "\n.\n", "\r\n.\r\n", "word ", "x", "\xe9", "\0", "abcdefghij"];
  for (let i = header.length; i < size;) {
    const p = latin1(pieces[Math.floor(rnd() * pieces.length)]);
    i += p.copy(content, i);
  }
  // Make the chunk boundaries (file offsets k * CHUNK) fall on the worst places:
  // CR | LF, LF | dot, CR | dot, dot | CR LF.
  const at = (fileOffset: number, s: string) => latin1(s).copy(content, fileOffset - envelope.length);
  at(1 * CHUNK - 1, "\r\n");
  at(2 * CHUNK - 1, "\n.");
  at(3 * CHUNK - 1, "\r.");
  at(4 * CHUNK - 1, ".\r\n");
  at(5 * CHUNK - 2, "\r\n.\r\n");
  at(6 * CHUNK - 1, "\r\r\n");
  const id = await spool.create(Buffer.concat([envelope, content]));
  await spool.claim(id);
  const msg = await spool.open(id);
  t.equal(msg.whole, false, "streamed, not whole");
  t.equal(msg.size, size);

  const wire = await measureWire(spool, msg, () => PREFIX);
  t.equal(wire.bytes, null, "no bytes for a streamed message");
  t.equal(wire.facts.hasFrom, true);
  t.equal(wire.facts.hasDate, false);
  t.equal(wire.facts.startsWithHeader, true);
  t.equal(wire.eightBit, true);

  const streamed = await collect(wireChunks(spool, msg, PREFIX));
  t.equal(streamed.length, wire.size, "wireChunks output has the measured size");
  const ref = new Stuffer();
  const expected = Buffer.concat([PREFIX, ref.push(content), ref.end()]);
  t.ok(streamed.equals(expected), "equals the single-push stuffing with the same prefix");

  const problems: string[] = [];
  const lines = unstuff(streamed.subarray(PREFIX.length), problems);
  t.same(problems.slice(0, 5), [], "well-formed wire form");
  t.ok(lines.join("\r\n") + "\r\n" === normalise(content) + (normalise(content).endsWith("\r\n") ? "" : "\r\n"), "un-stuffs to the content");
});

t.test("Stuffer: a line over 998 octets is broken with CRLF and a space, nothing lost (Postfix's smtp_line_length_limit)", async (t) => {
  const long = "x".repeat(2500);
  const body = Buffer.from(`short\n${long}\n.${"y".repeat(1500)}\nend`);
  for (const split of [1, 997, 998, 999, 1000, 2500, body.length - 1]) {
    const s = new Stuffer();
    const out = Buffer.concat([s.push(body.subarray(0, split)), s.push(body.subarray(split)), s.end()]).toString("latin1");
    const lines = out.split("\r\n");
    t.ok(lines.every((l) => l.length <= 998), `split at ${split}: no line over 998 octets`);
    t.equal(s.folded, 3, "three breaks: two in the long line, one in the dotted one");
    const unfolded = out.replace(/\r\n /g, "");
    t.equal(unfolded, `short\r\n${long}\r\n..${"y".repeat(1500)}\r\nend\r\n.\r\n`, "unfolding gives the line back (dot still stuffed)");
  }
});
