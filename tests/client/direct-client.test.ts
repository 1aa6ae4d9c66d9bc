// The direct client (scsh's sendmail, VRFY, EXPN, HELP, smtp-transactions) against a real
// Postfix smtpd and, for refusals and faults, the scripted server.

import t from "tap";
import { sendmail, vrfy, expn, help, smtpTransactions, SmtpSession } from "../../mail.js";
import { requirePostfix, startPostfix } from "../helpers/postfix.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { runCli } from "../helpers/spool-files.js";

const BODY = "From: a@test.example\nSubject: direct\n\n.leading dot\nline two\n";

t.test("sendmail, VRFY, EXPN and HELP against a real Postfix", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix();
  t.teardown(() => postfix.stop());
  const where = { host: postfix.host, port: postfix.port, helo: "client.test" };
  const sent = await sendmail({ ...where, from: "a@test.example", to: [`b@${postfix.domain}`, `c@${postfix.domain}`], body: BODY });
  t.match(sent, { code: 250, text: [/^2\.0\.0 Ok: queued as \w+$/] }, "the reply to the data, as Postfix gave it");
  const [stored] = await postfix.waitForMessages(1, 20_000);
  t.match(stored.toString(), /\nSubject: direct\n[^]*?\n\n\.leading dot\nline two\n$/, "stuffed on the wire, stored as given");
  const v = await vrfy(`b@${postfix.domain}`, where);
  t.ok(v.code === 252 || v.code === 250, `VRFY answered ${v.code} ${v.text.join(" ")}`);
  t.ok(Array.isArray(v.text) && v.text.length >= 1, "text lines");
  t.match(await expn("staff", where), { code: 500, text: [/command not recognized/] }, "Postfix has no EXPN: its words come back as they are");
  t.match(await help("", where), { code: 500, text: [/command not recognized/] }, "nor HELP");
  const cli = await runCli(["--vrfy", `b@${postfix.domain}`, "--relay", `${postfix.host}:${postfix.port}`]);
  t.equal(cli.code, 0);
  t.match(cli.stdout, /^25[02] /, "the CLI prints the reply as the server gave it");
  const bad = await runCli(["--vrfy", "b@x.test"]);
  t.equal(bad.code, 2, "--vrfy without --relay is a usage error");
  t.match(bad.stderr, /--vrfy needs --relay/);
});

t.test("partial success is { code: 700, losers }, as in scsh", async (t) => {
  const server = await startScriptedServer({ rcpt: (a) => (a.startsWith("gone") ? "550 5.1.1 <gone@x.test>: User unknown" : a.startsWith("busy") ? "450 4.2.1 busy" : undefined) });
  t.teardown(() => server.close());
  const where = { host: "127.0.0.1", port: server.port, helo: "client.test" };
  const some = await sendmail({ ...where, from: "a@x.test", to: ["ok@x.test", "gone@x.test", "busy@x.test"], body: BODY });
  t.same(some, { code: 700, losers: [
    { rcpt: "gone@x.test", code: 550, text: ["5.1.1 <gone@x.test>: User unknown"] },
    { rcpt: "busy@x.test", code: 450, text: ["4.2.1 busy"] },
  ] });
  t.equal(server.messages.length, 1, "the others got the message");
  t.same(server.messages[0].to, ["ok@x.test"]);
  const none = await sendmail({ ...where, from: "a@x.test", to: ["gone@x.test"], body: BODY });
  t.match(none, { code: 700, losers: [{ rcpt: "gone@x.test", code: 550 }] });
  t.equal(server.messages.length, 1, "no message when every recipient was refused");
});

t.test("smtpTransactions stops at the first 4xx/5xx and sends QUIT; 600 and 621 are the seed's pseudo-codes", async (t) => {
  const server = await startScriptedServer({ mail: () => "451 4.3.0 try later" });
  t.teardown(() => server.close());
  const s = await SmtpSession.open({ host: "127.0.0.1", port: server.port, helo: "client.test" });
  let ranAfter = false;
  const last = await smtpTransactions(s, (c) => c.ehlo(), (c) => c.mail("a@x.test"), async (c) => { ranAfter = true; return c.rcpt("b@x.test"); });
  t.match(last, { code: 451, text: ["4.3.0 try later"] });
  t.notOk(ranAfter, "the step after the failure did not run");
  await server.waitFor(() => server.sessions[0]?.commands.includes("QUIT") ?? false, 2000, "QUIT");
  t.ok(s.closed, "and the session is closed");

  const garbage = await startScriptedServer({ mail: () => ({ action: "raw", bytes: "hello there\r\n" }) });
  t.teardown(() => garbage.close());
  const g = await SmtpSession.open({ host: "127.0.0.1", port: garbage.port });
  await g.ehlo();
  t.match(await g.mail("a@x.test"), { code: 600, text: [/Improperly-formatted smtp reply: hello there/] });
  g.close();

  const hangup = await startScriptedServer({ mail: () => ({ action: "raw", bytes: "250-first line\r\n", thenClose: true }) });
  t.teardown(() => hangup.close());
  const h = await SmtpSession.open({ host: "127.0.0.1", port: hangup.port });
  await h.ehlo();
  t.match(await h.mail("a@x.test"), { code: 621, text: ["Premature EOF during smtp reply.", "first line"] });
  h.close();
});

t.test("the direct client refuses to write CR, LF or NUL into a command, and bad addresses", async (t) => {
  const server = await startScriptedServer();
  t.teardown(() => server.close());
  const s = await SmtpSession.open({ host: "127.0.0.1", port: server.port });
  await s.ehlo();
  await t.rejects(s.mail("a@x.test>\r\nRCPT TO:<victim@x.test"), /bad address|CR, LF or NUL/);
  await t.rejects(s.vrfy("joe\r\nDATA"), /CR, LF or NUL/);
  await s.quit();
  t.notOk(server.sessions[0].commands.some((c) => c.includes("victim") || c === "DATA"), "nothing injected reached the server");
});
