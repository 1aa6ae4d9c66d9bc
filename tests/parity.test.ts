// Seed parity (issue 9): the rest of Postfix's smtp(8) controls, with Postfix's meaning.

import t, { type Test } from "tap";
import { MailEngine } from "../mail.js";
import { world, line } from "./helpers/mx-world.js";
import { runCli } from "./helpers/spool-files.js";

const MX2 = {
  "dest.test": { MX: [{ preference: 10, exchange: "mx1.dest.test" }, { preference: 20, exchange: "mx2.dest.test" }] },
  "mx1.dest.test": { A: ["127.0.0.2"] },
  "mx2.dest.test": { A: ["127.0.0.3"] },
  "relay.test": { A: ["127.0.0.9"] },
};

t.test("--fallback-relay takes mail when every MX is down, and for a domain that does not exist", async (t) => {
  const w = await world(t, MX2, { "127.0.0.9": {} }, { fallbackRelay: "relay.test" });
  // fallbackRelay has no port: the world's port is where the scripted relay listens.
  await w.engine.stop();
  const engine = new MailEngine({ maildir: w.maildir, resolver: w.dns.address, port: w.port, fallbackRelay: `relay.test:${w.port}`, log: (l) => w.lines.push(l), fsync: false, connectTimeout: 1, dnsTimeout: 1 });
  t.teardown(() => engine.stop());
  const down = await w.drop(["bob@dest.test"]);
  const missing = await w.drop(["carol@nowhere.test"]);
  t.match(await engine.flush(), { sent: 2, deferred: 0, bounced: 0 });
  t.equal(w.servers.get("127.0.0.9")!.messages.length, 2, "the fallback relay took both");
  t.match(line(w, down, "bob@dest.test"), /relay=relay\.test\[127\.0\.0\.9\]:\d+, .*status=sent/);
  t.match(line(w, missing, "carol@nowhere.test"), /relay=relay\.test\[127\.0\.0\.9\]:\d+, .*status=sent/);
  t.match(w.lines.join("\n"), /dest\.test: delivering through the fallback relay relay\.test\[127\.0\.0\.9\]/, "which relay took it is logged");
});

t.test("inet_interfaces: an MX that is this machine cuts the list; as the best MX the mail loops back and bounces", async (t) => {
  const zone = {
    ...MX2,
    "half.test": { MX: [{ preference: 10, exchange: "mx1.dest.test" }, { preference: 20, exchange: "me.test" }, { preference: 30, exchange: "mx2.dest.test" }] },
    "loop.test": { MX: [{ preference: 5, exchange: "me.test" }, { preference: 10, exchange: "mx1.dest.test" }] },
    "me.test": { A: ["127.0.0.8"] },
    "talker.test": { A: ["127.0.0.4"] },
  };
  const w = await world(t, zone, { "127.0.0.2": { rcpt: () => "451 4.3.0 try later" }, "127.0.0.3": {}, "127.0.0.4": {} },
    { inetInterfaces: ["127.0.0.8"] });
  const half = await w.drop(["a@half.test"]);
  const loop = await w.drop(["b@loop.test"]);
  await w.flush();
  t.match(line(w, half, "a@half.test"), /relay=mx1\.dest\.test\[127\.0\.0\.2\].*status=deferred/, "mx1 is tried");
  t.equal(w.servers.get("127.0.0.3")!.connections, 0, "mx2, worse than this machine, is never tried");
  t.match(line(w, loop, "b@loop.test"), /relay=none, .*dsn=5\.4\.6, status=bounced \(mail for loop\.test loops back to myself\)/);
});

t.test("--best-mx-relay takes mail for which this machine is the best MX", async (t) => {
  const zone = { ...MX2, "loop.test": { MX: [{ preference: 5, exchange: "me.test" }] }, "me.test": { A: ["127.0.0.8"] } };
  const w = await world(t, zone, { "127.0.0.9": {} }, { inetInterfaces: ["127.0.0.8"] });
  await w.engine.stop();
  const engine = new MailEngine({ maildir: w.maildir, resolver: w.dns.address, port: w.port, inetInterfaces: ["127.0.0.8"], bestMxRelay: `127.0.0.9:${w.port}`, log: (l) => w.lines.push(l), fsync: false, dnsTimeout: 1 });
  t.teardown(() => engine.stop());
  const id = await w.drop(["b@loop.test"]);
  t.match(await engine.flush(), { sent: 1 });
  t.match(line(w, id, "b@loop.test"), /relay=127\.0\.0\.9\[127\.0\.0\.9\]:\d+, .*status=sent/);
});

t.test("SERVFAIL on MX defers; with --ignore-mx-lookup-error the A record is used", async (t) => {
  const zone = { "flaky.test": { A: ["127.0.0.2"], rcodeFor: { MX: "SERVFAIL" as const } } };
  const plain = await world(t, zone, { "127.0.0.2": {} });
  const a = await plain.drop(["x@flaky.test"]);
  t.match(await plain.flush(), { deferred: 1, sent: 0 });
  t.match(line(plain, a, "x@flaky.test"), /dsn=4\.4\.3, status=deferred/);
  const ignoring = await world(t, zone, { "127.0.0.2": {} }, { ignoreMxLookupError: true });
  const b = await ignoring.drop(["x@flaky.test"]);
  t.match(await ignoring.flush(), { sent: 1 });
  t.match(line(ignoring, b, "x@flaky.test"), /relay=flaky\.test\[127\.0\.0\.2\]/);
});

t.test("--disable-dns-lookups without --relay is a configuration error", async (t) => {
  const r = await runCli(["--flush", "--disable-dns-lookups", "--maildir", "/nonexistent/x"]);
  t.equal(r.code, 2);
  t.match(r.stderr, /--disable-dns-lookups needs --relay/);
  const bad = await runCli(["--flush", "--inet-interfaces", "eth0", "--maildir", "/nonexistent/x"]);
  t.equal(bad.code, 2);
  t.match(bad.stderr, /--inet-interfaces/);
});

import { startScriptedServer } from "./helpers/scripted-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "./helpers/spool-files.js";

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

t.test("--send --notify and --ret are checked", async (t) => {
  const maildir = await tempMaildir();
  for (const [args, pattern] of [[["--notify", "never,success"], /--notify: never stands alone/], [["--notify", "sometimes"], /--notify/], [["--ret", "body"], /--ret/]] as const) {
    const r = await runCli(["--send", "-f", "a@x.test", ...args, "b@x.test", "--maildir", maildir], { input: "hi\n" });
    t.equal(r.code, 2, args.join(" "));
    t.match(r.stderr, pattern);
  }
  const ok = await runCli(["--send", "-f", "a@x.test", "--notify", "success,failure", "--ret", "hdrs", "b@x.test", "--maildir", maildir], { input: "hi\n" });
  t.equal(ok.code, 0, ok.stderr);
  const id = ok.stdout.trim();
  const { readFile } = await import("node:fs/promises");
  const book = JSON.parse(await readFile(`${maildir}/outgoing/.${id}`, "utf8"));
  t.same(book.dsn, { notify: ["success", "failure"], ret: "hdrs" }, "kept in the bookkeeping, not in the message");
  t.notMatch(await readFile(`${maildir}/outgoing/${id}`, "utf8"), /NOTIFY|notify/);
});
