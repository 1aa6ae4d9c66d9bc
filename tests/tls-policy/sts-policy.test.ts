// MTA-STS's pieces by themselves (tls-policy.ts): the `_mta-sts` TXT record, the policy file,
// the mx: patterns (RFC 8461 sections 3.1, 3.2, 4.1) and the cache files of .mta-sts/.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { PolicyFiles, mxMatches, parseStsPolicy, parseStsRecord } from "../../tls-policy.js";

t.test("the TXT record: v=STSv1 first, an id of 1 to 32 letters and digits, exactly one such record", async (t) => {
  t.same(parseStsRecord(["v=STSv1; id=20160831085700Z;"]), { id: "20160831085700Z" }, "the RFC's example");
  t.same(parseStsRecord(["v=spf1 -all", "v=STSv1;id=abc"]), { id: "abc" }, "other TXT records are ignored");
  t.same(parseStsRecord(["v=STSv1; id=abc; ext=1"]), { id: "abc" }, "unknown fields are ignored");
  t.equal(parseStsRecord(["v=STSv1; id=a", "v=STSv1; id=b"]), null, "two records: none");
  t.equal(parseStsRecord(["id=abc; v=STSv1"]), null, "v=STSv1 not first");
  t.equal(parseStsRecord(["v=STSv1; id=abc-def"]), null, "an id with a dash");
  t.equal(parseStsRecord(["v=STSv1; id=" + "a".repeat(33)]), null, "an id of 33 characters");
  t.equal(parseStsRecord(["v=STSv1"]), null, "no id");
  t.equal(parseStsRecord([]), null, "no record");
});

t.test("the policy file", async (t) => {
  const p = parseStsPolicy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET\r\nmax_age: 604800\r\n");
  t.match(p, { mode: "enforce", maxAge: 604800, mx: ["mail.example.com", "*.example.net"] }, "CRLF lines; mx: repeats, lower-cased");
  t.match(parseStsPolicy("version: STSv1\nmode: testing\nmx: a.example\nmax_age: 0\nfuture: yes\n"), { mode: "testing", maxAge: 0 }, "LF lines, unknown keys ignored, max_age 0");
  t.match(parseStsPolicy("version: STSv1\nmode: none\nmax_age: 86400\n"), { mode: "none", mx: [] }, "mode none needs no mx:");
  t.equal(parseStsPolicy("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n"), `version is "STSv2", not STSv1`);
  t.equal(parseStsPolicy("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n"), `mode is "strict", not enforce, testing or none`);
  t.equal(parseStsPolicy("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n"), `max_age is "31557601", not 0..31557600`);
  t.equal(parseStsPolicy("version: STSv1\nmode: enforce\nmax_age: 1\n"), "no mx: line");
  t.equal(parseStsPolicy("version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n"), `bad mx: pattern "a..example"`);
  t.match(parseStsPolicy("<html>not a policy</html>"), /^not a "key: value" line/);
});

t.test("mx: patterns: a name, or *. for exactly one more leftmost label", async (t) => {
  t.ok(mxMatches("mail.example.com", "MAIL.example.com."), "case and a trailing dot do not matter");
  t.ok(mxMatches("*.example.com", "mx1.example.com"), "one label");
  t.notOk(mxMatches("*.example.com", "a.b.example.com"), "not two labels");
  t.notOk(mxMatches("*.example.com", "example.com"), "not the domain itself");
  t.notOk(mxMatches("mail.example.com", "mail.example.com.evil.test"), "no suffix match");
  t.notOk(mxMatches("*.example.com", "mx1.example.com.evil.test"), "no wildcard suffix match");
});

t.test("the cache: one 0600 file per domain in .mta-sts/, read back; a name that is not a domain never reaches the disk", async (t) => {
  const maildir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-sts-cache-"));
  t.teardown(() => fs.rmSync(maildir, { recursive: true, force: true }));
  const store = new PolicyFiles(maildir);
  t.equal(await store.read("example.test"), null, "nothing cached yet");
  const policy = { id: "abc", fetchedAt: 1_700_000_000_000, text: "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 60\n" };
  await store.write("example.test", policy);
  t.same(await store.read("example.test"), policy, "read back");
  t.equal(fs.statSync(path.join(maildir, ".mta-sts", "example.test")).mode & 0o777, 0o600, "mode 0600");
  t.equal(fs.statSync(path.join(maildir, ".mta-sts")).mode & 0o777, 0o700, ".mta-sts/ is 0700");
  await t.rejects(store.write("../escape", policy), /not a domain name/, "../escape refused");
  t.equal(await store.read("../../etc/passwd"), null, "nor read");
  fs.writeFileSync(path.join(maildir, ".mta-sts", "broken.test"), "{not json");
  t.equal(await store.read("broken.test"), null, "a damaged file is no policy");
});
