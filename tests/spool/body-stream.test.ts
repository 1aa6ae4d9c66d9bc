// Unit tests of queue.ts's body stream: the stuffer (checked by a reference un-stuffer, at every
// chunk split), the header scan (headers split across chunks, a bare CR is a line end), the wire
// form of a whole message (measureWire, wireChunks) and lines over 998 octets broken safely.

import t from "tap";
import { CHUNK, HeaderScan, Stuffer, measureWire, wireChunks, type HeaderFacts } from "../../queue.js";
import {
  latin1, show, tempSpool, collect, prng, stuff, normalise, unstuff, expectedLines, STUFFER_BODIES,
} from "../helpers/queue-units.js";

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

t.test("Stuffer: lines at the 998-octet limit, LF or CRLF, with a dot first or not: whole lines in one chunk as byte by byte", async (t) => {
  for (const end of ["\n", "\r\n"]) {
    for (const first of ["", "."]) {
      for (const length of [997, 998, 999]) {
        const line = first + "z".repeat(length - first.length);
        const body = latin1(`a${end}${line}${end}${line}${end}b${end}`);
        const whole = stuff([body]);
        const bytes = stuff([...body].map((b) => Buffer.from([b])));
        const label = `${JSON.stringify(end)}, ${first ? "dot first, " : ""}${length} octets`;
        t.ok(Buffer.concat([whole.body, whole.end]).equals(Buffer.concat([bytes.body, bytes.end])), `${label}: the same bytes`);
        const lines = Buffer.concat([whole.body, whole.end]).toString("latin1").split("\r\n");
        t.ok(lines.every((l) => l.length <= 998), `${label}: no line over 998 octets`);
        t.equal(new Stuffer().count(body), whole.body.length, `${label}: count() says what push() makes`);
      }
    }
  }
});
