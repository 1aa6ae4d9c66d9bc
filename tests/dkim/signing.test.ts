// Signing as the engine sends (dkim.ts): RSA, Ed25519 and dual signatures of every message
// verified by dkimpy (an independent implementation) and by OpenDKIM's opendkim-testmsg against
// a private resolver, tampered copies that fail, h= and folding, signByFrom, a 50 MB message
// signed streaming with flat memory.

import t from "tap";
import { generateKeyPairSync } from "node:crypto";
import fs from "node:fs/promises";
import { createWriteStream } from "node:fs";
import path from "node:path";
import { dkimSignatureFor, dnsRecord, fromDomain, signByFrom, signMessage, type DkimKey } from "../../dkim.js";
import { Spool, measureWire, wireChunks, type HeaderFacts, type QueuedMessage } from "../../queue.js";
import { type Zone } from "../helpers/dns-server.js";
import {
  requireDkimpy, dkimpyVerify, opendkimUnavailable, opendkimVerify, startPrivateResolver, type Verdict,
} from "../helpers/dkim-verifiers.js";
import { EMPTY_HASH, work, RSA, ED, OTHER, TXT, SETS } from "../helpers/dkim-keys.js";

/* ------------------------------------------------------------------------------------ */
/* Signing as the engine sends                                                           */

/** The headers mail.ts adds (SPEC section 2): the same shape as its addedHeaders(). */
function addedHeaders(facts: HeaderFacts, msg: QueuedMessage): Buffer {
  let text = "";
  if (!facts.hasDate) text += `Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n`;
  if (!facts.hasMessageId) text += `Message-ID: <${msg.id}@talker.example.org>\r\n`;
  if (!facts.hasFrom) text += `From: ${msg.sender}\r\n`;
  if (!facts.startsWithHeader) text += "\r\n";
  return Buffer.from(text);
}

async function* concat(...parts: Array<Buffer | AsyncIterable<Buffer>>): AsyncGenerator<Buffer> {
  for (const p of parts) {
    if (Buffer.isBuffer(p)) yield p;
    else yield* p;
  }
}

let spoolCounter = 0;
/** A queue file claimed from a real Spool, as the engine holds it. */
async function queued(content: Buffer | ((file: string) => Promise<void>)): Promise<{ spool: Spool; msg: QueuedMessage }> {
  const maildir = path.join(work, `maildir${spoolCounter++}`);
  const spool = new Spool(maildir, { fsync: false });
  await spool.init();
  const id = `1795000000.${spoolCounter}`;
  const tmp = path.join(maildir, "tmp", `drop.${id}`);
  if (Buffer.isBuffer(content)) await fs.writeFile(tmp, Buffer.concat([Buffer.from("talker@example.org\nbob@example.net\n"), content]));
  else await content(tmp);
  await fs.rename(tmp, path.join(maildir, "outgoing", id));
  const claimed = await spool.claim(id);
  if (claimed === null) throw new Error("claim failed");
  return { spool, msg: await spool.open(claimed.id) };
}

/**
 * Signs a queued message the way the engine is to (signature over the added headers and the
 * content), then writes the wire form: the signature, the prefix, the stuffed content and
 * CRLF.CRLF, from wireChunks(). Returns the wire file.
 */
async function signAndSend(content: Buffer, keys: DkimKey[], name: string): Promise<{ wire: string; fields: string; bytes: Buffer }> {
  const { spool, msg } = await queued(content);
  let prefix: Buffer = Buffer.alloc(0);
  await measureWire(spool, msg, (facts) => (prefix = addedHeaders(facts, msg)));
  const fields = await dkimSignatureFor(concat(prefix, spool.content(msg)), keys, { now: new Date() });
  const parts: Buffer[] = [Buffer.from(fields)];
  for await (const chunk of wireChunks(spool, msg, prefix)) parts.push(chunk);
  const bytes = Buffer.concat(parts);
  const wire = path.join(work, `${name}.wire`);
  await fs.writeFile(wire, bytes);
  return { wire, fields, bytes };
}

const HEADERS = [
  "From: Talker <talker@example.org>",
  "To: Bob <bob@example.net>",
  "Subject: hello",
  "Date: Mon, 23 Nov 2026 12:00:00 +0000",
  "Message-ID: <m1@example.org>",
  "MIME-Version: 1.0",
  "Content-Type: text/plain; charset=utf-8",
  "Content-Transfer-Encoding: 8bit",
];

function lf(lines: string[]): string {
  return lines.join("\n") + "\n";
}

const MESSAGES: Array<[string, Buffer]> = [
  ["plain", Buffer.from(lf([...HEADERS, "", "Hello Bob.", "", "See you."]))],
  ["dot lines", Buffer.from(lf([...HEADERS, "", ".", "..", ".leading", "...three", "a line.", " .", "."]))],
  ["bare LF, bare CR, CRLF mixed", Buffer.from(HEADERS.join("\r\n") + "\n\rline one\rline two\nline three\r\n\r\nlast")],
  ["8-bit body and header", Buffer.concat([
    Buffer.from(lf([...HEADERS.filter((h) => !h.startsWith("Subject")), "Subject: caf\u00e9 na\u00efve \u2014 \u{1F600}", ""])),
    Buffer.from("UTF-8: \u00e9\u00e8\u00ea \u{1F600}\n", "utf8"), Buffer.from("latin1: caf\xe9 \xff\xfe\x80\n", "latin1"),
  ])],
  ["long folded headers", Buffer.from(lf([
    "From: Talker <talker@example.org>",
    `To: ${Array.from({ length: 25 }, (_, i) => `user${i}@example.net`).join(",\n\t")}`,
    `Subject: ${"a long subject ".repeat(8)}\n  folded ${"with  double   spaces ".repeat(5)}  \n\tand tabs\t `,
    `References: ${Array.from({ length: 12 }, (_, i) => `<ref${i}.${"x".repeat(40)}@example.org>`).join("\n ")}`,
    "Date: Mon, 23 Nov 2026 12:00:00 +0000",
    `X-Very-Long: ${"y".repeat(900)}`,
    "",
    `a long body line ${"z".repeat(990)}`,
  ]))],
  ["repeated headers", Buffer.from(lf([
    "Received: from a by b; Mon, 23 Nov 2026 12:00:00 +0000",
    "Received: from c by d; Mon, 23 Nov 2026 11:59:00 +0000",
    "From: Talker <talker@example.org>",
    "To: first@example.net",
    "to: second@example.net",
    "Cc: one@example.net",
    "CC: two@example.net",
    "Cc: three@example.net",
    "Subject: repeated",
    "Date: Mon, 23 Nov 2026 12:00:00 +0000",
    "",
    "body",
  ]))],
  ["white space body", Buffer.from(lf([...HEADERS, "", "  indented\t\ttabs  ", "\t", "trailing   ", "", "  ", "", ""]))],
  ["empty body", Buffer.from(lf([...HEADERS, ""]))],
  ["no empty line, no body", Buffer.from(HEADERS.join("\n"))],
  ["lacks Date, Message-ID and From (added by the engine)", Buffer.from(lf(["To: bob@example.net", "Subject: added", "", "body"]))],
  ["body only (the engine adds the header block)", Buffer.from("just a body line\n.\nsecond line\n")],
];

t.test("dkimpy (an independent implementation) verifies RSA, Ed25519 and dual signatures of every message", async (t) => {
  if (!requireDkimpy(t)) return;
  const files: Array<{ file: string; wire: boolean; name: string; keys: DkimKey[] }> = [];
  for (const [name, content] of MESSAGES) {
    for (const [set, keys] of SETS) {
      const { wire, fields } = await signAndSend(content, keys, `${name}.${set}`.replace(/\W+/g, "_"));
      t.equal(fields.match(/^DKIM-Signature:/gm)?.length, keys.length, `${name} / ${set}: one field per key`);
      files.push({ file: wire, wire: true, name: `${name} / ${set}`, keys });
    }
  }
  const verdicts = await dkimpyVerify(files, TXT, 60000);
  files.forEach((f, i) => {
    const got = verdicts[i];
    t.equal(got.length, f.keys.length, `${f.name}: ${f.keys.length} signature(s) seen`);
    t.same(got.map((v) => v.algorithm), [...f.keys].sort((a) => (a.algorithm === "rsa-sha256" ? -1 : 1)).map((k) => k.algorithm), `${f.name}: RSA first`);
    for (const v of got) t.ok(v.ok, `${f.name}: ${v.algorithm} s=${v.selector} verifies${v.error ? ` (${v.error})` : ""}`);
  });
});

/** Copies of a signed wire file with one change each; every signature must then fail. */
function tampered(bytes: Buffer): Array<[string, Buffer, boolean]> {
  const text = bytes.toString("latin1");
  const bodyAt = text.indexOf("\r\n\r\n") + 4;
  const flipAt = text.indexOf("See you", bodyAt);
  const flipped = Buffer.from(bytes);
  flipped[flipAt] ^= 0x01; // "See" -> "Ree"... one bit of one body byte
  const edit = (from: string, to: string) => Buffer.from(text.replace(from, to), "latin1");
  return [
    ["one body byte flipped", flipped, false],
    ["the signed Subject changed", edit("Subject: hello", "Subject: hellO"), false],
    ["the signed To changed", edit("To: Bob <bob@example.net>", "To: Eve <eve@example.net>"), false],
    ["a second From added on top (over-signed)", Buffer.concat([Buffer.from("From: Eve <eve@example.org>\r\n"), bytes]), false],
    ["a signed header removed", edit("MIME-Version: 1.0\r\n", ""), false],
    ["a body line added at the end", Buffer.from(text.replace(/\r\n\.\r\n$/, "\r\nP.S. pay me\r\n.\r\n"), "latin1"), false],
    // Sanity: what relaxed canonicalization and unsigned fields allow still verifies.
    ["an unsigned header added", Buffer.concat([Buffer.from("X-Spam-Score: 0\r\n"), bytes]), true],
    ["white space changed inside a body line", edit("See you.", "See   you.  "), true],
    ["empty lines added at the end of the body", Buffer.from(text.replace(/\r\n\.\r\n$/, "\r\n\r\n\r\n.\r\n"), "latin1"), true],
  ];
}

t.test("tampered copies fail with dkimpy: a body byte, a signed header, an added From", async (t) => {
  if (!requireDkimpy(t)) return;
  const files: Array<{ file: string; wire: boolean; name: string; pass: boolean; n: number }> = [];
  for (const [set, keys] of SETS) {
    const { bytes } = await signAndSend(MESSAGES[0][1], keys, `tamper.${set}`);
    files.push({ file: path.join(work, `tamper.${set}.wire`), wire: true, name: `${set} untouched`, pass: true, n: keys.length });
    for (const [what, copy, pass] of tampered(bytes)) {
      const file = path.join(work, `tamper.${set}.${files.length}.wire`);
      await fs.writeFile(file, copy);
      files.push({ file, wire: true, name: `${set}: ${what}`, pass, n: keys.length });
    }
  }
  const verdicts = await dkimpyVerify(files, TXT, 60000);
  files.forEach((f, i) => {
    const got: Verdict[] = verdicts[i];
    t.equal(got.length, f.n, `${f.name}: signatures seen`);
    for (const v of got) {
      if (f.pass) t.ok(v.ok, `${f.name}: ${v.algorithm} still verifies${v.error ? ` (${v.error})` : ""}`);
      else t.notOk(v.ok, `${f.name}: ${v.algorithm} fails (${v.error})`);
    }
  });
  // A key that is not the published one fails too.
  const wrongTxt = { ...TXT, [dnsRecord(RSA).name]: dnsRecord({ ...RSA, privateKey: generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey }).value };
  const [[rsaVerdict]] = await dkimpyVerify([{ file: files[0].file, wire: true }], wrongTxt);
  t.notOk(rsaVerdict.ok, `a signature checked against another key fails (${rsaVerdict.error})`);
});

t.test("signMessage: h= lists what is present, as often as it occurs, From once more; folded at 78", async (t) => {
  const block = Buffer.from([
    "Date: Mon, 23 Nov 2026 12:00:00 +0000", "From: a@example.org", "To: x@example.net", "to: y@example.net",
    "Subject: s", "X-Other: not signed", "Received: no",
  ].join("\r\n") + "\r\n");
  const now = new Date("2026-11-23T12:00:00Z");
  const fields = await signMessage(block, EMPTY_HASH, [ED, RSA], { now });
  const [first, second] = fields.split(/\r\n(?=DKIM-Signature:)/);
  t.match(first.replace(/\r\n /g, " "), /^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=example\.org; s=rsa2026;/, "RSA first");
  t.match(second, /^DKIM-Signature: v=1; a=ed25519-sha256; /);
  t.ok(fields.endsWith("\r\n"), "ends with CRLF");
  for (const line of fields.replace(/\r\n$/, "").split("\r\n")) {
    t.ok(line.length <= 78, `at most 78 columns: ${line.length}`);
    t.ok(line.startsWith("DKIM-Signature: ") || line.startsWith(" "), "continuation lines start with a space");
  }
  const unfolded = first.replace(/\r\n /g, " ");
  t.match(unfolded, /t=1795435200;/, "t= from opts.now");
  t.match(unfolded, new RegExp(`bh=${EMPTY_HASH.replace(/[+/]/g, "\\$&")};`));
  const h = / h=([^;]+);/.exec(unfolded)![1].replace(/\s+/g, "");
  t.equal(h, "From:From:To:To:Subject:Date", "From over-signed; To twice; absent names left out; unlisted fields not signed");
  t.equal(await signMessage(block, EMPTY_HASH, []), "", "no keys: nothing");
  const custom = (await signMessage(block, EMPTY_HASH, [ED], { now, headers: ["Subject", "X-Other"] })).replace(/\r\n /g, " ");
  t.equal(/ h=([^;]+);/.exec(custom)![1].replace(/\s+/g, ""), "From:From:Subject:X-Other", "a custom list: From is still signed and over-signed");
});

t.test("signByFrom picks the keys by the header From, or says why it did not sign", async (t) => {
  const keys = [ED, RSA, OTHER];
  const signed = await signByFrom([Buffer.from("From: \"x@evil.test\" <Talker@Mud.Example.ORG> (comment@evil)\nSubject: s\n\nbody\n")], keys);
  t.equal(signed.fromDomain, "mud.example.org");
  t.same(signed.keys, [RSA, ED]);
  t.equal(signed.skipped, null);
  t.equal(signed.fields.match(/^DKIM-Signature:/gm)?.length, 2);
  const other = await signByFrom([Buffer.from("From: someone@elsewhere.test\n\nbody\n")], keys);
  t.match(other, { fields: "", fromDomain: "elsewhere.test", keys: [], skipped: "From domain elsewhere.test has no DKIM key: not signed" });
  const none = await signByFrom([Buffer.from("Subject: no from\n\nbody\n")], keys);
  t.match(none, { fields: "", fromDomain: null, skipped: /no From address/ });
  t.equal(fromDomain("From: a@b.example\r\n"), "b.example");
  t.equal(fromDomain("From: Group: a@one.example, b@two.example;\r\n"), "one.example");
  t.equal(fromDomain("From:\r\n Name\r\n <x@folded.example>\r\n"), "folded.example");
  t.equal(await dkimSignatureFor([Buffer.from("From: a@example.org\n\nx\n")], []), "", "dkimSignatureFor without keys: nothing");
});

t.test("signByFrom does not sign a message with two From fields, and says why", async (t) => {
  const keys = [ED, RSA];
  const two = await signByFrom([Buffer.from("From: a@example.org\nSubject: s\nFrom: b@example.org\n\nbody\n")], keys);
  t.match(two, { fields: "", fromDomain: null, keys: [], skipped: "not DKIM-signed: the message has 2 From: header fields (RFC 5322 allows one)" });
  const disguised = await signByFrom([Buffer.from("From: a@example.org\nFROM : a@example.org\n\nbody\n")], keys);
  t.match(disguised, { fields: "", skipped: /the message has 2 From: header fields/ }, "a From is a From in any case, with white space before the colon");
  const inBody = await signByFrom([Buffer.from("From: a@example.org\n\nFrom: b@example.org\n")], keys);
  t.match(inBody, { fromDomain: "example.org", skipped: null }, "a From: line in the body is no header field");
});

/* ------------------------------------------------------------------------------------ */
/* 50 MB                                                                                 */

t.test("a 50 MB message: signed streaming with flat memory, verified by dkimpy", async (t) => {
  const SIZE = 50 * 1024 * 1024;
  // 1 MiB of lines with everything that matters: dot lines, bare LF and CR, trailing white
  // space, runs of tabs, 8-bit bytes, empty lines.
  const lines = ["Lorem ipsum dolor sit amet,  consectetur\t\tadipiscing elit.  ", ".dot line", "..", ".", "caf\xe9 \xff na\xefve", "", "\t", "bare LF next"];
  let block = "";
  for (let i = 0; block.length < 1024 * 1024; i++) block += lines[i % lines.length] + (i % 7 === 0 ? "\r" : i % 5 === 0 ? "\r\n" : "\n");
  const blockBytes = Buffer.from(block.slice(0, 1024 * 1024), "latin1");
  const header = Buffer.from(lf([...HEADERS, ""]));
  const write = async (file: string) => {
    const out = createWriteStream(file);
    const put = (b: Buffer) => new Promise<void>((resolve, reject) => out.write(b, (err) => (err ? reject(err) : resolve())));
    await put(Buffer.from("talker@example.org\nbob@example.net\n"));
    await put(header);
    for (let written = 0; written < SIZE; written += blockBytes.length) await put(blockBytes);
    await put(Buffer.from("the end\n"));
    await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  };
  const { spool, msg } = await queued(write);
  t.ok(msg.size > SIZE, `the message is ${(msg.size / 1048576).toFixed(1)} MiB`);
  let prefix: Buffer = Buffer.alloc(0);
  await measureWire(spool, msg, (facts) => (prefix = addedHeaders(facts, msg)));

  // Warm up (the heap reaches its working size), then measure a whole signing pass.
  await dkimSignatureFor(concat(prefix, spool.content(msg)), [RSA, ED]).catch(() => "");
  const baseline = process.memoryUsage.rss();
  let peak = baseline;
  async function* sampled(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    for await (const chunk of source) {
      peak = Math.max(peak, process.memoryUsage.rss());
      yield chunk;
    }
  }
  const started = Date.now();
  const fields = await dkimSignatureFor(sampled(concat(prefix, spool.content(msg))), [RSA, ED]);
  peak = Math.max(peak, process.memoryUsage.rss());
  const growth = (peak - baseline) / 1048576;
  t.ok(growth < 16, `peak RSS growth while signing 50 MB: ${growth.toFixed(1)} MiB (< 16), in ${Date.now() - started} ms`);
  t.equal(fields.match(/^DKIM-Signature:/gm)?.length, 2);

  await t.test("dkimpy verifies it, and not a copy with one byte changed", async (t) => {
  if (!requireDkimpy(t)) return;
  const wire = path.join(work, "big.wire");
  const out = createWriteStream(wire);
  const put = (b: Buffer) => new Promise<void>((resolve, reject) => out.write(b, (err) => (err ? reject(err) : resolve())));
  await put(Buffer.from(fields));
  for await (const chunk of wireChunks(spool, msg, prefix)) await put(chunk);
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  const flippedFile = path.join(work, "big-flipped.wire");
  await fs.copyFile(wire, flippedFile);
  const handle = await fs.open(flippedFile, "r+");
  try {
    const at = Math.floor((await handle.stat()).size / 2);
    const one = Buffer.alloc(1);
    await handle.read(one, 0, 1, at);
    one[0] = one[0] === 0x41 ? 0x42 : 0x41;
    await handle.write(one, 0, 1, at);
  } finally {
    await handle.close();
  }
  const [good, bad] = await dkimpyVerify([{ file: wire, wire: true }, { file: flippedFile, wire: true }], TXT, 150000);
  for (const v of good) t.ok(v.ok, `50 MB: ${v.algorithm} verifies${v.error ? ` (${v.error})` : ""}`);
  for (const v of bad) t.notOk(v.ok, `50 MB with one byte changed in the middle: ${v.algorithm} fails (${v.error})`);
  await fs.rm(wire);
  await fs.rm(flippedFile);
  });
});

/* ------------------------------------------------------------------------------------ */
/* OpenDKIM                                                                              */

t.test("OpenDKIM's opendkim-testmsg verifies them too, against a private resolver", async (t) => {
  const why = await opendkimUnavailable();
  if (why !== null) {
    // The tool itself is installed by pretest; a machine without root or namespaces only skips.
    if (process.env.CI && why.startsWith("missing")) t.fail(`${why}: scripts/pretest.sh should install opendkim-tools`);
    else t.plan(0, why);
    return;
  }
  const zone: Zone = {};
  for (const [name, value] of Object.entries(TXT)) zone[name] = { TXT: [value] };
  const resolver = await startPrivateResolver(zone);
  t.teardown(() => resolver.close());
  // libopendkim insists on RFC 5322 counts (one Date, one From, at most one To...).
  const content = MESSAGES[0][1];
  for (const [set, keys] of SETS) {
    const { wire, bytes } = await signAndSend(content, keys, `opendkim.${set}`);
    const stored = path.join(work, `opendkim.${set}.eml`);
    await fs.writeFile(stored, unstuff(bytes));
    const good = await opendkimVerify(stored, resolver);
    t.ok(good.ok, `${set}: opendkim-testmsg verifies${good.stderr ? ` (${good.stderr})` : ""}`);
    for (const [what, copy, pass] of tampered(bytes).slice(0, 3)) {
      const file = `${stored}.bad`;
      await fs.writeFile(file, unstuff(copy));
      const result = await opendkimVerify(file, resolver);
      t.equal(result.ok, pass, `${set}: ${what}: ${result.stderr || "verifies"}`);
    }
    await fs.rm(wire);
  }
  t.ok(resolver.dns.queries.some((q) => q.type === "TXT" && q.name === "rsa2026._domainkey.example.org"), "the keys came from the test DNS server");
});

/** What a receiving MTA stores of a wire copy: dot-stuffing undone, CRLF.CRLF dropped. */
function unstuff(wire: Buffer): Buffer {
  const text = wire.toString("latin1");
  if (!text.endsWith("\r\n.\r\n")) throw new Error("no CRLF.CRLF at the end");
  return Buffer.from(text.slice(0, -3).replace(/(^|\r\n)\./g, "$1"), "latin1");
}
