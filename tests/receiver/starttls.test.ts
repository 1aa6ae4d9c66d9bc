// STARTTLS in the receiver: offered with a certificate (tests/helpers/certs.ts), pipelined
// plaintext discarded, state reset, ESMTPS; a client that never starts the handshake.

import t from "tap";
import { OPENSSL, testCerts } from "../helpers/certs.js";
import { requireTool } from "../helpers/postfix.js";
import { HOST, USER, sleep, setup, splitMbox, readLatin1, queuedAs } from "../helpers/receiver-rig.js";

/* ------------------------------------------------------------------------------------ */
/* STARTTLS                                                                              */

t.test("STARTTLS: offered with a cert, pipelined plaintext discarded, state reset, ESMTPS", async (t) => {
  if (!requireTool(t, OPENSSL)) return;
  const { certFile: cert, keyFile: key } = (await testCerts()).server;
  const s = await setup(t, { tlsCert: cert, tlsKey: key });
  const c = await s.connect();
  t.equal(await c.cmd("EHLO client.test"), `250-${HOST}\n250-SIZE 10485760\n250-PIPELINING\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250-DSN\n250-STARTTLS\n250 HELP`);
  t.match(await c.cmd("HELP"), /Commands: .* STARTTLS\n/);
  t.equal(await c.cmd("STARTTLS now"), "501 5.5.4 Syntax: STARTTLS");
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd("STARTTLS"), "503 5.5.1 Error: MAIL transaction in progress");
  t.equal(await c.cmd("RSET"), "250 2.0.0 Ok");
  // A man in the middle adds commands behind STARTTLS: they must not run inside the TLS session.
  c.write(`STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<${USER}>\r\n`);
  t.equal(await c.text(), "220 2.0.0 Ready to start TLS");
  await sleep(100);
  t.equal(c.queued, 0, "no reply to the pipelined plaintext");
  const secure = await c.upgrade();
  t.ok(secure.encrypted, "TLS is up");
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "503 5.5.1 Error: send HELO/EHLO first", "the session starts over (RFC 3207)");
  t.equal(await c.cmd("EHLO client.test"), `250-${HOST}\n250-SIZE 10485760\n250-PIPELINING\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250-DSN\n250 HELP`, "no STARTTLS inside TLS");
  t.equal(await c.cmd("STARTTLS"), "503 5.5.1 Error: TLS already active");
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd(`RCPT TO:<${USER}>`), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: secret\r\n\r\nover TLS\r\n.\r\nQUIT\r\n");
  t.match(await c.text(), queuedAs);
  t.match(await c.text(), /^221 /);
  await c.waitClosed();
  const mbox = await readLatin1(s.mbox());
  t.match(mbox, /with ESMTPS id /, "Received: says ESMTPS");
  t.equal(splitMbox(mbox).length, 1);
  await s.waitForLine(/starttls: dropped \d+ octets the client sent behind STARTTLS/);
  await s.waitForLine(/starttls: TLSv1\.[23] /);
  t.notOk(s.lines.some((l) => /ehlo evil\.test|evil@x\.test/.test(l)), "the pipelined commands never ran");
});

t.test("STARTTLS: a client that never starts the handshake is cut off by the timeout", async (t) => {
  if (!requireTool(t, OPENSSL)) return;
  const { certFile: cert, keyFile: key } = (await testCerts()).server;
  const s = await setup(t, { tlsCert: cert, tlsKey: key, commandTimeout: 0.3 });
  const c = await s.connect();
  t.equal(await c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
  await c.waitClosed(3000);
  await s.waitForLine(/no TLS handshake/);
});
