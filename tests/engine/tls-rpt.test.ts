// TLS reporting (RFC 8460): sessions under MTA-STS policies (and none) counted per domain, and
// once the report period is over (tlsRptInterval: PERIOD_S here), each domain that publishes a
// `_smtp._tls` record gets its report: by mail (delivered by the engine itself to a real Postfix,
// read back from its Maildir, unzipped) and by HTTPS POST (127.0.0.12:443). Every report is
// checked against the JSON schema of RFC 8460 section 4.4 and its counts against what happened.

import { gunzipSync } from "node:zlib";
import net from "node:net";
import t from "tap";
import { parseTlsRptRecord } from "../../tls-report.js";
import { issueCert, OPENSSL, testCerts } from "../helpers/certs.js";
import { requirePostfix, requireTool } from "../helpers/postfix.js";
import { type Zone, world, line } from "../helpers/mx-world.js";
import { requirePort443, startPolicyServer, stsPolicy } from "../helpers/sts-server.js";
import { mxPostfix } from "../helpers/tls-world.js";
import { bounded, sleep } from "../helpers/daemon.js";

/** The report period: long enough for the deliveries below to fall in one, even on a busy machine. */
const PERIOD_S = 8;
const PERIOD_MS = PERIOD_S * 1000;

const DOMAINS = ["sts.test", "bad.test", "testing.test", "cut.test", "plain.test", "norpt.test", "reports.test"];
const GOOD = "127.0.0.2";
const WRONG = "127.0.0.3";
const PLAIN = "127.0.0.4";
const WEB = "127.0.0.12";
const FLUSH_MS = 30_000;
const RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted", "validation-failure",
  "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid", "tlsa-invalid", "dnssec-invalid", "dane-required"];

/** RFC 8460 section 4.4's JSON schema, as a list of problems (none: the report conforms). */
function schemaProblems(report: Record<string, unknown>): string[] {
  const problems: string[] = [];
  const need = (ok: boolean, what: string) => { if (!ok) problems.push(what); };
  const isString = (v: unknown) => typeof v === "string" && v.length > 0;
  const isCount = (v: unknown) => Number.isInteger(v) && (v as number) >= 0;
  const isDateTime = (v: unknown) => typeof v === "string" && /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/.test(v) && !Number.isNaN(Date.parse(v));
  const only = (o: object, keys: string[], where: string) => { for (const k of Object.keys(o)) need(keys.includes(k), `${where}: unknown member ${k}`); };
  only(report, ["organization-name", "date-range", "contact-info", "report-id", "policies"], "report");
  need(isString(report["organization-name"]), "organization-name: a string");
  need(isString(report["contact-info"]), "contact-info: a string");
  need(isString(report["report-id"]), "report-id: a string");
  const range = report["date-range"] as Record<string, unknown> | undefined;
  need(typeof range === "object" && range !== null, "date-range: an object");
  if (range) {
    only(range, ["start-datetime", "end-datetime"], "date-range");
    need(isDateTime(range["start-datetime"]) && isDateTime(range["end-datetime"]), "date-range: two RFC 3339 date-times");
    need(Date.parse(String(range["start-datetime"])) <= Date.parse(String(range["end-datetime"])), "date-range: start before end");
  }
  const policies = report.policies as Array<Record<string, unknown>>;
  need(Array.isArray(policies) && policies.length > 0, "policies: a non-empty array");
  for (const [i, p] of (Array.isArray(policies) ? policies : []).entries()) {
    only(p, ["policy", "summary", "failure-details"], `policies[${i}]`);
    const policy = p.policy as Record<string, unknown>;
    only(policy, ["policy-type", "policy-string", "policy-domain", "mx-host"], `policies[${i}].policy`);
    need(["tlsa", "sts", "no-policy-found"].includes(String(policy["policy-type"])), `policies[${i}]: policy-type tlsa, sts or no-policy-found`);
    need(isString(policy["policy-domain"]), `policies[${i}]: policy-domain`);
    for (const k of ["policy-string", "mx-host"]) {
      if (k in policy) need(Array.isArray(policy[k]) && (policy[k] as unknown[]).every(isString), `policies[${i}]: ${k} an array of strings`);
    }
    const summary = p.summary as Record<string, unknown>;
    only(summary, ["total-successful-session-count", "total-failure-session-count"], `policies[${i}].summary`);
    need(isCount(summary["total-successful-session-count"]) && isCount(summary["total-failure-session-count"]), `policies[${i}]: summary counts`);
    let failed = 0;
    for (const [j, f] of ((p["failure-details"] as Array<Record<string, unknown>>) ?? []).entries()) {
      const where = `policies[${i}].failure-details[${j}]`;
      only(f, ["result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo", "receiving-ip", "failed-session-count", "additional-information", "failure-reason-code"], where);
      need(RESULT_TYPES.includes(String(f["result-type"])), `${where}: result-type`);
      need(isCount(f["failed-session-count"]), `${where}: failed-session-count`);
      for (const k of ["sending-mta-ip", "receiving-ip"]) if (k in f) need(net.isIP(String(f[k])) !== 0, `${where}: ${k} an IP address`);
      for (const k of ["receiving-mx-hostname", "receiving-mx-helo", "failure-reason-code", "additional-information"]) if (k in f) need(isString(f[k]), `${where}: ${k} a string`);
      failed += Number(f["failed-session-count"]);
    }
    need(failed <= Number(summary["total-failure-session-count"]), `policies[${i}]: failure details add up to no more than the failures`);
  }
  return problems;
}

/** The report inside a report message: its headers, and the JSON of its application/tlsrpt+gzip part. */
function reportOf(message: string): { headers: string; json: Record<string, unknown>; filename: string } {
  const headers = message.slice(0, message.search(/\r?\n\r?\n/));
  const part = /Content-Type: application\/tlsrpt\+gzip[^\n]*\nContent-Transfer-Encoding: base64\r?\nContent-Disposition: attachment; filename="([^"]+)"\r?\n\r?\n([A-Za-z0-9+/=\r\n]+)/.exec(message);
  if (!part) throw new Error(`no application/tlsrpt+gzip part in:\n${message}`);
  return { headers, filename: part[1], json: JSON.parse(gunzipSync(Buffer.from(part[2], "base64")).toString("utf8")) };
}

t.test("the _smtp._tls record", async (t) => {
  t.same(parseTlsRptRecord(["v=TLSRPTv1; rua=mailto:reports@example.com"]), ["mailto:reports@example.com"]);
  t.same(parseTlsRptRecord(["v=TLSRPTv1;rua=mailto:a@example.com, https://r.example.com/v1"]), ["mailto:a@example.com", "https://r.example.com/v1"], "mailto: and https:, comma-separated");
  t.same(parseTlsRptRecord(["v=TLSRPTv1; rua=http://insecure.example.com/, mailto:a@example.com"]), ["mailto:a@example.com"], "http: is not a reporting URI");
  t.equal(parseTlsRptRecord(["v=TLSRPTv1; rua=mailto:a@x.example", "v=TLSRPTv1; rua=mailto:b@x.example"]), null, "two records: none");
  t.equal(parseTlsRptRecord(["rua=mailto:a@x.example; v=TLSRPTv1"]), null, "v= not first");
  t.equal(parseTlsRptRecord(["v=spf1 -all"]), null, "no record");
});

t.test("TLS reports", async (t) => {
  if (!requireTool(t, OPENSSL) || !requirePostfix(t) || !requirePort443(t)) return;
  const certs = await testCerts();
  const good = await issueCert(DOMAINS.map((d) => `mx.${d}`));
  const first = await mxPostfix(t, { host: GOOD, cert: good, domains: DOMAINS });
  const port = first.port;
  await mxPostfix(t, { host: WRONG, port, cert: await issueCert(["mx.elsewhere.test"]), domains: DOMAINS });
  await mxPostfix(t, { host: PLAIN, port, cert: null, domains: DOMAINS });
  const web = await startPolicyServer(t, { host: WEB, cert: await issueCert([...DOMAINS.map((d) => `mta-sts.${d}`), "rpt.https.test"]) });
  Object.assign(web.policies, {
    "sts.test": stsPolicy("enforce", ["mx.sts.test"]),
    "bad.test": stsPolicy("enforce", ["mx.bad.test"]),
    "testing.test": stsPolicy("testing", ["mx.testing.test"]),
    "cut.test": { body: stsPolicy("enforce", ["mx.cut.test"]), cutAfter: 10 },
  });
  const mx: Record<string, string> = { "sts.test": GOOD, "bad.test": WRONG, "testing.test": WRONG, "cut.test": GOOD, "plain.test": PLAIN, "norpt.test": GOOD, "reports.test": GOOD };
  const zone: Zone = { "rpt.https.test": { A: [WEB] } };
  for (const [domain, address] of Object.entries(mx)) {
    zone[domain] = { MX: [{ preference: 10, exchange: `mx.${domain}` }] };
    zone[`mx.${domain}`] = { A: [address] };
    zone[`mta-sts.${domain}`] = { A: [WEB] };
    if (web.policies[domain]) zone[`_mta-sts.${domain}`] = { TXT: ["v=STSv1; id=1"] };
    if (domain !== "norpt.test" && domain !== "reports.test") zone[`_smtp._tls.${domain}`] = { TXT: ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"] };
  }
  zone["_smtp._tls.sts.test"] = { TXT: ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://rpt.https.test/v1/tlsrpt"] };

  const w = await world(t, zone, {}, { port, tlsCa: certs.ca.certFile, tlsRptInterval: PERIOD_S, tlsRptOrg: "Mudmail Tests", tlsRptContact: "tls-admin@talker.test" });
  // Start just after a period boundary, so the sessions below fall in one period.
  await sleep(PERIOD_MS - (Date.now() % PERIOD_MS) + 50);
  const started = Date.now();
  const ids: Record<string, string> = {};
  for (const rcpt of ["a@sts.test", "b@sts.test", "c@bad.test", "d@testing.test", "e@cut.test", "f@plain.test", "g@norpt.test"]) ids[rcpt] = await w.drop([rcpt]);
  const s = await bounded(w.flush(), FLUSH_MS, "flush");
  t.match(s, { sent: 6, deferred: 1 }, w.lines.join("\n"));
  t.ok(Date.now() - started < PERIOD_MS, `the deliveries took ${Date.now() - started} ms: one period`);
  t.match(line(w, ids["c@bad.test"], "c@bad.test"), /status=deferred .*, sts=enforce$/);

  // The period is over: the next pass sends the reports, and delivers the mailed ones to reports.test.
  await sleep(PERIOD_MS - (Date.now() % PERIOD_MS) + 50);
  const before = (await first.readMessages()).length;
  await bounded(w.flush(), FLUSH_MS, "flush");
  const delivered = await first.waitForMessages(before + 5, 20_000);
  const mails = delivered.map((m) => m.toString("utf8")).filter((m) => /^TLS-Report-Domain: /m.test(m));
  const byDomain = new Map(mails.map((m) => [/^TLS-Report-Domain: (\S+)/m.exec(m)![1], reportOf(m)]));
  t.same([...byDomain.keys()].sort(), ["bad.test", "cut.test", "plain.test", "sts.test", "testing.test"], "one report mail for each domain with a TLSRPT record (none for norpt.test)");
  t.match(w.lines.join("\n"), /TLS report for sts\.test to <tlsrpt@reports\.test>: \d+\.\d+/, "queued through the engine, logged");

  for (const [domain, r] of byDomain) {
    t.same(schemaProblems(r.json), [], `${domain}: the report follows RFC 8460 section 4.4`);
    t.match(r.headers, new RegExp(`^Subject: Report Domain: ${domain.replace(".", "\\.")} Submitter: talker\\.test Report-ID: <[^>]+>$`, "m"), `${domain}: the subject of section 5.3`);
    t.match(r.headers, /^TLS-Report-Submitter: talker\.test$/m, `${domain}: TLS-Report-Submitter`);
    t.match(r.headers, /^Content-Type: multipart\/report; report-type="tlsrpt"; boundary=/m, `${domain}: multipart/report; report-type="tlsrpt"`);
    t.match(r.headers, /^Return-Path: <>$/m, `${domain}: from the null sender`);
    t.match(r.filename, new RegExp(`^talker\\.test!${domain.replace(".", "\\.")}!\\d+!\\d+\\.json\\.gz$`), `${domain}: the file name of section 5.3`);
    t.match(r.json, { "organization-name": "Mudmail Tests", "contact-info": "tls-admin@talker.test" }, `${domain}: --tls-rpt-org and --tls-rpt-contact`);
    const range = r.json["date-range"] as Record<string, string>;
    t.ok(Date.parse(range["start-datetime"]) <= started && started < Date.parse(range["end-datetime"]) + 1000, `${domain}: the period covers the sessions`);
  }
  type Entry = { policy: Record<string, unknown>; summary: Record<string, number>; "failure-details"?: Array<Record<string, unknown>> };
  const policies = (d: string) => byDomain.get(d)!.json.policies as Entry[];
  t.match(policies("sts.test"), [{ policy: { "policy-type": "sts", "policy-domain": "sts.test", "mx-host": ["mx.sts.test"], "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.sts.test", "max_age: 86400"] },
    summary: { "total-failure-session-count": 0 } }], "sts.test: TLS verified, no failure");
  const stsSessions = policies("sts.test")[0].summary["total-successful-session-count"];
  t.ok(stsSessions >= 1 && stsSessions <= 2, `sts.test: its sessions (${stsSessions}, for two messages) counted as successful`);
  t.match(policies("bad.test"), [{ policy: { "policy-type": "sts" }, summary: { "total-successful-session-count": 0 },
    "failure-details": [{ "result-type": "certificate-host-mismatch", "receiving-mx-hostname": "mx.bad.test", "receiving-ip": WRONG, "sending-mta-ip": /^127\./ }] }], "bad.test: the certificate for another name");
  t.ok(policies("bad.test")[0].summary["total-failure-session-count"] >= 1, "bad.test: failures counted");
  t.match(policies("testing.test"), [{ policy: { "policy-string": ["version: STSv1", "mode: testing", "mx: mx.testing.test", "max_age: 86400"] },
    summary: { "total-successful-session-count": 0, "total-failure-session-count": 1 }, "failure-details": [{ "result-type": "certificate-host-mismatch", "failed-session-count": 1 }] }], "testing.test: delivered, and the failure reported");
  const cut = policies("cut.test");
  t.ok(cut.some((p) => p.policy["policy-type"] === "sts" && p["failure-details"]?.[0]?.["result-type"] === "sts-policy-fetch-error"), "cut.test: sts-policy-fetch-error");
  t.ok(cut.some((p) => p.policy["policy-type"] === "no-policy-found" && p.summary["total-successful-session-count"] === 1), "cut.test: then a session without a policy, TLS done");
  t.match(policies("plain.test"), [{ policy: { "policy-type": "no-policy-found" }, summary: { "total-successful-session-count": 0, "total-failure-session-count": 1 },
    "failure-details": [{ "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.plain.test" }] }], "plain.test: STARTTLS not offered");

  // The https: address of sts.test got the same report as a POST.
  const deadline = Date.now() + 10_000;
  while (!web.requests.some((r) => r.method === "POST") && Date.now() < deadline) await sleep(50);
  const post = web.requests.find((r) => r.method === "POST");
  t.ok(post, "a POST to the https: address");
  if (post) {
    t.match(post, { host: "rpt.https.test", path: "/v1/tlsrpt", headers: { "content-type": "application/tlsrpt+gzip" } });
    const json = JSON.parse(gunzipSync(post.body).toString("utf8"));
    t.same(schemaProblems(json), [], "the posted report follows RFC 8460 section 4.4");
    t.same(json, byDomain.get("sts.test")!.json, "the same report as the mailed one");
    t.match(w.lines.join("\n"), /TLS report for sts\.test posted to https:\/\/rpt\.https\.test\/v1\/tlsrpt: HTTP 200/, "the POST is logged");
  }
});
