// Canonicalization (RFC 6376 3.4): the relaxed example of section 3.4.5, the relaxed body and
// headers at every chunking against a reference.

import t from "tap";
import { BodyHash, hashMessage, relaxedHeader } from "../../dkim.js";
import { sha256, EMPTY_HASH } from "../helpers/dkim-keys.js";

/* ------------------------------------------------------------------------------------ */
/* Canonicalization                                                                      */

/** Relaxed body canonicalization the naive way (whole body, regular expressions), as dkimpy does it. */
function referenceBody(body: Buffer): Buffer {
  let s = body.toString("latin1");
  s = s.replace(/[\t ]+\r\n/g, "\r\n").replace(/[\t ]+$/, "").replace(/[\t ]+/g, " ");
  s = s.replace(/(\r\n)+$/, "");
  return Buffer.from(s === "" ? "" : s + "\r\n", "latin1");
}

function hashInChunks(body: Buffer, cuts: number[]): string {
  const h = new BodyHash();
  let at = 0;
  for (const cut of [...cuts.filter((c) => c > 0 && c < body.length).sort((a, b) => a - b), body.length]) {
    h.push(body.subarray(at, cut));
    at = cut;
  }
  return h.digest();
}

t.test("RFC 6376 section 3.4.5: the relaxed example", async (t) => {
  // A: <SP> X <CRLF> / B <SP> : <SP> Y <HTAB><CRLF> <HTAB> Z <SP><SP><CRLF>
  t.equal(relaxedHeader("A: X\r\n"), "a:X\r\n");
  t.equal(relaxedHeader("B : Y\t\r\n\tZ  \r\n"), "b:Y Z\r\n");
  // <SP> C <SP><CRLF> D <SP><HTAB><SP> E <CRLF> <CRLF> <CRLF>  ->  <SP> C <CRLF> D <SP> E <CRLF>
  const body = Buffer.from(" C \r\nD \t E\r\n\r\n\r\n");
  const h = new BodyHash();
  h.push(body);
  t.equal(h.digest(), sha256(" C\r\nD E\r\n"));
  const fields = Buffer.from("A: X\r\nB : Y\t\r\n\tZ  \r\n");
  const { headerBlock, bodyHash } = await hashMessage([Buffer.concat([fields, Buffer.from("\r\n"), body])]);
  t.equal(headerBlock.toString(), fields.toString(), "the header block, without the empty line");
  t.equal(bodyHash, sha256(" C\r\nD E\r\n"), "the same through hashMessage");
});

t.test("relaxed body: edge cases and every chunking give the reference hash", async (t) => {
  const cases: Array<[string, string, string]> = [
    ["empty body", "", ""],
    ["only empty lines", "\r\n\r\n\r\n", ""],
    ["only white space lines", "  \r\n\t\r\n \t \r\n", ""],
    ["no final CRLF", "abc", "abc\r\n"],
    ["trailing white space without CRLF", "abc \t ", "abc\r\n"],
    ["leading white space kept as one SP", "\t\t x\r\n", " x\r\n"],
    ["inner empty lines kept", "a\r\n\r\n  \r\nb\r\n\r\n", "a\r\n\r\n\r\nb\r\n"],
    ["runs of white space", "a  \t b\t\tc  \r\n", "a b c\r\n"],
    ["8-bit bytes", "caf\xe9 \xff\xfe  x\r\n", "caf\xe9 \xff\xfe x\r\n"],
  ];
  for (const [name, body, canonical] of cases) {
    const bytes = Buffer.from(body, "latin1");
    t.equal(hashInChunks(bytes, []), sha256(Buffer.from(canonical, "latin1")), `${name}: whole`);
    t.equal(sha256(referenceBody(bytes)), sha256(Buffer.from(canonical, "latin1")), `${name}: the reference agrees`);
    const everyByte = Array.from({ length: bytes.length }, (_, i) => i);
    t.equal(hashInChunks(bytes, everyByte), sha256(Buffer.from(canonical, "latin1")), `${name}: one byte at a time`);
  }
  t.equal(hashInChunks(Buffer.alloc(0), []), EMPTY_HASH, "an empty body hashes as the empty string (RFC 6376 3.4.4)");

  // Random bodies made of the bytes that matter, cut at random places, against the reference.
  let seed = 42;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const alphabet = ["a", "b", " ", "\t", "\r\n", "\r\n", "\r\n\r\n", ".", "\xe9"];
  let mismatches = 0;
  for (let i = 0; i < 400; i++) {
    let s = "";
    const parts = rand(60);
    for (let j = 0; j < parts; j++) s += alphabet[rand(alphabet.length)];
    const bytes = Buffer.from(s, "latin1");
    const cuts = Array.from({ length: rand(8) }, () => rand(bytes.length + 1));
    if (hashInChunks(bytes, cuts) !== sha256(referenceBody(bytes))) mismatches++;
  }
  t.equal(mismatches, 0, "400 random bodies in random chunks");

  // A long run of empty lines between content, across many chunks: counted, not kept.
  const many = Buffer.concat([Buffer.from("x"), Buffer.alloc(300_000, "\r\n"), Buffer.from("y\r\n")]);
  const expected = sha256(Buffer.concat([Buffer.from("x"), Buffer.alloc(300_000, "\r\n"), Buffer.from("y\r\n")]));
  t.equal(hashInChunks(many, [1, 2, 3, 70_001, 150_000, 299_999]), expected, "150,000 empty lines then content");
  const trailing = Buffer.concat([Buffer.from("x \r\n"), Buffer.alloc(300_000, "\r\n")]);
  t.equal(hashInChunks(trailing, [2, 3, 100_000]), sha256("x\r\n"), "150,000 trailing empty lines dropped");
  const h = new BodyHash();
  h.digest();
  t.throws(() => h.push(Buffer.from("x")), /after digest/);
});

t.test("relaxed headers: unfolding, white space, case; the header block split across chunks", async (t) => {
  t.equal(relaxedHeader("SUBJECT:  hello \r\n\t  world\t \r\n"), "subject:hello world\r\n");
  t.equal(relaxedHeader("To:\r\n a@b.c,\r\n\tc@d.e"), "to:a@b.c, c@d.e\r\n");
  t.equal(relaxedHeader("X-Empty:   "), "x-empty:\r\n");
  t.equal(relaxedHeader(Buffer.from("Subject: caf\xc3\xa9", "latin1")), "subject:caf\xc3\xa9\r\n", "8-bit bytes kept as bytes");
  const message = Buffer.from("From: a@example.org\nSubject: x\r\n\r\nbody\rline\n");
  for (let cut = 0; cut <= message.length; cut++) {
    const { headerBlock, bodyHash } = await hashMessage([message.subarray(0, cut), message.subarray(cut)]);
    if (headerBlock.toString() !== "From: a@example.org\r\nSubject: x\r\n" || bodyHash !== sha256("body\r\nline\r\n")) {
      t.fail(`split at ${cut}: ${JSON.stringify(headerBlock.toString())} ${bodyHash}`);
    }
  }
  const noBody = await hashMessage([Buffer.from("From: a@example.org\nSubject: x")]);
  t.equal(noBody.headerBlock.toString(), "From: a@example.org\r\nSubject: x\r\n", "no empty line: all header");
  t.equal(noBody.bodyHash, EMPTY_HASH);
  const bodyOnly = await hashMessage([Buffer.from("\nhello\n")]);
  t.equal(bodyOnly.headerBlock.length, 0, "an empty line first: no header block");
  t.equal(bodyOnly.bodyHash, sha256("hello\r\n"));
  await t.rejects(hashMessage([Buffer.alloc(2 * 1024 * 1024, "X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")]), /header block longer than/);
});

t.test("hashMessage of a wire form (stuffed, ending CRLF.CRLF): the same hash as of the message; nothing after the end", async (t) => {
  const raw = Buffer.from("From: a@example.org\nSubject: x\n\n.dot first\nbody\n", "latin1");
  const wire = Buffer.from("From: a@example.org\r\nSubject: x\r\n\r\n..dot first\r\nbody\r\n.\r\n", "latin1");
  const fromRaw = await hashMessage([raw]);
  t.same(await hashMessage([wire], { wire: true }), fromRaw, "un-stuffed, it hashes as the message it carries");
  t.same(await hashMessage([wire.subarray(0, 30), wire.subarray(30)], { wire: true }), fromRaw, "in two pieces");
  await t.rejects(hashMessage([Buffer.concat([wire, Buffer.from("MORE\r\n")])], { wire: true }), /bytes after the end/, "bytes after the end, in the same piece");
  await t.rejects(hashMessage([wire, Buffer.from("MORE\r\n")], { wire: true }), /bytes after the end/, "bytes after the end, in a piece of their own");
  await t.rejects(hashMessage([wire.subarray(0, -3)], { wire: true }), /has no end/, "no end");
});

t.test("hashMessage: many dot-first lines (small un-stuffed pieces, gathered) among long ones (under 998 octets: not folded) hash as the body does whole", async (t) => {
  const lines: string[] = [];
  for (let i = 0; lines.join("\r\n").length < 60 * 1024; i++) {
    lines.push(i % 3 === 0 ? `.dot ${i}` : i % 17 === 0 ? "x".repeat(900 + (i % 5) * 20) : i % 11 === 0 ? "." : `line ${i}  with  spaces `);
  }
  const body = lines.join("\r\n") + "\r\n";
  const expected = new BodyHash();
  expected.push(Buffer.from(body, "latin1"));
  const want = expected.digest();
  const raw = Buffer.from(`From: a@example.org\r\nSubject: s\r\n\r\n${body}`, "latin1");
  const got = await hashMessage([raw]);
  t.equal(got.bodyHash, want, "from the raw message");
  t.equal(got.headerBlock.toString(), "From: a@example.org\r\nSubject: s\r\n", "the header block intact");
  const pieces: Buffer[] = [];
  for (let at = 0; at < raw.length; at += 997) pieces.push(raw.subarray(at, at + 997));
  t.equal((await hashMessage(pieces)).bodyHash, want, "from 997-octet pieces");
});
