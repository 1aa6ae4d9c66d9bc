// checkDomain, the deliverability check against a test DNS server: a domain that publishes
// everything, one that publishes nothing, wrong records named with the fix.

import t from "tap";
import { generateKeyPairSync } from "node:crypto";
import { DkimConfigError, checkDomain, dnsRecord, formatCheck, type CheckRow, type DkimKey } from "../../dkim.js";
import { startDnsServer, type Zone } from "../helpers/dns-server.js";
import { RSA, ED, OTHER, expectConfigError } from "../helpers/dkim-keys.js";

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
