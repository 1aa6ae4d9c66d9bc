// DANE's matching by itself (tls-policy.ts's daneCheck, RFC 7672 section 3.1, RFC 6698 section
// 2.1) on certificates from the test CA: DANE-EE(3) with each selector and matching type,
// DANE-TA(2) through the chain a server sends, and what each one checks or leaves alone.

import { X509Certificate } from "node:crypto";
import t from "tap";
import { daneCheck, parseTlsa, usableTlsa, tlsaText, type Tlsa } from "../../tls-policy.js";
import { issueCert, OPENSSL, testCerts, tlsaData } from "../helpers/certs.js";
import { requireTool } from "../helpers/postfix.js";
import { checkOptions } from "../../options.js";

const tlsaFor = (pem: string, usage: number, selector: number, mtype: number): Tlsa => ({ usage, selector, mtype, data: tlsaData(pem, selector, mtype) });

t.test("DANE matching", async (t) => {
  if (!requireTool(t, OPENSSL)) return;
  const certs = await testCerts();
  const leafPair = await issueCert(["mx.dane.test"]);
  const expiredPair = await issueCert(["mx.dane.test"], { days: -1 });
  const otherPair = await issueCert(["mx.other.test"]);
  const ca = new X509Certificate(certs.ca.cert);
  const leaf = new X509Certificate(leafPair.cert);
  const expired = new X509Certificate(expiredPair.cert);
  const other = new X509Certificate(otherPair.cert);
  const names = ["mx.dane.test", "dane.test"];

  t.test("DANE-EE(3): the leaf's certificate or key, with every selector and matching type", async (t) => {
    for (const selector of [0, 1]) {
      for (const mtype of [0, 1, 2]) {
        t.same(daneCheck([leaf], [tlsaFor(leafPair.cert, 3, selector, mtype)], names), { ok: true }, `3 ${selector} ${mtype}`);
      }
    }
    t.same(daneCheck([expired], [tlsaFor(expiredPair.cert, 3, 1, 1)], ["elsewhere.test"]), { ok: true }, "no name, date or issuer check (RFC 7672 section 3.1.1)");
    t.match(daneCheck([other], [tlsaFor(leafPair.cert, 3, 1, 1)], names), { ok: false, type: "validation-failure", reason: /no TLSA record of mx\.dane\.test matches/ }, "another key: refused");
    t.match(daneCheck([leaf, ca], [tlsaFor(certs.ca.cert, 3, 0, 1)], names), { ok: false, type: "validation-failure" }, "DANE-EE matches the leaf only, not the chain");
  });

  t.test("DANE-TA(2): a certificate of the chain sent, signing down to the leaf, whose name and dates count", async (t) => {
    const ta = tlsaFor(certs.ca.cert, 2, 0, 1);
    t.same(daneCheck([leaf, ca], [ta], names), { ok: true }, "2 0 1 on the CA the server sent");
    t.same(daneCheck([leaf, ca], [tlsaFor(certs.ca.cert, 2, 1, 2)], names), { ok: true }, "2 1 2 on the CA's key");
    t.match(daneCheck([leaf], [ta], names), { ok: false, type: "validation-failure" }, "a server that does not send the anchor: no match");
    t.match(daneCheck([other, ca], [ta], names), { ok: false, type: "certificate-host-mismatch" }, "the name is checked");
    t.same(daneCheck([other, ca], [ta], ["mx.other.test"]), { ok: true }, "its own name passes");
    t.match(daneCheck([expired, ca], [ta], names), { ok: false, type: "certificate-expired" }, "the dates are checked");
    t.match(daneCheck([otherPair.cert, leafPair.cert].map((p) => new X509Certificate(p)), [tlsaFor(leafPair.cert, 2, 0, 1)], ["mx.other.test"]), { ok: false, type: "certificate-not-trusted" }, "a chain whose anchor did not sign the leaf");
  });

  t.test("usable records: usages 2 and 3, selectors 0 and 1, matching types 0 to 2 of the right length", async (t) => {
    const good = tlsaFor(leafPair.cert, 3, 1, 1);
    t.ok(usableTlsa(good), "3 1 1");
    t.notOk(usableTlsa({ ...good, usage: 1 }), "PKIX-EE(1) is unusable for SMTP");
    t.notOk(usableTlsa({ ...good, usage: 0 }), "PKIX-TA(0) too");
    t.notOk(usableTlsa({ ...good, selector: 2 }), "selector 2");
    t.notOk(usableTlsa({ ...good, mtype: 3 }), "matching type 3");
    t.notOk(usableTlsa({ ...good, data: good.data.subarray(0, 31) }), "a SHA-256 of 31 bytes");
    t.match(daneCheck([leaf], [{ ...good, usage: 1 }], names), { ok: false, type: "tlsa-invalid" }, "only unusable records: tlsa-invalid");
    t.same(parseTlsa(Buffer.from([3, 1, 1, 0xab, 0xcd])), { usage: 3, selector: 1, mtype: 1, data: Buffer.from([0xab, 0xcd]) }, "RDATA parsed");
    t.equal(parseTlsa(Buffer.from([3, 1, 1])), null, "RDATA without data");
    t.equal(tlsaText({ usage: 3, selector: 1, mtype: 1, data: Buffer.from([0xab, 0xcd]) }), "3 1 1 ABCD", "presentation form, for reports");
  });

  t.test("--tls dane is a level of its own, for MX delivery only", async (t) => {
    t.equal(checkOptions({ tls: "dane" }).tls, "dane");
    t.throws(() => checkOptions({ tls: "dane", relay: "smtp.example.test" }), /--tls dane is for MX delivery/);
    t.throws(() => checkOptions({ tls: "bogus" as "dane" }), /--tls: expected none, may, encrypt, verify or dane/);
  });
});
