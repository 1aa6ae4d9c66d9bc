// DKIM (issue 8): relaxed canonicalization against RFC 6376's own example and a naive
// reference, keys and their errors, signatures of messages sent the engine's way (queue file
// -> Spool -> prefix + stuffed wire) verified by independent implementations (dkimpy with
// Debian's Python; OpenDKIM's opendkim-testmsg where a private resolv.conf is possible),
// tampered copies that must fail, a 50 MB message signed with flat memory, the DNS records
// to publish, and the deliverability check against the test DNS server.

import t, { type Test } from "tap";
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync } from "node:crypto";
import fs from "node:fs/promises";
import { createWriteStream } from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  BodyHash, DkimConfigError, checkDomain, dkimSignatureFor, dmarcRecord, dnsRecord, formatCheck, fromDomain,
  generateDkimKey, hashMessage, keysFor, loadDkimKeys, relaxedHeader, signByFrom, signMessage, spfRecord,
  type CheckRow, type DkimKey,
} from "../dkim.js";
import { Spool, measureWire, wireChunks, type HeaderFacts, type QueuedMessage } from "../queue.js";
import { startDnsServer, type Zone } from "./helpers/dns-server.js";
import {
  dkimpyMissing, dkimpyVerify, opendkimUnavailable, opendkimVerify, startPrivateResolver,
  type Verdict,
} from "./helpers/dkim-verifiers.js";

const sha256 = (data: string | Buffer) => createHash("sha256").update(data).digest("base64");
const EMPTY_HASH = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

async function tempDir(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-"));
}

const work = await tempDir();
t.teardown(() => fs.rm(work, { recursive: true, force: true }));

// Two keys for example.org (dual signing) and one for another domain, made by generateDkimKey.
const RSA = await generateDkimKey("rsa", path.join(work, "rsa.pem"), { domain: "example.org", selector: "rsa2026" });
const ED = await generateDkimKey("ed25519", path.join(work, "ed.pem"), { domain: "example.org", selector: "ed2026" });
const OTHER = await generateDkimKey("ed25519", path.join(work, "other.pem"), { domain: "other.test", selector: "s1" });
const TXT: Record<string, string> = Object.fromEntries([RSA, ED, OTHER].map((k) => [dnsRecord(k).name, dnsRecord(k).value]));
const SETS: Array<[string, DkimKey[]]> = [["rsa-sha256", [RSA]], ["ed25519-sha256", [ED]], ["dual", [RSA, ED]]];

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

/* ------------------------------------------------------------------------------------ */
/* Keys                                                                                  */

async function expectConfigError(t: Test, fn: () => unknown, flag: string, file: string | null, pattern: RegExp, what: string): Promise<void> {
  try {
    await fn();
    t.fail(`${what}: no error`);
  } catch (err) {
    t.ok(err instanceof DkimConfigError, `${what}: a DkimConfigError`);
    const e = err as DkimConfigError;
    t.equal(e.flag, flag, `${what}: names ${flag}`);
    t.equal(e.file, file, `${what}: names the file`);
    t.match(e.message, pattern, `${what}: ${e.message}`);
    t.ok(e.message.includes(flag), `${what}: the message names the flag`);
    if (file) t.ok(e.message.includes(file), `${what}: the message names the file`);
  }
}

t.test("loadDkimKeys: one key, a key table with dual keys, and what is refused", async (t) => {
  const dir = await tempDir();
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  t.same(loadDkimKeys({}), [], "no key options: no keys");

  const one = loadDkimKeys({ domain: "Example.ORG.", selector: "rsa2026", keyFile: RSA.file });
  t.equal(one.length, 1);
  t.match(one[0], { domain: "example.org", selector: "rsa2026", algorithm: "rsa-sha256", file: RSA.file, flag: "--dkim-key" });
  t.equal(dnsRecord(one[0]).value, dnsRecord(RSA).value, "the same key read back");

  // PKCS#1 PEM and a bare Ed25519 seed (dknewkey's format) are read too.
  const pkcs1 = path.join(dir, "pkcs1.pem");
  await fs.writeFile(pkcs1, RSA.privateKey.export({ type: "pkcs1", format: "pem" }));
  t.equal(loadDkimKeys({ domain: "example.org", selector: "a", keyFile: pkcs1 })[0].algorithm, "rsa-sha256", "PKCS#1 PEM");
  const seed = path.join(dir, "ed.seed");
  const jwk = ED.privateKey.export({ format: "jwk" }) as { d: string };
  await fs.writeFile(seed, Buffer.from(jwk.d, "base64url").toString("base64") + "\n");
  const fromSeed = loadDkimKeys({ domain: "example.org", selector: "ed2026", keyFile: seed })[0];
  t.equal(dnsRecord(fromSeed).value, dnsRecord(ED).value, "a base64 Ed25519 seed gives the same key");

  await fs.mkdir(path.join(dir, "keys"));
  await fs.copyFile(ED.file!, path.join(dir, "keys", "ed.pem"));
  const table = path.join(dir, "dkim-keys.json");
  await fs.writeFile(table, JSON.stringify({
    "example.org": [{ selector: "ed2026", key: "keys/ed.pem" }, { selector: "rsa2026", key: RSA.file }],
    "other.test": { selector: "s1", key: OTHER.file },
  }));
  const keys = loadDkimKeys({ keysFile: table });
  t.same(keys.map((k) => [k.domain, k.selector, k.algorithm]), [
    ["example.org", "ed2026", "ed25519-sha256"], ["example.org", "rsa2026", "rsa-sha256"], ["other.test", "s1", "ed25519-sha256"],
  ], "the table's keys, relative paths from the table's folder");
  t.equal(keys[0].file, path.join(dir, "keys", "ed.pem"));
  t.same(keysFor("example.org", keys).map((k) => k.algorithm), ["rsa-sha256", "ed25519-sha256"], "dual: RSA first");

  // Refused, each with the flag and the file named.
  const small = path.join(dir, "small.pem");
  await fs.writeFile(small, generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey.export({ type: "pkcs8", format: "pem" }));
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: small }), "--dkim-key", small, /RSA key of 1024 bits; DKIM keys must have 2048 bits or more/, "a 1024-bit RSA key");
  const garbage = path.join(dir, "garbage.pem");
  await fs.writeFile(garbage, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n");
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: garbage }), "--dkim-key", garbage, /malformed private key/, "a malformed key");
  const text = path.join(dir, "text.pem");
  await fs.writeFile(text, "hello\n");
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: text }), "--dkim-key", text, /not a PEM private key/, "not a key at all");
  const pub = path.join(dir, "pub.pem");
  await fs.writeFile(pub, createPublicKey(RSA.privateKey).export({ type: "spki", format: "pem" }));
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: pub }), "--dkim-key", pub, /a public key/, "a public key");
  const ec = path.join(dir, "ec.pem");
  await fs.writeFile(ec, generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey.export({ type: "pkcs8", format: "pem" }));
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: ec }), "--dkim-key", ec, /a ec key/, "an EC key");
  const missing = path.join(dir, "nope.pem");
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: missing }), "--dkim-key", missing, /cannot read the key: ENOENT/, "a missing file");
  if (process.getuid?.() !== 0) {
    const locked = path.join(dir, "locked.pem");
    await fs.copyFile(RSA.file!, locked);
    await fs.chmod(locked, 0);
    await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s", keyFile: locked }), "--dkim-key", locked, /EACCES/, "an unreadable file");
  }
  for (const bad of ["bad_selector", "a..b", "-lead", "trail-", "spa ce", "", "x".repeat(64)]) {
    await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: bad, keyFile: RSA.file }), "--dkim-selector", RSA.file!, /characters DNS does not allow/, `selector ${JSON.stringify(bad)}`);
  }
  t.equal(loadDkimKeys({ domain: "example.org", selector: "may2026.eu-west", keyFile: RSA.file })[0].selector, "may2026.eu-west", "dotted selectors are fine");
  await expectConfigError(t, () => loadDkimKeys({ domain: "exa mple.org", selector: "s", keyFile: RSA.file }), "--dkim-domain", RSA.file!, /not a domain name/, "a bad domain");
  await expectConfigError(t, () => loadDkimKeys({ selector: "s", keyFile: RSA.file }), "--dkim-domain", RSA.file!, /needed with --dkim-key/, "no domain");
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", keyFile: RSA.file }), "--dkim-selector", RSA.file!, /needed with --dkim-key/, "no selector");
  await expectConfigError(t, () => loadDkimKeys({ domain: "example.org", selector: "s" }), "--dkim-key", null, /needed with --dkim-domain/, "no key file");

  const badJson = path.join(dir, "bad.json");
  await fs.writeFile(badJson, "{ nope");
  await expectConfigError(t, () => loadDkimKeys({ keysFile: badJson }), "--dkim-keys", badJson, /not JSON/, "a table that is not JSON");
  const badShape = path.join(dir, "shape.json");
  await fs.writeFile(badShape, JSON.stringify({ "example.org": { selector: "s" } }));
  await expectConfigError(t, () => loadDkimKeys({ keysFile: badShape }), "--dkim-keys", badShape, /expected \{ "selector": S, "key": FILE \}/, "an entry without a key");
  const badSel = path.join(dir, "sel.json");
  await fs.writeFile(badSel, JSON.stringify({ "example.org": { selector: "under_score", key: RSA.file } }));
  await expectConfigError(t, () => loadDkimKeys({ keysFile: badSel }), "--dkim-keys", badSel, /characters DNS does not allow/, "a bad selector in the table");
  const badKey = path.join(dir, "key.json");
  await fs.writeFile(badKey, JSON.stringify({ "example.org": [{ selector: "a", key: RSA.file }, { selector: "b", key: small }] }));
  await expectConfigError(t, () => loadDkimKeys({ keysFile: badKey }), "--dkim-keys", small, /--dkim-keys .*key\.json: example\.org: key .*small\.pem: RSA key of 1024 bits/, "a small key in the table");
  const dup = path.join(dir, "dup.json");
  await fs.writeFile(dup, JSON.stringify({ "example.org": [{ selector: "a", key: RSA.file }, { selector: "a", key: ED.file }] }));
  await expectConfigError(t, () => loadDkimKeys({ keysFile: dup }), "--dkim-keys", ED.file!, /a second key for a\._domainkey\.example\.org/, "two keys for one selector");
});

t.test("keysFor: the configured domain or a subdomain; the most specific domain wins", async (t) => {
  const sub = { ...OTHER, domain: "lists.example.org", selector: "l1" };
  const keys = [ED, RSA, OTHER, sub];
  t.same(keysFor("example.org", keys), [RSA, ED], "the domain itself, RSA first");
  t.same(keysFor("EXAMPLE.org.", keys), [RSA, ED], "case and a trailing dot do not matter");
  t.same(keysFor("mud.example.org", keys), [RSA, ED], "a subdomain: signed as d=example.org");
  t.same(keysFor("a.lists.example.org", keys), [sub], "the most specific configured domain");
  t.same(keysFor("badexample.org", keys), [], "not a subdomain: a mere suffix");
  t.same(keysFor("example.net", keys), []);
});

t.test("generateDkimKey: mode 0600, PKCS#8, never overwrites; dnsRecord, SPF and DMARC", async (t) => {
  const dir = await tempDir();
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const old = process.umask(0);
  try {
    const file = path.join(dir, "new.pem");
    const key = await generateDkimKey("ed25519", file, { domain: "example.org", selector: "s1" });
    t.equal((await fs.stat(file)).mode & 0o777, 0o600, "mode 0600 even with umask 0");
    const pem = await fs.readFile(file, "utf8");
    t.match(pem, /^-----BEGIN PRIVATE KEY-----\n/, "PKCS#8 PEM");
    t.equal(createPrivateKey(pem).asymmetricKeyType, "ed25519");
    t.match(key, { domain: "example.org", selector: "s1", algorithm: "ed25519-sha256" });
    await expectConfigError(t, () => generateDkimKey("rsa", file, { domain: "example.org", selector: "s1" }), "--dkim-key", file, /exists already; not overwritten/, "an existing file");
    t.equal(await fs.readFile(file, "utf8"), pem, "the existing key is untouched");
    await expectConfigError(t, () => generateDkimKey("ed25519", path.join(dir, "x.pem"), { domain: "example.org", selector: "a_b" }), "--dkim-selector", path.join(dir, "x.pem"), /characters DNS does not allow/, "a bad selector");
    await t.rejects(fs.stat(path.join(dir, "x.pem")), "no file for a refused selector");
  } finally {
    process.umask(old);
  }

  const ed = dnsRecord(ED);
  t.equal(ed.name, "ed2026._domainkey.example.org");
  t.match(ed.value, /^v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=$/);
  const raw = Buffer.from(ed.value.split("p=")[1], "base64");
  t.equal(raw.length, 32, "Ed25519 p= is the raw 32-byte key (RFC 8463)");
  t.same(raw, Buffer.from((createPublicKey(ED.privateKey).export({ format: "jwk" }) as { x: string }).x, "base64url"));
  const rsa = dnsRecord(RSA);
  t.equal(rsa.name, "rsa2026._domainkey.example.org");
  t.match(rsa.value, /^v=DKIM1; k=rsa; p=MII[A-Za-z0-9+/=]+$/);
  const spki = createPublicKey({ key: Buffer.from(rsa.value.split("p=")[1], "base64"), format: "der", type: "spki" });
  t.equal(spki.asymmetricKeyDetails?.modulusLength, 2048, "RSA p= is the SubjectPublicKeyInfo of the 2048-bit key");
  const strings = [...rsa.zone.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]);
  t.ok(strings.length >= 2 && strings.every((s) => s.length <= 255), "the zone line splits it into strings of at most 255");
  t.equal(strings.join(""), rsa.value);
  t.match(rsa.zone, /^rsa2026\._domainkey\.example\.org\. IN TXT \( "v=DKIM1; k=rsa; p=/);

  t.match(spfRecord("example.org", "192.0.2.25"), { name: "example.org", value: "v=spf1 ip4:192.0.2.25 -all", zone: 'example.org. IN TXT "v=spf1 ip4:192.0.2.25 -all"' });
  t.match(spfRecord("example.org", "2001:db8::25"), { value: "v=spf1 ip6:2001:db8::25 -all" });
  t.match(spfRecord("example.org", "192.0.2.25").note, /one SPF record per domain/);
  t.throws(() => spfRecord("example.org", "mail.example.org"), DkimConfigError);
  const dmarc = dmarcRecord("example.org");
  t.match(dmarc, { name: "_dmarc.example.org", value: "v=DMARC1; p=none; rua=mailto:postmaster@example.org" });
  t.match(dmarc.note, /p=none only asks for reports.*p=quarantine, then p=reject/);
});

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
  return { spool, msg: await spool.open(claimed) };
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
  const missing = dkimpyMissing();
  if (missing.length > 0) {
    if (process.env.CI) t.fail(`dkimpy cannot run, missing ${missing.join(", ")}: scripts/pretest.sh should install python3-dkim and python3-nacl`);
    else t.plan(0, `missing ${missing.join(", ")} (python3-dkim, python3-nacl)`);
    return;
  }
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
  if (dkimpyMissing().length > 0) {
    if (process.env.CI) t.fail(`dkimpy cannot run, missing ${dkimpyMissing().join(", ")}`);
    else t.plan(0, "dkimpy missing");
    return;
  }
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
  const fields = signMessage(block, EMPTY_HASH, [ED, RSA], { now });
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
  t.equal(signMessage(block, EMPTY_HASH, []), "", "no keys: nothing");
  const custom = signMessage(block, EMPTY_HASH, [ED], { now, headers: ["Subject", "X-Other"] }).replace(/\r\n /g, " ");
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

  if (dkimpyMissing().length > 0) {
    if (process.env.CI) t.fail(`dkimpy cannot run, missing ${dkimpyMissing().join(", ")}`);
    return;
  }
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

/* ------------------------------------------------------------------------------------ */
/* The deliverability check                                                              */

const SOURCE = "192.0.2.25";
const REVERSE = "25.2.0.192.in-addr.arpa";

function row(rows: CheckRow[], item: string): CheckRow {
  const found = rows.find((r) => r.item === item);
  if (!found) throw new Error(`no row ${item} in ${JSON.stringify(rows.map((r) => r.item))}`);
  return found;
}

t.test("checkDomain: a domain that publishes everything is ok on every line", async (t) => {
  const zone: Zone = {
    "example.org": { MX: [{ preference: 10, exchange: "mx.example.org" }], TXT: ["some-verification=abc", `v=spf1 a:mail.example.org include:_spf.example.org -all`] },
    "_spf.example.org": { TXT: ["v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.0/28 ~all"] },
    "mail.example.org": { A: [SOURCE] },
    "mx.example.org": { A: ["192.0.2.1"] },
    "_dmarc.example.org": { TXT: ["v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org"] },
    [dnsRecord(RSA).name]: { TXT: [dnsRecord(RSA).value] },
    [dnsRecord(ED).name]: { TXT: [["v=DKIM1; k=ed25519; ", `p=${dnsRecord(ED).value.split("p=")[1]}`]] },
    [REVERSE]: { PTR: ["mail.example.org"] },
  };
  const dns = await startDnsServer(zone);
  t.teardown(() => dns.close());
  const rows = await checkDomain("example.org", { resolver: dns.address, keys: [ED, RSA, OTHER], sourceIp: SOURCE, dnsTimeout: 1 });
  t.same(rows.map((r) => r.item), ["MX", "SPF", "DMARC", "DKIM rsa2026", "DKIM ed2026", "PTR"], "one row each, keys RSA first");
  for (const r of rows) t.equal(r.status, "ok", `${r.item}: ${r.detail}`);
  t.equal(row(rows, "MX").detail, "10 mx.example.org");
  t.match(row(rows, "SPF").detail, /passes for 192\.0\.2\.25/);
  t.match(row(rows, "DKIM rsa2026").detail, /matches --dkim-key .*rsa\.pem/);
  t.equal(row(rows, "PTR").detail, `${SOURCE} -> mail.example.org -> ${SOURCE}`);
  const table = formatCheck(rows);
  t.match(table, /^ITEM +STATUS +DETAIL\n/);
  t.equal(table.split("\n").filter((l) => / ok {7}/.test(l)).length, 6, "six ok lines");
  t.notMatch(table, /fix:/, "nothing to fix");

  // A subdomain uses the parent's keys (d= the configured domain) and inherits its DMARC.
  zone["mud.example.org"] = { MX: [{ preference: 5, exchange: "mx.example.org" }], TXT: ["v=spf1 ip4:192.0.2.25 -all"] };
  const sub = await checkDomain("mud.example.org", { resolver: dns.address, keys: [RSA], dnsTimeout: 1 });
  t.same(sub.map((r) => [r.item, r.status]), [["MX", "ok"], ["SPF", "ok"], ["DMARC", "ok"], ["DKIM rsa2026", "ok"]], "no --source-ip: no PTR row");
  t.match(row(sub, "DMARC").detail, /at _dmarc\.example\.org, applies to mud\.example\.org/);
});

t.test("checkDomain: a domain that publishes nothing: every line missing, with the record to publish", async (t) => {
  const dns = await startDnsServer({ "bare.test": {} });
  t.teardown(() => dns.close());
  const key = { ...ED, domain: "bare.test", selector: "s9" };
  const rows = await checkDomain("bare.test", { resolver: dns.address, keys: [key], sourceIp: SOURCE, dnsTimeout: 1 });
  t.same(rows.map((r) => [r.item, r.status]), [["MX", "missing"], ["SPF", "missing"], ["DMARC", "missing"], ["DKIM s9", "missing"], ["PTR", "missing"]]);
  t.match(row(rows, "SPF").fix, 'publish bare.test. IN TXT "v=spf1 ip4:192.0.2.25 -all"');
  t.match(row(rows, "DMARC").fix, 'publish _dmarc.bare.test. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@bare.test"');
  t.match(row(rows, "DKIM s9").fix, `publish s9._domainkey.bare.test. IN TXT "v=DKIM1; k=ed25519; p=`);
  t.match(row(rows, "PTR").fix, /PTR to a name that resolves back/);
  const table = formatCheck(rows);
  t.equal(table.split("\n").filter((l) => /^ +fix: /.test(l)).length, 5, "a fix under each line");

  const noKeys = await checkDomain("bare.test", { resolver: dns.address, dnsTimeout: 1 });
  t.same(noKeys.map((r) => [r.item, r.status]), [["MX", "missing"], ["SPF", "missing"], ["DMARC", "missing"], ["DKIM", "missing"]]);
  t.match(row(noKeys, "DKIM").fix, /--dkim-keygen --dkim-domain bare\.test/);
  const otherKeys = await checkDomain("bare.test", { resolver: dns.address, keys: [OTHER], dnsTimeout: 1 });
  t.match(row(otherKeys, "DKIM").detail, /none of the configured keys signs for bare\.test \(other\.test\)/);
});

t.test("checkDomain: wrong records are named, with the fix; a key that is not ours is a configuration error", async (t) => {
  const stranger = generateKeyPairSync("ed25519").privateKey;
  const zone: Zone = {
    "wrong.test": { MX: [{ preference: 0, exchange: "." }], TXT: ["v=spf1 ip4:198.51.100.7 -all", "v=spf1 mx -all"] },
    "_dmarc.wrong.test": { TXT: ["v=DMARC1; p=maybe"] },
    "s1._domainkey.wrong.test": { TXT: [dnsRecord({ ...ED, domain: "wrong.test", selector: "s1", privateKey: stranger }).value] },
    "s2._domainkey.wrong.test": { TXT: ["v=DKIM1; k=rsa; p="] },
    "s3._domainkey.wrong.test": { TXT: [dnsRecord({ ...ED, domain: "wrong.test", selector: "s3" }).value.replace("k=ed25519", "k=rsa")] },
    [REVERSE]: { PTR: ["dynamic-192-0-2-25.isp.test"] },
    "dynamic-192-0-2-25.isp.test": { A: ["203.0.113.9"] },
    "softfail.test": { TXT: ["v=spf1 ip4:198.51.100.7 ~all"] },
    "loop.test": { TXT: ["v=spf1 include:loop.test -all"] },
    "servfail.test": { rcodeFor: { TXT: "SERVFAIL" }, MX: [{ preference: 1, exchange: "mx.servfail.test" }] },
  };
  const dns = await startDnsServer(zone);
  t.teardown(() => dns.close());
  const keys: DkimKey[] = [
    { ...ED, domain: "wrong.test", selector: "s1" }, { ...RSA, domain: "wrong.test", selector: "s2" }, { ...ED, domain: "wrong.test", selector: "s3" },
  ];
  const rows = await checkDomain("wrong.test", { resolver: dns.address, keys, sourceIp: SOURCE, dnsTimeout: 1 });
  t.same(rows.map((r) => [r.item, r.status]), [
    ["MX", "wrong"], ["SPF", "wrong"], ["DMARC", "wrong"], ["DKIM s2", "wrong"], ["DKIM s1", "wrong"], ["DKIM s3", "wrong"], ["PTR", "wrong"],
  ]);
  t.match(row(rows, "MX").detail, /null MX/);
  t.match(row(rows, "SPF").detail, /2 SPF records/);
  t.match(row(rows, "DMARC").detail, /no valid p=/);
  const s1 = row(rows, "DKIM s1");
  t.match(s1.detail, /p= is not the public half of --dkim-key .*ed\.pem/);
  t.ok(s1.error instanceof DkimConfigError, "the mismatch carries a configuration error");
  t.match(s1.error, { flag: "--dkim-key", file: ED.file });
  t.match(s1.error!.message, /^--dkim-key .*ed\.pem: does not match the key published at s1\._domainkey\.wrong\.test/);
  t.match(row(rows, "DKIM s2").detail, /revoked/);
  t.match(row(rows, "DKIM s3").detail, /k=rsa, the key is ed25519/);
  t.match(row(rows, "PTR").detail, /dynamic-192-0-2-25\.isp\.test, which does not resolve back/);
  t.match(formatCheck(rows), /DKIM s1 +wrong +/);

  const soft = await checkDomain("softfail.test", { resolver: dns.address, sourceIp: SOURCE, dnsTimeout: 1 });
  t.match(row(soft, "SPF"), { status: "wrong", detail: /softfail for 192\.0\.2\.25/, fix: "add ip4:192.0.2.25 to the record, before its all" });
  const loop = await checkDomain("loop.test", { resolver: dns.address, sourceIp: SOURCE, dnsTimeout: 1 });
  t.match(row(loop, "SPF"), { status: "wrong", detail: /permerror/ });
  const failing = await checkDomain("servfail.test", { resolver: dns.address, dnsTimeout: 1 });
  t.match(row(failing, "SPF"), { status: "wrong", detail: /DNS lookup failed \(ESERVFAIL\)/ });
  t.match(row(failing, "MX"), { status: "ok" });

  await expectConfigError(t, () => checkDomain("not a domain", { resolver: dns.address }), "--check-domain", null, /not a domain name/, "a bad domain");
  await expectConfigError(t, () => checkDomain("wrong.test", { resolver: dns.address, sourceIp: "mail.example.org" }), "--source-ip", null, /not an IP address/, "a bad source address");
  await expectConfigError(t, () => checkDomain("wrong.test", { resolver: "dns.example.org:53" }), "--resolver", null, /expected IP\[:PORT\]/, "a bad resolver");
});
