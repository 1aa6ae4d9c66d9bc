// Reply rules against the scripted server: a throttle reply lowers the connection limit and
// defers without counting an attempt; Yahoo's [TS04] suspends the destination (its mail stays
// queued untried, nothing bounces, --force does not lift it, it is logged once when it begins
// and once when it ends); a provider known by its MX names is suspended for all its domains.

import t from "tap";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { MailEngine, type Outcome } from "../../mail.js";
import { setup, simple, testMails, type Rig } from "../helpers/engine-rig.js";
import { world, line } from "../helpers/mx-world.js";
import { listFolder, runCli } from "../helpers/spool-files.js";
import { startScriptedServer } from "../helpers/scripted-server.js";

const TS04 = "421 4.7.0 [TS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints";

/** The queue's bookkeeping of a message in a folder: attempts counted, next attempt. */
function book(rig: Rig, folder: string, id: string): { attempts: number } | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(rig.maildir, folder, `.${id}`), "utf8"));
  } catch {
    return null;
  }
}

t.test("throttle: one connection fewer, the message deferred without an attempt, sent at the next pass", async (t) => {
  let refused = 0;
  const rig = await setup(t, {
    script: { mail: () => (refused++ === 0 ? "421 4.7.0 Try again later, closing connection." : undefined) },
    engine: { maxConnections: 3, policy: { default: { connections: 3 }, replies: [{ match: "^421 4\\.7\\.0 Try again later", action: "throttle" }] } },
  });
  const ids = [0, 1, 2, 3, 4].map((i) => rig.drop(simple("a@example.org", [`u${i}@example.net`])));
  const first = await rig.flush();
  t.match(first, { sent: 4, deferred: 1, bounced: 0, messages: 5 }, "four sent, one deferred");
  const deferred = rig.outcomes().filter((o) => o.status === "deferred");
  t.equal(deferred.length, 1, "one deferral logged");
  t.match(deferred[0].text, /421 4\.7\.0 Try again later/);
  t.ok(rig.lines.some((l) => /mudmail\/qmgr\[\d+\]: 127\.0\.0\.1: throttled to [12] connections?: host 127\.0\.0\.1\[127\.0\.0\.1\] said: 421 4\.7\.0 Try again later/.test(l)),
    "the throttle is logged with the reply");
  const id = deferred[0].id;
  t.ok(ids.includes(id));
  t.same(rig.where(id), ["outgoing"], "not in deferred/: no backoff penalty");
  t.equal(book(rig, "outgoing", id)?.attempts ?? 0, 0, "no attempt counted");
  const second = await rig.flush();
  t.match(second, { sent: 1, deferred: 0 }, "the next pass sends it at once");
  t.equal(rig.server.messages.filter((m) => m.from !== "").length, 5);
});

t.test("throttle: never below one connection; the limit climbs back with deliveries", async (t) => {
  // Three connections at once, one message each; the first three MAILs hear 421 4.7.0.
  let refused = 0;
  const openAtMail: number[] = [];
  const rig = await setup(t, {
    script: {
      mail: (_a, session) => {
        if (refused < 3) { refused++; return "421 4.7.0 Try again later, closing connection."; }
        openAtMail.push(rig.server.sessions.filter((s) => !s.closed && s !== session && s.helo !== null).length + 1);
        return undefined;
      },
      // Slow enough that connections overlap when the limit allows it.
      onData: () => ({ action: "delay", ms: 150, reply: "250 2.0.0 Ok" }),
    },
    engine: { maxConnections: 3, policy: { default: { connections: 3, messagesPerConnection: 1 }, replies: [{ match: "^421 4\\.7\\.0", action: "throttle" }] } },
  });
  for (let i = 0; i < 12; i++) rig.drop(simple("a@example.org", [`u${i}@example.net`]));
  const first = await rig.flush(20_000);
  const throttles = rig.lines.map((l) => / 127\.0\.0\.1: throttled to (\d+) connections?:/.exec(l)?.[1]).filter((x) => x !== undefined).map(Number);
  t.equal(throttles.length, 3, "each 421 session throttles once");
  t.ok(throttles.every((n) => n >= 1), `never below 1: ${throttles}`);
  t.equal(throttles.at(-1), 1, "the third 421 finds the limit at its floor, 1");
  t.match(first, { sent: 9, deferred: 3 }, "the refused three are deferred");
  t.equal(openAtMail[0], 1, "the first delivery after the throttles is alone");
  t.ok(Math.max(...openAtMail) >= 2, `the limit climbs back after deliveries (open at each MAIL: ${openAtMail})`);
  t.equal(rig.files("deferred").length, 0, "no backoff: the three wait in outgoing/");
  t.match(await rig.flush(20_000), { sent: 3, deferred: 0 }, "and go at the next pass");
});

t.test("[TS04] from the command line: --flush --force does not lift it, --resume does", async (t) => {
  let refuse = true;
  const server = await startScriptedServer({ mail: () => (refuse ? TS04 : undefined) });
  t.teardown(() => server.close());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-ts04-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const maildir = path.join(dir, "maildir");
  const log = path.join(dir, "mail.log");
  const common = ["--maildir", maildir, "--log", log, "--relay", `127.0.0.1:${server.port}`];
  for (const n of [1, 2]) {
    const r = await runCli(["--send", ...common, "-f", "a@example.org", "-s", `s${n}`, `u${n}@example.net`], { input: "hi\n" });
    t.equal(r.code, 0, r.stderr);
  }
  const first = await runCli(["--flush", ...common]);
  t.equal(first.code, 0, first.stderr);
  t.match(first.stdout, /flush: 2 messages: 0 sent, 2 deferred, 0 bounced/, "deferred, not bounced");
  t.equal(server.sessions.flatMap(testMails).length, 1, "one MAIL heard [TS04]; no other message was tried");
  const before = server.connections;
  const forced = await runCli(["--flush", "--force", ...common]);
  t.equal(forced.code, 0);
  t.equal(server.connections, before, "--flush --force opens no connection to a suspended destination");
  t.equal((await listFolder(maildir, "outgoing")).length, 2, "both wait in outgoing/");
  const mailq = await runCli(["--queue", "--maildir", maildir]);
  t.match(mailq.stdout, /^-Suspended Destination-.*\n127\.0\.0\.1\s+.*\[TS04\]/, "the queue listing shows the suspension");
  refuse = false;
  const resumed = await runCli(["--resume", "127.0.0.1", ...common]);
  t.equal(resumed.stdout, "mudmail: --resume: 127.0.0.1: delivery resumed\n");
  const last = await runCli(["--flush", ...common]);
  t.match(last.stdout, /flush: 2 messages: 2 sent, 0 deferred, 0 bounced/);
  const lines = fs.readFileSync(log, "utf8");
  t.equal(lines.match(/: 127\.0\.0\.1: delivery suspended for 7200 s/g)?.length, 1, "logged once when it began");
  t.equal(lines.match(/: 127\.0\.0\.1: delivery resumed/g)?.length, 1, "and once when it ended");
  t.notMatch(lines, /status=bounced/);
});

t.test("suspend on [TS04]: no new connections, mail stays queued untried, --force does not lift it", async (t) => {
  const rig = await setup(t, {
    script: { mail: () => TS04 },
    engine: { maxConnections: 2 },
  });
  const ids = [0, 1, 2, 3].map((i) => rig.drop(simple("a@example.org", [`u${i}@example.net`])));
  const summary = await rig.flush();
  t.match(summary, { sent: 0, bounced: 0, deferred: 4, messages: 4 }, "every message counted as deferred, none bounced");
  const mails = rig.server.sessions.flatMap(testMails);
  t.equal(mails.length, 1, "the first MAIL heard [TS04]; no other message was tried");
  const started = rig.lines.filter((l) => / 127\.0\.0\.1: delivery suspended for 7200 s, until \w{3} [ \d]\d \d\d:\d\d:\d\d: host 127\.0\.0\.1\[127\.0\.0\.1\] said: 421 4\.7\.0 \[TS04\]/.test(l));
  t.equal(started.length, 1, "the suspension is logged once when it begins");
  t.same(rig.files("outgoing"), [...ids].sort(), "every message waits in outgoing/");
  for (const id of ids) t.equal(book(rig, "outgoing", id)?.attempts ?? 0, 0, `${id}: no attempt counted`);
  t.equal(rig.events.bounced.length, 0, "nothing bounced");
  const state = JSON.parse(fs.readFileSync(path.join(rig.maildir, ".state-suspended"), "utf8"));
  t.ok(state["127.0.0.1"]?.until > Date.now() + 7000_000, "the suspension is kept in the spool");

  const before = rig.server.connections;
  const forced = await rig.flush(undefined, true);
  t.match(forced, { sent: 0, messages: 0 }, "--force does not lift it: the engine leaves what it holds back alone");
  t.equal(rig.server.connections, before, "no new connection");

  // Another process (a cron --flush) reads it from the spool: still held, not logged again.
  await rig.engine.stop();
  const lines: string[] = [];
  const next = new MailEngine({ maildir: rig.maildir, relay: `127.0.0.1:${rig.server.port}`, log: (l) => lines.push(l), fsync: false, helo: "client.test" });
  t.teardown(() => next.stop());
  t.match(await next.flush({ force: true }), { sent: 0, deferred: 4 });
  t.equal(rig.server.connections, before, "a new process does not connect either");
  t.notOk(lines.some((l) => /suspended|resumed/.test(l)), "nothing more is logged about it");
});

t.test("a suspension ends: logged once, and the mail goes", async (t) => {
  let refuse = true;
  const rig = await setup(t, {
    script: { mail: () => (refuse ? "421 4.7.0 [TS04] come back later" : undefined) },
    engine: { maxConnections: 1, policy: { replies: [{ match: "\\[TS04\\]", action: "suspend", seconds: 1 }] } },
  });
  rig.drop(simple("a@example.org", ["u1@example.net"]));
  rig.drop(simple("a@example.org", ["u2@example.net"]));
  t.match(await rig.flush(), { sent: 0, deferred: 2 });
  refuse = false;
  // The daemon's way: the engine runs, and its wake timer ends the suspension and sends.
  const sent: Outcome[] = [];
  rig.engine.on("sent", (o) => sent.push(o));
  rig.engine.start();
  await rig.server.waitFor(() => sent.length === 2, 5000, "both messages sent after the end");
  t.equal(rig.lines.filter((l) => / 127\.0\.0\.1: delivery suspended for 1 s/.test(l)).length, 1, "begun once");
  t.equal(rig.lines.filter((l) => / 127\.0\.0\.1: delivery resumed: the suspension ended$/.test(l)).length, 1, "ended once");
  t.equal(sent.length, 2);
});

t.test("a provider known by its MX names: its limit and its suspension cover all its domains", async (t) => {
  let refused = 0;
  const w = await world(t, {
    "a.test": { MX: [{ preference: 10, exchange: "mx1.bigmail.test" }] },
    "b.test": { MX: [{ preference: 10, exchange: "mx2.bigmail.test" }] },
    "c.test": { MX: [{ preference: 10, exchange: "mx.small.test" }] },
    "mx1.bigmail.test": { A: ["127.0.0.2"] },
    "mx2.bigmail.test": { A: ["127.0.0.2"] },
    "mx.small.test": { A: ["127.0.0.3"] },
  }, {
    "127.0.0.2": { mail: () => (refused++ === 0 ? TS04 : undefined) },
    "127.0.0.3": {},
  }, { maxConnections: 4, policy: { providers: { bigmail: { mx: [".bigmail.test"], connections: 1 } } } });
  const a = await w.drop(["x@a.test"]);
  const b = await w.drop(["y@b.test"]);
  const c = await w.drop(["z@c.test"]);
  const summary = await w.flush();
  t.match(summary, { sent: 1, deferred: 2, bounced: 0 });
  t.equal(w.servers.get("127.0.0.2")!.connections, 1, "one connection for both domains: the provider's limit");
  t.match(line(w, c, "z@c.test"), /status=sent/, "another provider's mail goes");
  t.ok(w.lines.some((l) => / bigmail: delivery suspended for 7200 s/.test(l)), "the provider is suspended");
  const tried = [line(w, a, "x@a.test"), line(w, b, "y@b.test")].filter((l) => l !== "");
  t.equal(tried.length, 1, "of the provider's two domains, one heard [TS04] and the other was held back untried");
  t.match(tried[0], /status=deferred \(host mx[12]\.bigmail\.test\[127\.0\.0\.2\] said: 421 4\.7\.0 \[TS04\]/);
  t.same((await listFolder(w.maildir, "outgoing")).sort(), [a, b].sort(), "both wait in outgoing/");
  const state = JSON.parse(fs.readFileSync(path.join(w.maildir, ".state-suspended"), "utf8"));
  t.same(state.bigmail.domains, ["a.test", "b.test"], "the domains behind it are kept for the queue listing");
});
