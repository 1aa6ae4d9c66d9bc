// The deferred queue: backoff from --min-backoff to --max-backoff, the tick that picks up what
// is due (across a restart), expiry after --max-queue-lifetime as an RFC 3464 bounce that a real
// Postfix accepts, one delay warning, and a dead relay with more mail than the read-ahead.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { SIMPLE, world } from "../helpers/mx-world.js";
import { freePort, requirePostfix, startPostfix } from "../helpers/postfix.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

t.test("the deferred queue: backoff doubles from --min-backoff to --max-backoff; --force retries; delivered once", async (t) => {
  let refuse = true;
  const w = await world(t, { "dest.test": { A: ["127.0.0.2"] } },
    { "127.0.0.2": { rcpt: () => (refuse ? "450 4.2.0 mailbox busy" : undefined) } },
    { minBackoff: 100, maxBackoff: 300 });
  const id = await w.drop(["bob@dest.test"]);
  const waits: number[] = [];
  for (let attempt = 1; attempt <= 3; attempt++) {
    const before = Date.now();
    t.match(await w.flush(attempt > 1), { deferred: 1 }, `attempt ${attempt} deferred`);
    const after = Date.now();
    const book = JSON.parse(await fs.readFile(path.join(w.maildir, "deferred", `.${id}`), "utf8"));
    t.equal(book.attempts, attempt);
    t.match(book.lastError, /450 4\.2\.0 mailbox busy/);
    // The wait counts from the moment of the deferral, somewhere inside the flush (whose
    // first one also starts the spool's worker): the whole seconds that fit both ends.
    const wait = [100, 200, 300].find((s) => book.nextAttempt >= before + s * 1000 && book.nextAttempt <= after + s * 1000);
    waits.push(wait ?? (book.nextAttempt - before) / 1000);
  }
  t.same(waits, [100, 200, 300], "100 s, then doubled, then capped at --max-backoff");
  t.match(await w.flush(), { messages: 0 }, "not due: a plain flush does not touch it");
  refuse = false;
  t.match(await w.flush(true), { sent: 1, deferred: 0 }, "--force: delivered");
  t.same(await listFolder(w.maildir, "deferred"), []);
  t.equal(w.servers.get("127.0.0.2")!.messages.length, 1, "delivered exactly once");
  t.equal(w.servers.get("127.0.0.2")!.messages[0].data.toString().includes("hello"), true);
});

t.test("a deferred message whose time has come is picked up by the tick, across a restart", async (t) => {
  let refuse = true;
  const w = await world(t, { "dest.test": { A: ["127.0.0.2"] } },
    { "127.0.0.2": { rcpt: () => (refuse ? "451 4.3.0 later" : undefined) } }, { minBackoff: 1, maxBackoff: 1 });
  await w.drop(["bob@dest.test"]);
  t.match(await w.flush(), { deferred: 1 });
  await w.engine.stop();
  refuse = false;
  await new Promise((r) => setTimeout(r, 1100));
  const again = new MailEngine({ maildir: w.maildir, resolver: w.dns.address, port: w.port, log: () => undefined, fsync: false, dnsTimeout: 1 });
  t.teardown(() => again.stop());
  t.match(await again.flush(), { sent: 1, deferred: 0 }, "a new engine reads deferred/ and sends what is due");
});

t.test("past --max-queue-lifetime a deferred message bounces with the last error", async (t) => {
  const w = await world(t, { "dest.test": { A: ["127.0.0.2"] }, "talker.test": { A: ["127.0.0.3"] } },
    { "127.0.0.2": { rcpt: () => "451 4.3.0 still busy" }, "127.0.0.3": {} }, { maxQueueLifetime: 3600 });
  const id = await w.drop(["bob@dest.test"], "talker@talker.test", 7200);
  const summary = await w.flush();
  t.match(summary, { bounced: 1, sent: 1, messages: 2 }, "the expired message, and its report");
  t.match(w.lines.join("\n"), new RegExp(`${id.replace(".", "\\.")}: from=<talker@talker\\.test>, status=expired, returned to sender`));
  t.ok(w.events.some((e) => e.queueId === id && e.status === "bounced" && /expired after 2h 0m in the queue: host .* said: 451 4\.3\.0 still busy/.test(e.text)),
    "a bounced event with the last error");
  const report = w.servers.get("127.0.0.3")!.messages[0].data.toString();
  t.match(report, /Final-Recipient: rfc822; ?bob@dest\.test/);
  t.match(report, /Action: failed/);
  t.match(report, /Status: 4\.3\.0/);
  t.same(await listFolder(w.maildir, "deferred"), []);
});

t.test("a bounce is a report a real Postfix accepts and stores", async (t) => {
  if (!requirePostfix(t)) return;
  // Postfix refuses to relay for other domains (554 5.7.1) and stores mail for its own.
  const postfix = await startPostfix({ mainCf: { smtpd_relay_restrictions: "reject_unauth_destination" } });
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const id = `${Math.floor(Date.now() / 1000)}.1`;
  await dropQueueFile(maildir, id, queueFile(`talker@${postfix.domain}`, ["gone@elsewhere.test"],
    "X-Mudmail-Test: 7\nFrom: talker@test.example\nSubject: will bounce\n\nbody\n"));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `${postfix.host}:${postfix.port}`, log: (l) => lines.push(l), fsync: false, helo: "talker.test" });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { bounced: 1, sent: 1, messages: 2 }, "the message bounced; its report was sent in the same pass");
  t.match(lines.join("\n"), new RegExp(`${id.replace(".", "\\.")}: sender non-delivery notification: \\d+\\.\\d+`));
  const [stored] = await postfix.waitForMessages(1, 20_000);
  const text = stored.toString();
  t.match(text, /Return-Path: <>/, "Postfix stored it, from the null sender");
  t.match(text, /\nTo: <?talker@test\.example>?\n/);
  t.match(text, /Content-Type: multipart\/report; report-type=delivery-status;/);
  t.match(text, /Final-Recipient: rfc822; ?gone@elsewhere\.test/);
  t.match(text, /Action: failed/);
  t.match(text, /Status: 5\.7\.1/);
  t.match(text, /Diagnostic-Code: smtp; ?554 5\.7\.1 <gone@elsewhere\.test>: Relay access denied/);
  t.match(text, /Content-Type: text\/rfc822-headers/);
  t.match(text, /X-Mudmail-Test: 7/, "the original headers are returned");
  t.notMatch(text, /\nbody\n/, "not the original body");
});

t.test("--delay-warning: one 'delayed' report, not one per attempt", async (t) => {
  const w = await world(t, { "dest.test": { A: ["127.0.0.2"] }, "talker.test": { A: ["127.0.0.3"] } },
    { "127.0.0.2": { rcpt: () => "451 4.3.0 still busy" }, "127.0.0.3": {} }, { delayWarning: 1 });
  const id = await w.drop(["bob@dest.test"], "talker@talker.test", 7200);
  t.match(await w.flush(), { deferred: 1, sent: 1, messages: 2 }, "deferred, and the warning sent");
  const warning = w.servers.get("127.0.0.3")!.messages[0].data.toString();
  t.match(warning, /Subject: Delayed Mail \(still being retried\)/);
  t.match(warning, /Action: delayed/);
  t.match(warning, /Status: 4\.3\.0/);
  t.match(warning, /Will-Retry-Until: /);
  t.match(w.lines.join("\n"), new RegExp(`${id.replace(".", "\\.")}: sender delay notification: `));
  t.match(await w.flush(true), { deferred: 1, messages: 1 }, "the next attempt defers again");
  t.equal(w.servers.get("127.0.0.3")!.messages.length, 1, "no second warning");
  const book = JSON.parse(await fs.readFile(path.join(w.maildir, "deferred", `.${id}`), "utf8"));
  t.equal(book.warned, true, "remembered in the bookkeeping");
});

t.test("a dead relay with more messages than the read-ahead: the flush ends, all deferred", async (t) => {
  const dead = await freePort();
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  for (let n = 0; n < 120; n++) await dropQueueFile(maildir, `${now}.${n}`, queueFile("a@talker.test", [`r${n}@x.test`, `s${n}@x.test`], SIMPLE));
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${dead}`, log: () => undefined, fsync: false, recipientLimit: 1 });
  t.teardown(() => engine.stop());
  const errors: Error[] = [];
  engine.on("error", (e) => errors.push(e));
  const summary = await Promise.race([engine.flush(), new Promise<never>((_, reject) => setTimeout(() => reject(new Error("flush hung")), 20_000))]);
  t.match(summary, { sent: 0, deferred: 120, messages: 120, recipients: 240 });
  t.equal((await listFolder(maildir, "deferred")).length, 120);
  t.same(await listFolder(maildir, "outgoing_active"), []);
  t.same(errors, [], "no errors (each message settled once)");
});
