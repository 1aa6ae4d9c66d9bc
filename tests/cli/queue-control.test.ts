// Queue control from the command line (postsuper's -d, -h, -H, -r; --suspend, --resume; --flush
// as postqueue -f): done under the spool's lock when nothing else sends from the spool, and
// asked of the running daemon (through .requests/) when it does. smtp-sink is the relay.

import t, { type Test as Tap } from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { sleep, spawnDaemon, waitForText } from "../helpers/daemon.js";
import { freePort, requireTool, startSmtpSink, SMTP_SINK } from "../helpers/postfix.js";
import { recordingProxy, type Proxy } from "../helpers/proxy.js";
import { MAIL_JS, dropQueueFile, listFolder, makeSpool, queueFile, runCli, tempMaildir, testMessage } from "../helpers/spool-files.js";

interface Entry { id: string; state: string; attempts: number; nextAttempt: string | null; suspendedUntil: string | null }

async function queue(maildir: string): Promise<Entry[]> {
  const r = await runCli(["--queue", "--json", "--maildir", maildir]);
  return JSON.parse(r.stdout) as Entry[];
}

function waitForLog(file: string, re: RegExp, ms = 10_000): Promise<string> {
  return waitForText(() => fs.readFile(file, "utf8"), re, "the log", ms);
}

t.test("without a daemon: hold, release, requeue, delete under the spool's lock", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  const ids = [0, 1, 2].map((n) => `${now}.${n}`);
  for (const [n, id] of ids.entries()) await dropQueueFile(maildir, id, queueFile("a@test.example", [`u${n}@test.example`], testMessage(n)));

  const held = await runCli(["--hold", ids[0], "--maildir", maildir, "--log", log]);
  t.equal(held.code, 0, held.stderr);
  t.equal(held.stdout, "mudmail: --hold: 1 message placed on hold\n");
  t.same(await listFolder(maildir, "hold"), [ids[0]], "in hold/");
  t.match((await queue(maildir)).find((e) => e.id === ids[0]), { state: "hold" }, "--queue --json: state hold");
  t.match((await runCli(["--queue", "--maildir", maildir])).stdout, new RegExp(`^${ids[0].replace(".", "\\.")}!`, "m"), "mailq's ! mark");
  const again = await runCli(["--hold", ids[0], "--maildir", maildir]);
  t.match(again.stdout, /0 messages placed on hold\n.*: already on hold\n$/);
  t.equal(again.code, 0);
  const missing = await runCli(["--hold", "1700000000.99", "--maildir", maildir]);
  t.equal(missing.code, 1, "a named message that is not there exits 1");
  t.match(missing.stdout, /1700000000\.99: no such message in the queue/);
  t.equal((await runCli(["--hold", "../etc", "--maildir", maildir])).code, 2, "not a queue id: a usage error");

  const flushed = await runCli(["--flush", "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", log]);
  t.match(flushed.stdout, /flush: 2 messages: 2 sent,/, "the held message is not sent");
  t.same(await listFolder(maildir, "hold"), [ids[0]]);

  const released = await runCli(["--release", "ALL", "--maildir", maildir, "--log", log]);
  t.equal(released.stdout, "mudmail: --release: 1 message released from hold\n");
  t.same(await listFolder(maildir, "outgoing"), [ids[0]], "back in outgoing/");

  // A deferred message (the relay is down), requeued: due now, its attempts kept.
  const dead = `127.0.0.1:${await freePort()}`;
  await runCli(["--flush", "--relay", dead, "--maildir", maildir, "--log", log]);
  t.same(await listFolder(maildir, "deferred"), [ids[0]]);
  t.match((await queue(maildir))[0], { attempts: 1, state: "deferred" });
  t.ok((await queue(maildir))[0].nextAttempt !== null);
  const requeued = await runCli(["--requeue", ids[0], "--maildir", maildir, "--log", log]);
  t.equal(requeued.stdout, "mudmail: --requeue: 1 message requeued\n");
  t.match((await queue(maildir))[0], { id: ids[0], state: "queued", attempts: 1, nextAttempt: null }, "due now, attempts kept");

  const deleted = await runCli(["--delete", "ALL", "--maildir", maildir, "--log", log]);
  t.equal(deleted.stdout, "mudmail: --delete: 1 message removed\n");
  t.same(await queue(maildir), []);
  const lines = await fs.readFile(log, "utf8");
  for (const [id, what] of [[ids[0], "placed on hold"], [ids[0], "released from hold"], [ids[0], "requeued"], [ids[0], "removed"]]) {
    t.match(lines, new RegExp(`mudmail/postsuper\\[\\d+\\]: ${id.replace(".", "\\.")}: ${what}\\n`), `logged as postsuper does: ${what}`);
  }
});

t.test("with a daemon running: it is asked, and does it; --flush asks it to flush", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  const daemon = spawnDaemon(process.execPath, [MAIL_JS, "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", log], path.dirname(maildir), "daemon");
  t.teardown(() => daemon.kill("SIGKILL"));
  await t.resolves(waitForLog(log, /./, 10_000).catch(async () => {
    // The daemon logs nothing before its first mail: wait for its lock instead.
    for (let i = 0; i < 200 && !(await fs.lstat(path.join(maildir, ".mudmail.lock")).catch(() => null)); i++) await sleep(50);
  }));
  const pid = daemon.child.pid!;

  const suspended = await runCli(["--suspend", "example.net", "--seconds", "600", "--maildir", maildir, "--log", log]);
  t.equal(suspended.code, 0, suspended.stderr);
  t.match(suspended.stdout, new RegExp(`^mudmail: --suspend: example\\.net: no delivery until .* \\(told the running mudmail, pid ${pid}\\)\\n$`));
  await waitForLog(log, new RegExp(`mudmail/qmgr\\[${pid}\\]: example\\.net: delivery suspended for 600 s, until .*: by the operator \\(--suspend\\)`));

  const sent = [];
  for (const n of [1, 2]) {
    const r = await runCli(["--send", "--maildir", maildir, "-f", "talker@test.example", "-s", `hi ${n}`, `u${n}@example.net`], { input: "hello\n" });
    sent.push(r.stdout.trim());
  }
  // The daemon claims them, finds example.net suspended, and puts them back untried.
  await waitForLog(log, new RegExp(`${sent[1].replace(".", "\\.")}: from=<talker@test\\.example>`));
  await sleep(200);
  const listed = await queue(maildir);
  t.equal(listed.length, 2);
  for (const e of listed) {
    t.equal(e.state, "queued", `${e.id} waits in outgoing/`);
    t.ok(e.suspendedUntil && Date.parse(e.suspendedUntil) > Date.now() + 500_000, `${e.id}: suspended until ${e.suspendedUntil}`);
  }
  const mailq = await runCli(["--queue", "--maildir", maildir]);
  t.match(mailq.stdout, /^-Suspended Destination-.*\nexample\.net\s+\w{3} [ \d]\d \d\d:\d\d:\d\d  by the operator \(--suspend\)\n/, "mailq lists the suspension first");
  t.match(mailq.stdout, /\(queued, age \d+[smhd], suspended until \w{3} [ \d]\d \d\d:\d\d:\d\d\)/);

  const held = await runCli(["--hold", sent[0], "--maildir", maildir, "--log", log]);
  t.equal(held.stdout, `mudmail: --hold: 1 message placed on hold by the running mudmail (pid ${pid})\n`);
  t.same(await listFolder(maildir, "hold"), [sent[0]]);
  await waitForLog(log, new RegExp(`mudmail/postsuper\\[${pid}\\]: ${sent[0].replace(".", "\\.")}: placed on hold`));

  const resumed = await runCli(["--resume", "example.net", "--maildir", maildir, "--log", log]);
  t.equal(resumed.stdout, `mudmail: --resume: example.net: delivery resumed by the running mudmail (pid ${pid})\n`);
  await waitForLog(log, new RegExp(`${sent[1].replace(".", "\\.")}: to=<u2@example\\.net>, .*status=sent`));
  t.match(await fs.readFile(log, "utf8"), /example\.net: delivery resumed: the suspension was lifted \(--resume\)/);
  t.same(await listFolder(maildir, "hold"), [sent[0]], "the held message stays held");

  const released = await runCli(["--release", sent[0], "--maildir", maildir, "--log", log]);
  t.equal(released.code, 0);
  await waitForLog(log, new RegExp(`${sent[0].replace(".", "\\.")}: to=<u1@example\\.net>, .*status=sent`));

  const flush = await runCli(["--flush", "--maildir", maildir, "--relay", `${sink.host}:${sink.port}`]);
  t.equal(flush.code, 0, "--flush with a daemon running exits 0");
  t.equal(flush.stdout, `mudmail: flush: asked the running mudmail (pid ${pid}) to flush the queue now; it is flushing (postqueue -f)\n`);
  const empty = await runCli(["--delete", "ALL", "--maildir", maildir]);
  t.equal(empty.stdout, `mudmail: --delete: 0 messages removed by the running mudmail (pid ${pid})\n`);
  t.same(await fs.readdir(path.join(maildir, ".requests")), [], "no request or answer is left behind");
  await daemon.kill("SIGTERM", 10_000);
  t.equal((await daemon.done).code, 0);
});

/** Where each queue id is, across the folders a message can be in; an id in two folders is listed twice. */
async function whereabouts(maildir: string): Promise<Array<[string, string]>> {
  const out: Array<[string, string]> = [];
  for (const folder of ["outgoing", "outgoing_active", "deferred", "hold", "corrupt"]) {
    for (const id of await listFolder(maildir, folder)) out.push([id, folder]);
  }
  return out.sort();
}

async function startDaemon(t: Tap, maildir: string, log: string, relay: string): Promise<number> {
  const daemon = spawnDaemon(process.execPath, [MAIL_JS, "--relay", relay, "--maildir", maildir, "--log", log], path.dirname(maildir), "daemon");
  t.teardown(() => daemon.stop());
  for (let i = 0; i < 200 && !(await fs.lstat(path.join(maildir, ".mudmail.lock")).catch(() => null)); i++) await sleep(50);
  return daemon.child.pid!;
}

t.test("with a daemon running: ALL variants; held mail is never sent until released; --requeue makes deferred mail due now", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  // The relay's port refuses connections until a proxy to smtp-sink listens on it.
  const port = await freePort();
  const pid = await startDaemon(t, maildir, log, `127.0.0.1:${port}`);
  let proxy: Proxy | null = null;
  t.teardown(() => proxy?.close());
  const sendOne = async (n: number) => {
    const r = await runCli(["--send", "--maildir", maildir, "-f", "talker@test.example", "-s", `hi ${n}`, `u${n}@test.example`], { input: "hello\n" });
    t.equal(r.code, 0, r.stderr);
    return r.stdout.trim();
  };
  const ids = [await sendOne(1), await sendOne(2), await sendOne(3)];
  for (const id of ids) await waitForLog(log, new RegExp(`${id.replace(".", "\\.")}: to=<.*status=deferred`));
  await sleep(100);
  t.same(await whereabouts(maildir), ids.map((id) => [id, "deferred"]).sort(), "deferred, each in one folder");

  const held = await runCli(["--hold", "ALL", "--maildir", maildir, "--log", log]);
  t.equal(held.stdout, `mudmail: --hold: 3 messages placed on hold by the running mudmail (pid ${pid})\n`);
  t.same(await whereabouts(maildir), ids.map((id) => [id, "hold"]).sort(), "all in hold/, nowhere else");

  // The relay answers now; a forced flush asked of the daemon still sends nothing that is held.
  proxy = await recordingProxy(sink.port, { port });
  const flush = await runCli(["--flush", "--force", "--maildir", maildir]);
  t.equal(flush.code, 0, flush.stderr);
  await sleep(1500);
  t.equal(proxy.chunks.length, 0, "no connection: held mail is not sent");
  t.same(await whereabouts(maildir), ids.map((id) => [id, "hold"]).sort());

  const released = await runCli(["--release", "ALL", "--maildir", maildir, "--log", log]);
  t.equal(released.stdout, `mudmail: --release: 3 messages released from hold by the running mudmail (pid ${pid})\n`);
  for (const id of ids) await waitForLog(log, new RegExp(`${id.replace(".", "\\.")}: to=<.*status=sent`));
  for (let i = 0; i < 100 && (await whereabouts(maildir)).length > 0; i++) await sleep(50);
  t.same(await whereabouts(maildir), [], "sent and removed");

  // Deferred again (the relay refuses), then --requeue ALL: sent at once, not after the 300 s backoff.
  await proxy.close();
  proxy = null;
  const late = await sendOne(4);
  await waitForLog(log, new RegExp(`${late.replace(".", "\\.")}: to=<.*status=deferred`));
  await sleep(100);
  t.same(await whereabouts(maildir), [[late, "deferred"]]);
  t.match((await queue(maildir))[0], { state: "deferred", attempts: 1 });
  proxy = await recordingProxy(sink.port, { port });
  const requeued = await runCli(["--requeue", "ALL", "--maildir", maildir, "--log", log]);
  t.equal(requeued.stdout, `mudmail: --requeue: 1 message requeued by the running mudmail (pid ${pid})\n`);
  await waitForLog(log, new RegExp(`${late.replace(".", "\\.")}: to=<u4@test\\.example>, .*status=sent`), 10_000);

  const unknown = await runCli(["--delete", "1700000000.99", "--maildir", maildir]);
  t.equal(unknown.code, 1, "an unknown id exits 1, the daemon asked");
  t.match(unknown.stdout, /1700000000\.99: no such message in the queue/);
  const bad = await runCli(["--release", "nope/../x", "--maildir", maildir]);
  t.equal(bad.code, 2, "not a queue id: a usage error");
  t.match(bad.stderr, /^mudmail: --release: expected a queue id or ALL, got "nope\/\.\.\/x"\n$/);
  const lines = await fs.readFile(log, "utf8");
  for (const id of ids) {
    for (const what of ["placed on hold", "released from hold"]) t.match(lines, new RegExp(`mudmail/postsuper\\[${pid}\\]: ${id.replace(".", "\\.")}: ${what}\n`));
  }
});

t.test("a lock holder that does not take the request: withdrawn after 10 s, nothing done, exit 1", async (t) => {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const id = `${Math.floor(Date.now() / 1000)}.0`;
  await dropQueueFile(maildir, id, queueFile("a@test.example", ["u@test.example"], testMessage(0)));
  // A live process that holds the lock but reads no requests (as a host that never ticks would).
  const mute = spawnDaemon("/bin/sleep", ["60"], path.dirname(maildir), "mute");
  t.teardown(() => mute.kill("SIGKILL"));
  await fs.symlink(String(mute.child.pid), path.join(maildir, ".mudmail.lock"));
  const r = await runCli(["--hold", id, "--maildir", maildir], { timeoutMs: 30_000 });
  t.equal(r.code, 1);
  t.match(r.stderr, new RegExp(`^mudmail: the running mudmail \\(pid ${mute.child.pid}\\) did not take the request within 10 s .*; nothing was done\\n$`));
  t.same(await fs.readdir(path.join(maildir, ".requests")), [], "the request was withdrawn");
  t.same(await listFolder(maildir, "outgoing"), [id], "the message is where it was");
});
