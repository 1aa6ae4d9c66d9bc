// MTA-STS (RFC 8461) for MX delivery: the `_mta-sts` TXT record in the test DNS server, the
// policy on an HTTPS policy host (127.0.0.10:443, certificates from the test CA given as
// --tls-ca), and real Postfix MX hosts with certificates for their MX names (127.0.0.2: valid;
// 127.0.0.3: for another name; 127.0.0.4: no STARTTLS). Each mode's pass and fail path, the
// MX patterns, the cache in .mta-sts/ (one fetch per policy id, across engines), the
// background refresh, and fetches that fail (mid-body, a redirect, a bad certificate).

import fs from "node:fs";
import path from "node:path";
import t from "tap";
import { issueCert, OPENSSL, testCerts } from "../helpers/certs.js";
import { requirePostfix, requireTool } from "../helpers/postfix.js";
import { type Zone, world, line } from "../helpers/mx-world.js";
import { requirePort443, startPolicyServer, stsPolicy } from "../helpers/sts-server.js";
import { mxPostfix } from "../helpers/tls-world.js";
import { bounded, sleep } from "../helpers/daemon.js";
import { listFolder } from "../helpers/spool-files.js";

const DOMAINS = ["enforce.test", "mismatch.test", "testing.test", "nomatch.test", "wild.test", "plain.test", "cut.test", "redirect.test", "badhost.test", "refresh.test"];
const GOOD = "127.0.0.2";
const WRONG = "127.0.0.3";
const PLAIN = "127.0.0.4";
const POLICY_HOST = "127.0.0.10";
const FLUSH_MS = 30_000;

/** Each domain: one MX host at the address given, the `_mta-sts` record with this id, the policy host. */
function zoneFor(mx: Record<string, string>, id: Record<string, string>): Zone {
  const zone: Zone = {};
  for (const [domain, address] of Object.entries(mx)) {
    zone[domain] = { MX: [{ preference: 10, exchange: `mx.${domain}` }] };
    zone[`mx.${domain}`] = { A: [address] };
    zone[`mta-sts.${domain}`] = { A: [POLICY_HOST] };
    if (id[domain]) zone[`_mta-sts.${domain}`] = { TXT: [`v=STSv1; id=${id[domain]}`] };
  }
  return zone;
}

t.test("MTA-STS", async (t) => {
  if (!requireTool(t, OPENSSL) || !requirePostfix(t) || !requirePort443(t)) return;
  const certs = await testCerts();
  const good = await issueCert(DOMAINS.map((d) => `mx.${d}`));
  const wrong = await issueCert(["mx.elsewhere.test"]);
  const policyCert = await issueCert(DOMAINS.map((d) => `mta-sts.${d}`));
  const first = await mxPostfix(t, { host: GOOD, cert: good, domains: DOMAINS });
  const port = first.port;
  const wrongMx = await mxPostfix(t, { host: WRONG, port, cert: wrong, domains: DOMAINS });
  const plainMx = await mxPostfix(t, { host: PLAIN, port, cert: null, domains: DOMAINS });
  const sts = await startPolicyServer(t, { host: POLICY_HOST, cert: policyCert, certs: { "mta-sts.badhost.test": wrong } });
  const mx = {
    "enforce.test": GOOD, "mismatch.test": WRONG, "testing.test": WRONG, "nomatch.test": GOOD, "wild.test": GOOD,
    "plain.test": PLAIN, "cut.test": GOOD, "redirect.test": GOOD, "badhost.test": GOOD, "refresh.test": GOOD,
  };
  const ids: Record<string, string> = Object.fromEntries(DOMAINS.map((d) => [d, "20261203a"]));
  const zone = zoneFor(mx, ids);
  Object.assign(sts.policies, {
    "enforce.test": stsPolicy("enforce", ["mx.enforce.test"]),
    "mismatch.test": stsPolicy("enforce", ["mx.mismatch.test"]),
    "testing.test": stsPolicy("testing", ["mx.testing.test"]),
    "nomatch.test": stsPolicy("enforce", ["mx9.nomatch.test", "*.other.test"]),
    "wild.test": stsPolicy("enforce", ["*.wild.test"]),
    "plain.test": stsPolicy("enforce", ["mx.plain.test"]),
    "cut.test": { body: stsPolicy("enforce", ["mx.cut.test"]), cutAfter: 20 },
    "redirect.test": { status: 302, headers: { location: "https://elsewhere.test/policy.txt" } },
    "badhost.test": stsPolicy("enforce", ["mx.badhost.test"]),
    "refresh.test": stsPolicy("enforce", ["mx.refresh.test"], 2),
  });
  const engineOptions = { port, tlsCa: certs.ca.certFile };
  const stored = () => first.readMessages().then((m) => m.length);

  await t.test("enforce, the certificate valid for the MX name: delivered over TLS, the log line says sts=enforce", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const id = await w.drop(["bob@enforce.test"]);
    const before = await stored();
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1, deferred: 0 }, w.lines.join("\n"));
    t.match(line(w, id, "bob@enforce.test"), /relay=mx\.enforce\.test\[127\.0\.0\.2\]:\d+, .*status=sent \(250 .*\), sts=enforce$/, "sts=enforce at the end of the line");
    await first.waitForMessages(before + 1, 20_000);
    t.match(await first.log(), /Anonymous TLS connection established from/, "Postfix saw the TLS session");
    t.equal(sts.fetches("enforce.test"), 1, "the policy was fetched once");
    const cached = JSON.parse(fs.readFileSync(path.join(w.maildir, ".mta-sts", "enforce.test"), "utf8"));
    t.match(cached, { id: "20261203a", text: /mode: enforce/ }, "cached in .mta-sts/enforce.test under its id");
    t.equal(fs.statSync(path.join(w.maildir, ".mta-sts", "enforce.test")).mode & 0o777, 0o600, "the cache file is 0600");
    t.ok(w.dns.queries.some((q) => q.name === "_mta-sts.enforce.test" && q.type === "TXT"), "the TXT record was asked for");

    await t.test("the cached policy is used while its id stands, by this engine and the next one on the spool", async (t) => {
      await w.drop(["carol@enforce.test"]);
      t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 });
      await w.engine.stop();
      const again = await world(t, zone, {}, { ...engineOptions, maildir: w.maildir });
      const id2 = await w.drop(["dave@enforce.test"]);
      t.match(await bounded(again.flush(), FLUSH_MS, "flush"), { sent: 1 }, again.lines.join("\n"));
      t.match(line(again, id2, "dave@enforce.test"), /status=sent .*, sts=enforce$/, "the next engine applied the cached policy");
      t.equal(sts.fetches("enforce.test"), 1, "no second fetch: the id did not change");

      await t.test("a new id whose fetch fails mid-body: the cached policy still holds", async (t) => {
        zone["_mta-sts.enforce.test"] = { TXT: ["v=STSv1; id=20261203b"] };
        sts.policies["enforce.test"] = { body: stsPolicy("enforce", ["mx.enforce.test"]), cutAfter: 25 };
        const id3 = await w.drop(["erin@enforce.test"]);
        t.match(await bounded(again.flush(), FLUSH_MS, "flush"), { sent: 1 });
        t.equal(sts.fetches("enforce.test"), 2, "the new id was fetched");
        t.match(again.lines.join("\n"), /warning: MTA-STS: enforce\.test: policy fetch from mta-sts\.enforce\.test: /, "the failure is logged");
        t.match(line(again, id3, "erin@enforce.test"), /, sts=enforce$/, "the cached policy applied");
        t.match(JSON.parse(fs.readFileSync(path.join(w.maildir, ".mta-sts", "enforce.test"), "utf8")), { id: "20261203a" }, "the cache keeps the old policy");
        sts.policies["enforce.test"] = stsPolicy("enforce", ["mx.enforce.test"]);
        await w.drop(["frank@enforce.test"]);
        t.match(await bounded(again.flush(), FLUSH_MS, "flush"), { sent: 1 });
        t.equal(sts.fetches("enforce.test"), 3, "fetched again at the next pass");
        t.match(JSON.parse(fs.readFileSync(path.join(w.maildir, ".mta-sts", "enforce.test"), "utf8")), { id: "20261203b" }, "now cached under the new id");
      });
    });
  });

  await t.test("enforce, a certificate for another name: deferred, never sent in plaintext or elsewhere", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const id = await w.drop(["bob@mismatch.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 });
    t.match(line(w, id, "bob@mismatch.test"), /dsn=4\.\d\.\d, status=deferred \(.*certificate not valid for MX host mx\.mismatch\.test: .*; TLS is required to be verified by the MTA-STS policy of mismatch\.test\), sts=enforce$/);
    t.same(await listFolder(w.maildir, "deferred"), [id], "waiting in deferred/");
    t.equal((await wrongMx.readMessages()).length, 0, "the host with the wrong certificate got nothing");
    t.notMatch(w.lines.join("\n"), /goes in plaintext/, "no plaintext fallback under a policy");
    await w.drop(["carol@mismatch.test"]);
    await bounded(w.flush(true), FLUSH_MS, "flush");
    t.equal((await wrongMx.readMessages()).length, 0, "nor at the next attempt");
  });

  await t.test("testing: the same certificate, delivered as before, the log line says sts=testing", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const id = await w.drop(["bob@testing.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1, deferred: 0 });
    t.match(line(w, id, "bob@testing.test"), /relay=mx\.testing\.test\[127\.0\.0\.3\].*status=sent .*, sts=testing$/);
    await wrongMx.waitForMessages(1, 20_000);
  });

  await t.test("enforce: MX hosts that match no mx: pattern are not used; a wildcard matches one label", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const id = await w.drop(["bob@nomatch.test"]);
    const wild = await w.drop(["carol@wild.test"]);
    const before = await stored();
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1, deferred: 1 });
    t.match(line(w, id, "bob@nomatch.test"), /relay=none, .*dsn=4\.7\.5, status=deferred \(TLS policy of nomatch\.test leaves no MX host to deliver to: mx\.nomatch\.test matches no mx: of the MTA-STS policy \(mx9\.nomatch\.test, \*\.other\.test\)\)$/);
    t.match(line(w, wild, "carol@wild.test"), /status=sent .*, sts=enforce$/, "*.wild.test matches mx.wild.test");
    await first.waitForMessages(before + 1, 20_000);
    t.equal((await first.readMessages()).filter((m) => m.toString().includes("bob@nomatch.test")).length, 0, "nothing reached the unlisted host");
  });

  await t.test("enforce without STARTTLS: deferred", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const id = await w.drop(["bob@plain.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 0, deferred: 1 });
    t.match(line(w, id, "bob@plain.test"), /status=deferred \(.*TLS is required by the MTA-STS policy of plain\.test, but was not offered by host mx\.plain\.test\[127\.0\.0\.4\]\), sts=enforce$/);
    t.equal((await plainMx.readMessages()).length, 0, "nothing in plaintext");
  });

  await t.test("fetches that fail without a cached policy: the domain has no policy (RFC 8461 section 5)", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    const cut = await w.drop(["bob@cut.test"]);
    const redirect = await w.drop(["carol@redirect.test"]);
    const badhost = await w.drop(["dave@badhost.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 3, deferred: 0 });
    const log = w.lines.join("\n");
    t.match(log, /warning: MTA-STS: cut\.test: policy fetch from mta-sts\.cut\.test: (connection lost|aborted|socket hang up)/i, "mid-body: a fetch error");
    t.match(log, /warning: MTA-STS: redirect\.test: policy fetch from mta-sts\.redirect\.test: HTTP 302 redirect to "https:\/\/elsewhere\.test\/policy\.txt" \(not followed/, "a redirect is not followed");
    t.match(log, /warning: MTA-STS: badhost\.test: policy host mta-sts\.badhost\.test: certificate not valid/, "a policy host whose certificate is for another name");
    t.equal(sts.requests.filter((r) => r.host === "elsewhere.test").length, 0, "the redirect's target was never asked");
    for (const [id, rcpt] of [[cut, "bob@cut.test"], [redirect, "carol@redirect.test"], [badhost, "dave@badhost.test"]]) {
      t.match(line(w, id, rcpt), /status=sent \([^)]*\)$/, `${rcpt}: delivered as before, no policy on the line`);
    }
    t.notOk(fs.existsSync(path.join(w.maildir, ".mta-sts", "cut.test")), "nothing cached");
  });

  await t.test("a cached policy past half its max_age is fetched again in the background", async (t) => {
    const w = await world(t, zone, {}, engineOptions);
    await w.drop(["bob@refresh.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 });
    t.equal(sts.fetches("refresh.test"), 1, "fetched");
    await sleep(1200);
    const id = await w.drop(["carol@refresh.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 });
    t.match(line(w, id, "carol@refresh.test"), /, sts=enforce$/, "the cached policy applied meanwhile");
    const deadline = Date.now() + 5000;
    while (sts.fetches("refresh.test") < 2 && Date.now() < deadline) await sleep(50);
    t.equal(sts.fetches("refresh.test"), 2, "fetched again behind the mail");
  });

  await t.test("--no-mta-sts: no lookup, no policy", async (t) => {
    const w = await world(t, zone, {}, { ...engineOptions, mtaSts: false });
    const id = await w.drop(["bob@mismatch.test"]);
    t.match(await bounded(w.flush(), FLUSH_MS, "flush"), { sent: 1 });
    t.match(line(w, id, "bob@mismatch.test"), /status=sent \([^)]*\)$/, "delivered under --tls may, no policy on the line");
    t.notOk(w.dns.queries.some((q) => q.name.startsWith("_mta-sts.")), "no _mta-sts lookup");
  });
});
