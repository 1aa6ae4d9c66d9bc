// DKIM keys: loadDkimKeys (one key, a key table with dual keys, what is refused), keysFor,
// generateDkimKey (mode 0600, PKCS#8, never overwrites) and the DNS, SPF and DMARC records.

import t from "tap";
import { createPrivateKey, createPublicKey, generateKeyPairSync } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import {
  DkimConfigError, dmarcRecord, dnsRecord, generateDkimKey, keysFor, loadDkimKeys, spfRecord,
} from "../../dkim.js";
import { tempDir, RSA, ED, OTHER, expectConfigError } from "../helpers/dkim-keys.js";

/* ------------------------------------------------------------------------------------ */
/* Keys                                                                                  */

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
