// DANE (RFC 7672) under --tls dane: TLSA records `_PORT._tcp.MX` in the test DNS server, trusted
// only with the AD bit (`secure` names), and real Postfix MX hosts (127.0.0.2 with a certificate
// for the MX names that sends its chain; 127.0.0.4 without STARTTLS). DANE-EE and DANE-TA pass,
// a record that matches nothing, an insecure zone, securely absent records, a bogus answer,
// unusable records, a host without STARTTLS, and DANE before MTA-STS.

import t from "tap";
import { issueCert, OPENSSL, testCerts, tlsaData } from "../helpers/certs.js";
import { requirePostfix, requireTool } from "../helpers/postfix.js";
import { type Zone, world, line } from "../helpers/mx-world.js";
import { requirePort443, startPolicyServer, stsPolicy } from "../helpers/sts-server.js";
import { mxPostfix } from "../helpers/tls-world.js";
import { bounded } from "../helpers/daemon.js";
import { listFolder } from "../helpers/spool-files.js";

const DOMAINS = ["ee.test", "ta.test", "mismatch.test", "insecure.test", "absent.test", "bogus.test", "unusable.test", "plain.test", "both.test"];
const GOOD = "127.0.0.2";
const PLAIN = "127.0.0.4";
const POLICY_HOST = "127.0.0.11";
const FLUSH_MS = 30_000;

type Record = { usage: number; selector: number; mtype: number; data: string };

t.test("DANE", async (t) => {
  if (!requireTool(t, OPENSSL) || !requirePostfix(t) || !requirePort443(t)) return;
  const certs = await testCerts();
  const good = await issueCert(DOMAINS.map((d) => `mx.${d}`));
  const stranger = await issueCert(["mx.stranger.test"]);
  const first = await mxPostfix(t, { host: GOOD, cert: good, domains: DOMAINS });
  const port = first.port;
  const plainMx = await mxPostfix(t, { host: PLAIN, port, cert: null, domains: DOMAINS });
  const sts = await startPolicyServer(t, { host: POLICY_HOST, cert: await issueCert(["mta-sts.both.test"]) });
  sts.policies["both.test"] = stsPolicy("enforce", ["mx.elsewhere.test"]);

  const ee: Record = { usage: 3, selector: 1, mtype: 1, data: tlsaData(good.cert, 1, 1).toString("hex") };
  const ta: Record = { usage: 2, selector: 0, mtype: 1, data: tlsaData(certs.ca.cert, 0, 1).toString("hex") };
  const wrong: Record = { usage: 3, selector: 1, mtype: 1, data: tlsaData(stranger.cert, 1, 1).toString("hex") };
  const pkix: Record = { usage: 1, selector: 1, mtype: 1, data: ee.data };
  const zone: Zone = {};
  /** A domain, its MX host at `address`, both signed unless `secure` is false, and the host's TLSA records. */
  const add = (domain: string, address: string, tlsa: Record[] | null, o: { secure?: boolean; bogus?: boolean } = {}) => {
    const secure = o.secure ?? true;
    zone[domain] = { MX: [{ preference: 10, exchange: `mx.${domain}` }], secure };
    zone[`mx.${domain}`] = { A: [address], secure };
    if (tlsa) zone[`_${port}._tcp.mx.${domain}`] = { TLSA: tlsa, secure };
    if (o.bogus) zone[`_${port}._tcp.mx.${domain}`] = { rcode: "SERVFAIL" };
  };
  add("ee.test", GOOD, [ee]);
  add("ta.test", GOOD, [ta]);
  add("mismatch.test", GOOD, [wrong]);
  add("insecure.test", GOOD, [wrong], { secure: false });
  add("absent.test", GOOD, null);
  add("bogus.test", GOOD, null, { bogus: true });
  add("unusable.test", GOOD, [pkix]);
  add("plain.test", PLAIN, [ee]);
  add("both.test", GOOD, [ee]);
  zone["_mta-sts.both.test"] = { TXT: ["v=STSv1; id=1"] };
  zone["mta-sts.both.test"] = { A: [POLICY_HOST] };
  const options = { port, tls: "dane", tlsCa: certs.ca.certFile };

  await t.test("usable TLSA records that match: delivered, the log line says dane", async (t) => {
    const w = await world(t, zone, {}, options);
    const eeId = await w.drop(["bob@ee.test"]);
    const taId = await w.drop(["carol@ta.test"]);
    const before = (await first.readMessages()).length;
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 2, deferred: 0 }, w.lines.join("\n"));
    t.match(line(w, eeId, "bob@ee.test"), /relay=mx\.ee\.test\[127\.0\.0\.2\]:\d+, .*status=sent \(250 .*\), dane$/, "DANE-EE (3 1 1)");
    t.match(line(w, taId, "carol@ta.test"), /status=sent \(250 .*\), dane$/, "DANE-TA (2 0 1) through the chain Postfix sends");
    await first.waitForMessages(before + 2, 20_000);
    t.ok(w.dns.queries.some((q) => q.name === `_${port}._tcp.mx.ee.test` && q.type === "TLSA"), "TLSA asked for at _PORT._tcp.MX");
  });

  await t.test("a TLSA record that matches nothing: deferred, nothing sent", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@mismatch.test"]);
    const before = (await first.readMessages()).length;
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 });
    t.match(line(w, id, "bob@mismatch.test"), /status=deferred \(.*no TLSA record of mx\.mismatch\.test matches its certificate chain; TLS is required to be verified by the DANE TLSA records of mx\.mismatch\.test\), dane$/);
    t.same(await listFolder(w.maildir, "deferred"), [id], "waiting in deferred/");
    t.equal((await first.readMessages()).length, before, "nothing delivered");
    t.notMatch(w.lines.join("\n"), /goes in plaintext/, "no plaintext fallback");
  });

  await t.test("records without the AD bit are not trusted: --tls may as before", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@insecure.test"]);
    const absent = await w.drop(["carol@absent.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 2 });
    t.match(line(w, id, "bob@insecure.test"), /status=sent \([^)]*\)$/, "an unsigned zone's (wrong) record is ignored");
    t.match(line(w, absent, "carol@absent.test"), /status=sent \([^)]*\)$/, "securely absent records: no DANE");
  });

  await t.test("a bogus TLSA answer (SERVFAIL) makes the host unusable: deferred", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@bogus.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 });
    t.match(line(w, id, "bob@bogus.test"), new RegExp(`relay=none, .*dsn=4\\.7\\.5, status=deferred \\(TLS policy of bogus\\.test leaves no MX host to deliver to: mx\\.bogus\\.test: TLSA lookup error for _${port}\\._tcp\\.mx\\.bogus\\.test \\(rcode 2\\)\\)$`));
  });

  await t.test("only unusable records (PKIX-EE): TLS without authentication", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@unusable.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 });
    t.match(line(w, id, "bob@unusable.test"), /status=sent \(250 .*\), dane$/);
  });

  await t.test("TLSA records and a host without STARTTLS: deferred, never plaintext", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@plain.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 });
    t.match(line(w, id, "bob@plain.test"), /status=deferred \(.*TLS is required by the DANE TLSA records of mx\.plain\.test, but was not offered by host mx\.plain\.test\[127\.0\.0\.4\]\), dane$/);
    t.equal((await plainMx.readMessages()).length, 0, "nothing delivered in plaintext");
  });

  await t.test("DANE before MTA-STS: a host with TLSA records is not held to the policy's mx: patterns", async (t) => {
    const w = await world(t, zone, {}, options);
    const id = await w.drop(["bob@both.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 }, w.lines.join("\n"));
    t.match(line(w, id, "bob@both.test"), /status=sent \(250 .*\), dane$/);
    t.equal(sts.fetches("both.test"), 1, "the MTA-STS policy was found all the same");
    const stsOnly = await world(t, zone, {}, { port, tlsCa: certs.ca.certFile });
    const id2 = await stsOnly.drop(["carol@both.test"]);
    t.match(await bounded(stsOnly.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 }, "without --tls dane, the MTA-STS policy rules: deferred");
    t.match(line(stsOnly, id2, "carol@both.test"), /matches no mx: of the MTA-STS policy/);
  });
});
