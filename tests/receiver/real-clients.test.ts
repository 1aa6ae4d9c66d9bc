// Real clients against the receiver: Postfix's smtp-source (5 sessions, 50 messages) and swaks
// (--pipeline, --tls).

import t from "tap";
import { OPENSSL, testCerts } from "../helpers/certs.js";
import { run } from "../helpers/daemon.js";
import { requireTool, SMTP_SOURCE } from "../helpers/postfix.js";
import { SWAKS, USER, setup, splitMbox, readLatin1 } from "../helpers/receiver-rig.js";

/* ------------------------------------------------------------------------------------ */
/* Real clients                                                                          */

t.test("Postfix's smtp-source: 5 sessions, 50 messages, all in the mbox", async (t) => {
  if (!requireTool(t, SMTP_SOURCE)) return;
  const s = await setup(t);
  const r = await run(SMTP_SOURCE, ["-s", "5", "-m", "50", "-f", "a@x.test", "-t", USER, `127.0.0.1:${s.server.address.port}`], { timeoutMs: 60_000 });
  t.equal(r.code, 0, `smtp-source exits 0 ${r.stderr}`);
  const messages = splitMbox(await readLatin1(s.mbox()));
  t.equal(messages.length, 50, "50 messages in the mbox");
  t.ok(messages.every((m) => m.startsWith("From a@x.test ") && /\nReturn-Path: <a@x\.test>\n/.test(m)), "each with its From_ line and Return-Path");
  t.equal(s.messages.length, 50, "50 message events");
  t.same(await s.tmpFiles(), []);
});

function swaksHasTls(): Promise<boolean> {
  return run(SWAKS, ["--support"], { timeoutMs: 10_000 }).then((r) => /TLS supported/.test(r.stdout + r.stderr));
}

t.test("swaks: --pipeline, and --tls", async (t) => {
  if (!requireTool(t, [SWAKS, OPENSSL])) return;
  const { certFile: cert, keyFile: key } = (await testCerts()).server;
  const s = await setup(t, { tlsCert: cert, tlsKey: key });
  const server = `127.0.0.1:${s.server.address.port}`;
  const plain = await run(SWAKS, ["--server", server, "--to", USER, "--from", "a@x.test", "--pipeline"], { timeoutMs: 60_000 });
  t.equal(plain.code, 0, "swaks --pipeline exits 0");
  plain.stdout += plain.stderr;
  t.match(plain.stdout, /<-  250 2\.0\.0 Ok: queued as [0-9A-F]{12}/);
  t.match(plain.stdout, / -> MAIL FROM:<a@x\.test>\n -> RCPT TO:<user@local\.test>\n -> DATA\n/, "MAIL, RCPT and DATA went in one group");
  const refused = await run(SWAKS, ["--server", server, "--to", "someone@relay.example", "--from", "a@x.test", "--pipeline"], { timeoutMs: 60_000 });
  t.not(refused.code, 0, "a relay attempt fails");
  refused.stdout += refused.stderr;
  t.match(refused.stdout, /550 5\.1\.1 <someone@relay\.example>: Recipient address rejected: User unknown/);
  if (!(await swaksHasTls())) {
    const what = "swaks has no TLS support: it needs the Debian package libnet-ssleay-perl (scripts/pretest.sh)";
    if (process.env.CI) t.fail(what);
    else t.comment(`skipped --tls: ${what}`);
  } else {
    const secure = await run(SWAKS, ["--server", server, "--to", USER, "--from", "a@x.test", "--tls", "--pipeline"], { timeoutMs: 60_000 });
    t.equal(secure.code, 0, "swaks --tls exits 0");
    secure.stdout += secure.stderr;
    t.match(secure.stdout, /<~  250 2\.0\.0 Ok: queued as [0-9A-F]{12}/, "queued inside TLS");
  }
  const messages = splitMbox(await readLatin1(s.mbox()));
  const tlsRan = await swaksHasTls();
  t.equal(messages.length, tlsRan ? 2 : 1);
  if (tlsRan) t.match(messages[1], /with ESMTPS id/);
});
