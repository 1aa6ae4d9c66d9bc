// The lookups of the TLS policies (route.ts's Router): raw queries that keep the RCODE and the
// AD bit of a validating resolver (TLSA, MX, A), TXT records and a host's addresses, against the
// test DNS server (tests/helpers/dns-server.ts) with its TLSA records and `secure` names.

import t from "tap";
import { Router } from "../../route.js";
import { startDnsServer } from "../helpers/dns-server.js";

const HASH = "8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1";

t.test("raw queries: records, RCODE and the AD bit", async (t) => {
  const dns = await startDnsServer({
    "signed.test": { MX: [{ preference: 10, exchange: "mx.signed.test" }], secure: true },
    "mx.signed.test": { A: ["127.0.0.2"], secure: true },
    "_25._tcp.mx.signed.test": { TLSA: [{ usage: 3, selector: 1, mtype: 1, data: HASH }, { usage: 2, selector: 0, mtype: 1, data: HASH }], secure: true },
    "plain.test": { MX: [{ preference: 10, exchange: "mx.plain.test" }] },
    "mx.plain.test": { A: ["127.0.0.3"] },
    "_25._tcp.mx.plain.test": { TLSA: [{ usage: 3, selector: 1, mtype: 1, data: HASH }] },
    "alias.signed.test": { CNAME: "mx.plain.test", secure: true },
    "bogus.signed.test": { A: ["127.0.0.4"], rcodeFor: { TLSA: "SERVFAIL" }, secure: true },
    "_25._tcp.bogus.signed.test": { rcode: "SERVFAIL" },
    "_smtp._tls.signed.test": { TXT: [["v=TLSRPTv1; ", "rua=mailto:tlsrpt@signed.test"]] },
  });
  t.teardown(() => dns.close());
  const router = new Router({ relay: null, port: 25, resolver: { host: dns.host, port: dns.port }, dnsTimeout: 1000 });

  const tlsa = await router.query("_25._tcp.mx.signed.test", "TLSA");
  t.equal(tlsa.rcode, 0, "NOERROR");
  t.equal(tlsa.secure, true, "AD: validated");
  t.same(tlsa.records.map((r) => [r[0], r[1], r[2], r.subarray(3).toString("hex")]), [[3, 1, 1, HASH], [2, 0, 1, HASH]], "each record's RDATA: usage, selector, matching type, data");
  t.ok(dns.queries.some((q) => q.name === "_25._tcp.mx.signed.test" && q.type === "TLSA"), "asked for type TLSA");

  const insecure = await router.query("_25._tcp.mx.plain.test", "TLSA");
  t.same([insecure.rcode, insecure.secure, insecure.records.length], [0, false, 1], "an unsigned zone: records without AD");

  const absent = await router.query("_25._tcp.mx2.signed.test", "TLSA");
  t.same([absent.rcode, absent.secure, absent.records.length], [3, true, 0], "NXDOMAIN proven by a signed parent: securely absent");
  const nodata = await router.query("mx.signed.test", "TLSA");
  t.same([nodata.rcode, nodata.secure, nodata.records.length], [0, true, 0], "NODATA in a signed zone: securely absent");
  const unsignedAbsent = await router.query("_25._tcp.nothing.plain.test", "TLSA");
  t.same([unsignedAbsent.rcode, unsignedAbsent.secure], [3, false], "NXDOMAIN under an unsigned name: insecure");

  const bogus = await router.query("_25._tcp.bogus.signed.test", "TLSA");
  t.same([bogus.rcode, bogus.secure], [2, false], "bogus (what a validator answers SERVFAIL)");

  const chain = await router.query("alias.signed.test", "A");
  t.same([chain.secure, chain.records.map((r) => [...r].join("."))], [false, ["127.0.0.3"]], "a secure CNAME to an unsigned target: the answer is not secure");
  const mx = await router.query("signed.test", "MX");
  t.same([mx.secure, mx.records.length], [true, 1], "a signed MX RRset");

  t.same(await router.txt("_smtp._tls.signed.test"), ["v=TLSRPTv1; rua=mailto:tlsrpt@signed.test"], "TXT strings joined");
  t.same(await router.txt("_mta-sts.plain.test"), [], "no TXT record: []");
  t.same(await router.hostAddresses("mx.plain.test"), ["127.0.0.3"], "a host's addresses through --resolver");
  await t.rejects(router.hostAddresses("gone.plain.test"), /not found/, "no address: a rejection naming the host");
});

t.test("a resolver that never answers: the raw query gives up, bounded", async (t) => {
  const dns = await startDnsServer({ "slow.test": { rcode: "TIMEOUT" } });
  t.teardown(() => dns.close());
  const router = new Router({ relay: null, port: 25, resolver: { host: dns.host, port: dns.port }, dnsTimeout: 200 });
  const started = Date.now();
  await t.rejects(router.query("slow.test", "TLSA"), /DNS query slow\.test TLSA: timed out/);
  const ms = Date.now() - started;
  t.ok(ms >= 350 && ms < 2000, `two tries of 200 ms (${ms} ms)`);
  t.equal(dns.queries.filter((q) => q.name === "slow.test").length, 2, "asked twice");
});
