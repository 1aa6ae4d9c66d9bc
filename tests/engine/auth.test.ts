// AUTH to the relay: PLAIN, LOGIN and XOAUTH2 over STARTTLS, never in plaintext unless --tls none,
// no secret in any log line or error; 535 ends the run once with the queue kept; a real Postfix
// with Cyrus SASL (sasldb), AUTH only over TLS, relaying only for authenticated clients.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import t from "tap";
import { type MailOptions } from "../../mail.js";
import { startScriptedServer, type Script } from "../helpers/scripted-server.js";
import { OPENSSL, testCerts } from "../helpers/certs.js";
import { requirePostfix, requireTool } from "../helpers/postfix.js";
import { MAIL_JS, runCli, testNumber } from "../helpers/spool-files.js";
import { SASLPASSWD2, STAGE_S, FLUSH_MS, rig, message, TRANSACTION, smtpLines, secretForms, assertNoSecrets, postfixSecurityCf, postfixWith, postfixEngine } from "../helpers/security-rig.js";
import { bounded, newQueueId } from "../helpers/engine-rig.js";
import { checkOptions } from "../../options.js";

t.test("AUTH", async (t) => {
  if (!requireTool(t, OPENSSL)) return;
  const certs = await testCerts();
  const serverTls = { key: certs.server.key, cert: certs.server.cert };

  /* 7 + 9 ------------------------------------------------------------------------------ */
  t.test("AUTH to the relay: PLAIN, LOGIN, XOAUTH2 over STARTTLS; never in plaintext unless tls none; no secret anywhere", async (t) => {
    const USER = "alice@test.example";
    const PASS = "Tr0ub4dor&3-horse battery";
    const TOKEN = "ya29.a0-TEST-bearer-token-0123456789";
    const forms = secretForms(USER, PASS, TOKEN);
    const authScript = (mechanisms: string[]): Script => ({
      tls: serverTls,
      auth: { mechanisms, users: { [USER]: PASS }, tokens: { [USER]: TOKEN }, required: true },
    });
    const secure: MailOptions = { tls: "encrypt", tlsCa: certs.ca.certFile, auth: `${USER}:${PASS}` };

    for (const [mechanism, offered, extra] of [
      ["PLAIN", ["PLAIN"], {}],
      ["LOGIN", ["LOGIN"], {}],
      ["XOAUTH2", ["XOAUTH2", "PLAIN", "LOGIN"], { xoauth2Token: TOKEN }],
    ] as Array<[string, string[], MailOptions]>) {
      await t.test(`AUTH ${mechanism}`, async (t) => {
        const r = await rig(t, authScript(offered), { engine: { ...secure, ...extra } });
        r.drop(message(60));
        r.drop(message(61));
        t.match(await r.flush(), { sent: 2, deferred: 0, bounced: 0 }, "both sent");
        t.equal(r.server.messages.length, 2, "two messages");
        t.ok(r.server.messages.every((m) => m.tls), "over TLS");
        const attempts = r.server.sessions.flatMap((x) => x.authAttempts);
        t.ok(attempts.length >= 1, "AUTH was used");
        for (const a of attempts) {
          t.match(a, { mechanism, user: USER, ok: true, tls: true }, `${mechanism} as ${USER} over TLS`);
          if (mechanism === "XOAUTH2") t.equal(a.token, TOKEN, "the server got the token");
          else t.equal(a.password, PASS, "the server got the password");
        }
        for (const session of r.server.sessions) {
          t.same(session.plaintextCommands, ["EHLO client.test", "STARTTLS"], `session ${session.id}: nothing else in plaintext`);
        }
        assertNoSecrets(t, r.texts(), forms, `AUTH ${mechanism}`);
      });
    }

    await t.test("a server that refuses the initial response (501): a failure for the run, no secret anywhere", async (t) => {
      // The engine always sends PLAIN's initial response (RFC 4954 servers must take it); the
      // empty-challenge form of the scripted server is checked with the raw client above.
      const r = await rig(t, {
        ...authScript(["PLAIN"]),
        onCommand: (line) => (/^AUTH PLAIN \S/i.test(line) ? "501 5.5.4 Initial response not allowed" : undefined),
      }, { engine: secure });
      const id = r.drop(message(62));
      const s = await r.flush();
      t.match(s, { sent: 0, bounced: 0, deferred: 1 }, "counted deferred, never bounced");
      t.same(r.files("outgoing"), [id], "kept in outgoing/");
      t.equal(r.errors.filter((e) => e.code === "EAUTH").length, 1, "one EAUTH error");
      assertNoSecrets(t, r.texts(), forms, "AUTH PLAIN, refused initial response");
      for (const session of r.server.sessions) t.same(session.plaintextCommands, ["EHLO client.test", "STARTTLS"], "nothing else in plaintext");
    });

    await t.test("no TLS offered, tls may: AUTH is not sent in plaintext", async (t) => {
      const r = await rig(t, { auth: { mechanisms: ["PLAIN", "LOGIN"], users: { [USER]: PASS } } }, { engine: { tls: "may", auth: `${USER}:${PASS}` } });
      const id = r.drop(message(63));
      const s = await r.flush();
      t.match(s, { sent: 0, deferred: 1, bounced: 0 }, "deferred");
      t.same(r.files("deferred"), [id], "in deferred/");
      t.same(r.server.sessions.flatMap((x) => x.commands).filter((c) => TRANSACTION.test(c)), [], "no AUTH, no MAIL reached the server");
      t.same(r.server.sessions.flatMap((x) => x.authAttempts), [], "no credentials reached the server");
      t.match(smtpLines(r.lines, "deferred").join("\n"), /not encrypted|TLS/i, "the log says why");
      assertNoSecrets(t, r.texts(), forms, "AUTH refused in plaintext");
    });

    await t.test("no TLS offered, tls left to its default (verify with auth): deferred, no AUTH", async (t) => {
      const r = await rig(t, { auth: { mechanisms: ["PLAIN", "LOGIN"], users: { [USER]: PASS } } }, { engine: { auth: `${USER}:${PASS}` } });
      t.equal(checkOptions({ relay: "127.0.0.1:25", auth: `${USER}:${PASS}` }).tls, "verify", "auth makes verify the default");
      r.drop(message(64));
      t.match(await r.flush(), { sent: 0, deferred: 1 }, "deferred");
      t.same(r.server.sessions.flatMap((x) => x.authAttempts), [], "no credentials reached the server");
      t.match(smtpLines(r.lines, "deferred").join("\n"), /TLS is required, but was not offered/, "the log says why");
      assertNoSecrets(t, r.texts(), forms, "default verify without TLS");
    });

    await t.test("tls none: AUTH in plaintext when asked for explicitly", async (t) => {
      const r = await rig(t, { auth: { mechanisms: ["PLAIN", "LOGIN"], users: { [USER]: PASS }, required: true } }, { engine: { tls: "none", auth: `${USER}:${PASS}` } });
      r.drop(message(65));
      t.match(await r.flush(), { sent: 1, deferred: 0 }, "sent");
      const attempts = r.server.sessions.flatMap((x) => x.authAttempts);
      t.equal(attempts.length, 1, "one AUTH");
      t.match(attempts[0], { user: USER, password: PASS, ok: true, tls: false }, "in plaintext, as asked");
      assertNoSecrets(t, r.texts(), forms, "AUTH with tls none");
    });

    await t.test("the command line: MUDMAIL_AUTH, a warning for --auth, --auth without --relay", async (t) => {
      if (!fs.existsSync(MAIL_JS)) {
        t.fail(`${MAIL_JS} is missing: run node build.mjs first`);
        return;
      }
      const server = await startScriptedServer({ auth: { mechanisms: ["PLAIN", "LOGIN"], users: { [USER]: PASS }, required: true } });
      t.teardown(() => server.close());
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-security-cli-"));
      t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
      const maildir = path.join(dir, "maildir");
      fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
      const drop = (n: number) => {
        const id = newQueueId();
        fs.writeFileSync(path.join(dir, id), message(n));
        fs.renameSync(path.join(dir, id), path.join(maildir, "outgoing", id));
      };
      const common = ["--flush", "--maildir", maildir, "--relay", `127.0.0.1:${server.port}`, "--tls", "none", "--helo", "client.test",
        "--connect-timeout", String(STAGE_S), "--helo-timeout", String(STAGE_S)];
      const env = { MUDMAIL_AUTH: "", MUDMAIL_XOAUTH2: "" };

      drop(66);
      const viaEnv = await runCli(common, { env: { ...env, MUDMAIL_AUTH: `${USER}:${PASS}` }, timeoutMs: 30_000 });
      t.equal(viaEnv.code, 0, `MUDMAIL_AUTH: exit 0 (stderr: ${viaEnv.stderr})`);
      t.match(viaEnv.stdout, /1 sent/, "the summary counts it sent");
      t.match(server.sessions.flatMap((x) => x.authAttempts), [{ user: USER, password: PASS, ok: true }], "the server got the credentials from MUDMAIL_AUTH");
      t.notMatch(viaEnv.stderr, /process table/, "no process-table warning when the credentials come from MUDMAIL_AUTH");
      assertNoSecrets(t, [viaEnv.stdout, viaEnv.stderr], forms, "CLI with MUDMAIL_AUTH");

      drop(67);
      const viaFlag = await runCli([...common, "--auth", `${USER}:${PASS}`], { env, timeoutMs: 30_000 });
      t.equal(viaFlag.code, 0, `--auth: exit 0 (stderr: ${viaFlag.stderr})`);
      t.match(viaFlag.stdout, /1 sent/, "sent");
      t.match(viaFlag.stderr, /warning: --auth shows the password in the process table; prefer MUDMAIL_AUTH/, "warns that the process table shows --auth");
      t.equal(server.messages.length, 2, "two messages arrived");
      assertNoSecrets(t, [viaFlag.stdout, viaFlag.stderr], forms.filter(([what]) => what !== "the password"), "CLI with --auth");
      t.notOk(viaFlag.stderr.includes(PASS) || viaFlag.stdout.includes(PASS), "the password itself is not echoed either");

      const noRelay = await runCli(["--flush", "--maildir", maildir, "--auth", `${USER}:${PASS}`], { env, timeoutMs: 30_000 });
      t.equal(noRelay.code, 2, "--auth without --relay exits 2");
      const errorLines = noRelay.stderr.split("\n").filter((l) => l.trim() !== "" && !/warning: --auth shows/.test(l));
      t.equal(errorLines.length, 1, `one line of error (stderr: ${JSON.stringify(noRelay.stderr)})`);
      t.match(errorLines[0] ?? "", /--auth.*--relay/, "it names --auth and --relay");
      t.notOk(noRelay.stderr.includes(PASS), "no password in the message");
    });
  });

  /* 8 + 9 ------------------------------------------------------------------------------ */
  t.test("535: a wrong password ends the run once, clearly, with the queue kept", async (t) => {
    const USER = "bob@test.example";
    const WRONG = "not-the-right-Passw0rd";
    const r = await rig(t, { tls: serverTls, auth: { mechanisms: ["PLAIN", "LOGIN"], users: { [USER]: "the-right-one" }, required: true } },
      { engine: { tls: "encrypt", tlsCa: certs.ca.certFile, auth: `${USER}:${WRONG}`, maxConnections: 5 } });
    const ids = Array.from({ length: 6 }, (_, i) => r.drop(message(70 + i))).sort();
    const started = Date.now();
    const s = await r.flush();
    const ms = Date.now() - started;
    t.ok(ms < 5000, `the flush ends promptly (${ms} ms)`);
    t.match(s, { sent: 0, bounced: 0, deferred: ids.length }, "the summary counts every message as deferred");
    const errorLines = r.lines.filter((l) => /error: SASL authentication failed/.test(l));
    t.equal(errorLines.length, 1, `one error line (${errorLines.join(" | ")})`);
    t.match(errorLines[0] ?? "", /535 5\.7\.8/, "it carries the server's 535");
    const eauth = r.errors.filter((e) => e.code === "EAUTH");
    t.equal(eauth.length, 1, "one error event with code EAUTH");
    t.same(r.files("outgoing"), ids, "every message still queued in outgoing/");
    t.same(r.files("deferred"), [], "none deferred/");
    t.same(r.files("outgoing_active"), [], "none left active");
    t.same(r.files("corrupt"), [], "none corrupt");
    t.equal(r.outcomes.filter((o) => o.status === "bounced").length, 0, "no bounce");
    t.equal(r.server.messages.length, 0, "nothing delivered");
    t.ok(r.server.connections <= 2, `not one connection per message (${r.server.connections} connections)`);
    t.equal(r.server.sessions.flatMap((x) => x.authAttempts).length, r.server.connections, "one AUTH attempt per connection");
    assertNoSecrets(t, r.texts(), secretForms(USER, WRONG), "535");
  });

  t.test("a real Postfix with Cyrus SASL (sasldb), AUTH only over TLS, relaying only for authenticated clients", async (t) => {
    if (!requirePostfix(t)) return;
    if (!requireTool(t, SASLPASSWD2)) return;
    const USER = "carol";
    const PASS = "Cyrus-SASL-pa55word";
    const forms = secretForms(USER, PASS);
    for (const mechanism of ["PLAIN", "LOGIN"]) {
      await t.test(`AUTH ${mechanism}`, async (t) => {
        const pf = await postfixWith(t, await postfixSecurityCf(certs, { mechanisms: [mechanism], users: { [USER]: PASS } }));
        const ok = postfixEngine(t, pf, { tls: "verify", tlsCa: certs.ca.certFile, auth: `${USER}:${PASS}` });
        ok.drop(510);
        const s = await bounded(ok.engine.flush(), FLUSH_MS, "flush");
        t.match(s, { sent: 1, deferred: 0, bounced: 0 }, `sent (${ok.lines.join(" | ")})`);
        const stored = await pf.waitForMessages(1, 20_000);
        t.ok(stored.some((m) => testNumber(m) === 510), "arrived");
        const log = await pf.log();
        t.match(log, new RegExp(`sasl_method=${mechanism}, sasl_username=${USER}@test\\.example`), `Postfix logged the ${mechanism} login`);
        t.match(log, /TLS connection established from/, "over TLS");
        assertNoSecrets(t, [...ok.lines, ...ok.errors.map((e) => `${e.message} ${JSON.stringify(e.details)}`)], forms, `Postfix AUTH ${mechanism}`);

        const wrong = postfixEngine(t, pf, { tls: "verify", tlsCa: certs.ca.certFile, auth: `${USER}:wrong-${PASS}` });
        wrong.drop(511);
        wrong.drop(512);
        const w = await bounded(wrong.engine.flush(), FLUSH_MS, "flush with a wrong password");
        t.match(w, { sent: 0, bounced: 0, deferred: 2 }, "wrong password: both counted deferred");
        t.equal(wrong.lines.filter((l) => /error: SASL authentication failed/.test(l)).length, 1, "one error line");
        t.equal(wrong.errors.filter((e) => e.code === "EAUTH").length, 1, "one EAUTH event");
        t.equal(fs.readdirSync(path.join(wrong.maildir, "outgoing")).filter((n) => !n.startsWith(".")).length, 2, "both still in outgoing/");
        assertNoSecrets(t, [...wrong.lines, ...wrong.errors.map((e) => `${e.message} ${JSON.stringify(e.details)}`)],
          secretForms(USER, `wrong-${PASS}`), `Postfix AUTH ${mechanism}, wrong password`);

        const plain = postfixEngine(t, pf, { tls: "none" });
        plain.drop(513);
        const p = await bounded(plain.engine.flush(), FLUSH_MS, "flush without AUTH");
        t.equal(p.sent, 0, "without AUTH Postfix does not take the mail (so AUTH is what made it work)");
      });
    }
  });
});
