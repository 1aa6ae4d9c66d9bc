// Notices with Postfix's meaning: the postmaster's transcript of a protocol error (AUTH
// redacted), --debug-peer, and DSN (RFC 3461): NOTIFY=NEVER, a 'relayed' report through a
// server without DSN, RET=FULL, the DSN parameters on the wire.

import t, { type Test } from "tap";
import { MailEngine } from "../../mail.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

const BODY = "From: talker@talker.test\nSubject: parity\n\nbody line\n";

async function relayRig(t: Test, script: Parameters<typeof startScriptedServer>[0], options: Record<string, unknown> = {}) {
  const server = await startScriptedServer(script);
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, log: (l) => lines.push(l), fsync: false, helo: "talker.test", ...options });
  t.teardown(() => engine.stop());
  return { server, maildir, lines, engine };
}

t.test("a protocol error sends the postmaster a transcript, AUTH redacted; --debug-peer logs a matching peer's conversation", async (t) => {
  const rig = await relayRig(t, {
    tls: undefined,
    auth: { mechanisms: ["PLAIN"], users: { carol: "s3cret-pass" } },
    rcpt: (a) => (a === "bob@x.test" ? { action: "raw", bytes: "354 this is not a reply to RCPT\r\n" } : undefined),
  }, { notifyClasses: ["protocol"], postmaster: "admin@talker.test", auth: "carol:s3cret-pass", tls: "none", debugPeer: ["127.0.0.0/8"] });
  const now = Math.floor(Date.now() / 1000);
  await dropQueueFile(rig.maildir, `${now}.1`, queueFile("talker@talker.test", ["bob@x.test"], BODY));
  await rig.engine.flush();
  const all = rig.lines.join("\n");
  t.match(all, /status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] broke the protocol: 354 this is not a reply to RCPT/);
  t.match(all, /127\.0\.0\.1\[127\.0\.0\.1\]: > MAIL FROM:<talker@talker\.test>/, "the debug peer's commands are logged");
  t.match(all, /127\.0\.0\.1\[127\.0\.0\.1\]: < 220 /, "and its replies");
  t.match(all, /: > AUTH <redacted>/, "AUTH is redacted");
  t.notMatch(all, /body line/, "the body is never logged");
  const notice = rig.server.messages.find((m) => m.to.includes("admin@talker.test"));
  t.ok(notice, "a notice went to the postmaster (through the same relay)");
  const text = notice!.data.toString().replace(/\r\n[ \t]+/g, " ");
  t.match(text, /Subject: Postmaster Copy: mudmail SMTP client: errors from 127\.0\.0\.1\[127\.0\.0\.1\]/);
  t.match(text, /Out: MAIL FROM:<talker@talker\.test>/);
  t.match(text, /In: 354 this is not a reply to RCPT/);
  t.match(text, /Out: AUTH <redacted>/);
  for (const secret of ["s3cret-pass", Buffer.from("s3cret-pass").toString("base64"), Buffer.from("\0carol\0s3cret-pass").toString("base64")]) {
    t.notOk(all.includes(secret) || text.includes(secret), `no ${secret} in the log or the notice`);
  }
});

t.test("--debug-peer logs only matching peers", async (t) => {
  const rig = await relayRig(t, {}, { debugPeer: ["192.0.2.1", "elsewhere.test"] });
  await dropQueueFile(rig.maildir, `${Math.floor(Date.now() / 1000)}.1`, queueFile("<>", ["bob@x.test"], BODY));
  t.match(await rig.engine.flush(), { sent: 1 });
  t.notMatch(rig.lines.join("\n"), /: > MAIL FROM/, "another peer's conversation is not logged");
});

t.test("DSN: NOTIFY=NEVER suppresses our bounce; NOTIFY=SUCCESS through a server without DSN gets a 'relayed' report; RET=FULL returns the message", async (t) => {
  const rig = await relayRig(t, { withoutExtensions: ["DSN"], rcpt: (a) => (a.startsWith("gone") ? "550 5.1.1 no such user" : undefined) });
  const quiet = await rig.engine.send({ from: "talker@talker.test", to: "gone@x.test", subject: "never", text: "x", dsn: { notify: ["never"] } });
  const loud = await rig.engine.send({ from: "talker@talker.test", to: "gone@x.test", subject: "full", text: "the whole body\n", dsn: { notify: ["failure"], ret: "full", envid: "QQ 314" } });
  const happy = await rig.engine.send({ from: "talker@talker.test", to: "ok@x.test", subject: "success", text: "y", dsn: { notify: ["success", "failure"] } });
  await rig.engine.flush();
  const all = rig.lines.join("\n");
  t.match(all, new RegExp(`${quiet.replace(".", "\\.")}: no non-delivery notification: the sender asked for NOTIFY=NEVER`));
  const reports = rig.server.messages.filter((m) => m.from === "");
  t.equal(reports.length, 2, "one bounce (RET=FULL) and one relayed report; none for NOTIFY=NEVER");
  const bounce = reports.find((m) => /Undelivered Mail/.test(m.data.toString()))!.data.toString();
  t.match(bounce, /Original-Envelope-Id: QQ 314\r?\n/, "ENVID comes back");
  t.match(bounce, /Content-Type: message\/rfc822/, "RET=FULL: the whole message");
  t.match(bounce, /the whole body/);
  const relayed = reports.find((m) => /Successful Mail Delivery Report/.test(m.data.toString()))!.data.toString();
  t.match(relayed, /Action: relayed/);
  t.match(relayed, /Final-Recipient: rfc822; ?ok@x\.test/);
  t.match(all, new RegExp(`${happy.replace(".", "\\.")}: sender success notification: `));
  t.same(await listFolder(rig.maildir, "deferred"), []);
  void loud;
});

t.test("DSN parameters go on the wire, xtext-encoded, only when the server offers DSN", async (t) => {
  const rig = await relayRig(t, { extensions: ["DSN"] });
  await rig.engine.send({ from: "talker@talker.test", to: ["a+b=c@x.test"], subject: "dsn", text: "z", dsn: { notify: ["failure", "delay"], ret: "hdrs", envid: "ID=1+2" } });
  t.match(await rig.engine.flush(), { sent: 1 });
  const commands = rig.server.sessions.flatMap((s) => s.commands);
  t.ok(commands.some((c) => /^MAIL FROM:<talker@talker\.test> .*RET=HDRS ENVID=ID\+3D1\+2B2$/.test(c)), `MAIL: ${commands.find((c) => c.startsWith("MAIL"))}`);
  t.ok(commands.includes("RCPT TO:<a+b=c@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+2Bb+3Dc@x.test"), `RCPT: ${commands.find((c) => c.startsWith("RCPT"))}`);
});
