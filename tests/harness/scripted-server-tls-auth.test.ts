// The scripted server's STARTTLS, implicit TLS and AUTH, checked with the raw client of
// tests/helpers/smtp-raw.ts, so that the engine's TLS and AUTH tests can trust it.

import t from "tap";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { OPENSSL, testCerts } from "../helpers/certs.js";
import { requireTool } from "../helpers/postfix.js";
import { RawClient } from "../helpers/smtp-raw.js";
import { b64 } from "../helpers/security-rig.js";

t.test("the scripted server's TLS and AUTH", async (t) => {
  if (!requireTool(t, OPENSSL)) return;
  const certs = await testCerts();
  const serverTls = { key: certs.server.key, cert: certs.server.cert };

  /* 0 ---------------------------------------------------------------------------------- */
  t.test("the scripted server's TLS and AUTH, checked with a raw client (so the tests below can trust it)", async (t) => {
    const USER = "dave@test.example";
    const PASS = "raw-client-secret";
    const TOKEN = "raw-client-token";
    const server = await startScriptedServer({
      tls: serverTls,
      afterStartTls220: "250 injected\r\n",
      auth: { mechanisms: ["PLAIN", "LOGIN", "XOAUTH2"], users: { [USER]: PASS }, tokens: { [USER]: TOKEN }, required: true },
    });
    t.teardown(() => server.close());
    const c = await RawClient.connect(server.port);
    t.teardown(() => c.destroy());
    t.match((await c.reply())[0], /^220 /, "greeting");
    const ehlo = await c.command("EHLO raw.test");
    t.ok(ehlo.includes("250-STARTTLS"), "STARTTLS advertised in plaintext");
    t.ok(ehlo.some((l) => /^250[- ]AUTH PLAIN LOGIN XOAUTH2$/.test(l)), "AUTH advertised");
    t.match((await c.command("MAIL FROM:<a@test.example>"))[0], /^530 5\.7\.0/, "required: no MAIL before AUTH");
    c.write("STARTTLS\r\n");
    t.match((await c.reply())[0], /^220 /, "220 to STARTTLS");
    t.equal(c.pending(), "250 injected\r\n", "afterStartTls220 came right behind it");
    await c.upgrade();
    const session = server.sessions[0];
    t.equal(session.tls, true, "the session is encrypted");
    t.equal(session.helo, null, "the greeting is forgotten");
    t.match((await c.command("MAIL FROM:<a@test.example>"))[0], /^503 /, "no MAIL before a new EHLO");
    const ehlo2 = await c.command("EHLO raw.test");
    t.notOk(ehlo2.some((l) => /STARTTLS/.test(l)), "no STARTTLS over TLS");
    t.match(await c.command("AUTH PLAIN"), ["334 "], "AUTH PLAIN without an initial response: an empty challenge");
    t.match((await c.command(b64(`\0${USER}\0${PASS}`)))[0], /^235 2\.7\.0/, "235 for the right password");
    t.match(session.authAttempts, [{ mechanism: "PLAIN", user: USER, password: PASS, ok: true, tls: true }], "the attempt is recorded");
    t.match((await c.command("MAIL FROM:<a@test.example>"))[0], /^250 /, "MAIL after AUTH");
    t.same(session.plaintextCommands, ["EHLO raw.test", "MAIL FROM:<a@test.example>", "STARTTLS"], "plaintextCommands");
    c.destroy();

    const d = await RawClient.connect(server.port);
    t.teardown(() => d.destroy());
    await d.reply();
    await d.command("EHLO raw.test");
    t.match(await d.command("AUTH LOGIN"), [`334 ${b64("Username:")}`], "LOGIN asks for the user");
    t.match(await d.command(b64(USER)), [`334 ${b64("Password:")}`], "then the password");
    t.match((await d.command(b64("wrong")))[0], /^535 5\.7\.8/, "535 5.7.8 for a wrong one");
    const x = await d.command(`AUTH XOAUTH2 ${b64(`user=${USER}\x01auth=Bearer bad-token\x01\x01`)}`);
    t.match(x[0], /^334 \S+/, "XOAUTH2 with a bad token: an error challenge");
    t.match((await d.command(""))[0], /^535 5\.7\.8/, "then 535");
    t.match((await d.command(`AUTH XOAUTH2 ${b64(`user=${USER}\x01auth=Bearer ${TOKEN}\x01\x01`)}`))[0], /^235 /, "XOAUTH2 with the token: 235");
    const s2 = server.sessions[1];
    t.match(s2.authAttempts, [
      { mechanism: "LOGIN", user: USER, password: "wrong", ok: false, tls: false },
      { mechanism: "XOAUTH2", user: USER, token: "bad-token", ok: false },
      { mechanism: "XOAUTH2", user: USER, token: TOKEN, ok: true },
    ], "every attempt recorded, decoded");
    d.destroy();

    const e = await RawClient.connect(server.port);
    t.teardown(() => e.destroy());
    await e.reply();
    await e.command("EHLO raw.test");
    t.match(await e.command("AUTH PLAIN"), ["334 "], "a challenge");
    t.match((await e.command("*"))[0], /^501 /, "* cancels the exchange");
    e.write("STARTTLS\r\nEHLO smuggled.test\r\n");
    t.match((await e.reply())[0], /^220 /, "220");
    await e.upgrade();
    await server.waitFor(() => server.sessions[2].plaintextAfterStartTls.length > 0 || server.sessions[2].tls, 2000, "upgrade");
    t.equal(server.sessions[2].plaintextAfterStartTls.toString(), "EHLO smuggled.test\r\n", "client bytes pipelined behind STARTTLS are kept aside, unread");
    t.notOk(server.sessions[2].commands.includes("EHLO smuggled.test"), "and never taken as a command");
    t.ok(server.sessions[2].pipeliningViolations.includes("STARTTLS"), "and count as a pipelining violation");
    e.destroy();

    const wrapped = await startScriptedServer({ tls: serverTls, implicitTls: true });
    t.teardown(() => wrapped.close());
    const f = await RawClient.connect(wrapped.port, "127.0.0.1", { implicitTls: true });
    t.teardown(() => f.destroy());
    t.match((await f.reply())[0], /^220 /, "implicit TLS: the greeting comes over TLS");
    t.notOk((await f.command("EHLO raw.test")).some((l) => /STARTTLS/.test(l)), "no STARTTLS offered");
    t.equal(wrapped.sessions[0].tls, true, "the session is TLS from the start");
    t.equal(wrapped.sessions[0].plaintextCommands.length, 0, "nothing in plaintext");
    f.destroy();
  });
});
