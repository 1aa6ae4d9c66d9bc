// A flush makes no file system call on the host's thread: every claim, read, signature,
// rewrite, move, unlink and new message (a bounce) goes through the spool's worker thread, so
// a slow disk never holds the talker's loop. Every function of node:fs and node:fs/promises is
// watched on this thread (the worker has a module of its own) from flush() to its end, with
// a real Postfix taking, deferring and refusing mail, DKIM signing, a large message streamed
// from its file and a broken queue file quarantined.

import t from "tap";
import fs from "node:fs";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { generateDkimKey } from "../../dkim.js";
import { Spool, syncDir } from "../../queue.js";
import { requirePostfix, startPostfix } from "../helpers/postfix.js";
import { watchFs } from "../helpers/fs-calls.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

t.test("the watch sees our modules' calls, synchronous or not", async (t) => {
  const maildir = await tempMaildir("mudmail-host-thread-");
  t.teardown(() => fs.rmSync(path.dirname(maildir), { recursive: true, force: true }));
  await makeSpool(maildir);
  const probe = watchFs();
  try {
    const spool = new Spool(maildir);
    spool.lock();
    spool.unlock();
    await syncDir(maildir);
  } finally {
    probe.restore();
  }
  t.ok(probe.calls.includes("fs.symlinkSync"), `queue.ts's lock, through its namespace import: ${probe.calls.join(" ")}`);
  t.ok(probe.calls.includes("fs.promises.open"), "queue.ts's syncDir");
});

t.test("a flush makes no file system call on the host's thread", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix({
    mainCf: {
      smtpd_relay_restrictions: "reject_unauth_destination",
      smtpd_recipient_restrictions: "check_recipient_access inline:{ { later@test.example = 450 4.2.0 try later } }",
    },
  });
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir("mudmail-host-thread-");
  t.teardown(() => fs.rmSync(path.dirname(maildir), { recursive: true, force: true }));
  await makeSpool(maildir);
  const dir = path.dirname(maildir);
  await generateDkimKey("rsa", path.join(dir, "dkim.key"), { domain: "test.example", selector: "s1" });

  const lines: string[] = [];
  const engine = new MailEngine({
    maildir, relay: `${postfix.host}:${postfix.port}`, helo: "talker.test", log: (l) => lines.push(l),
    dkimDomain: "test.example", dkimSelector: "s1", dkimKey: path.join(dir, "dkim.key"),
  });
  t.teardown(() => engine.stop());

  // The engine's start (its first flush here) takes the spool's lock, a symbolic link made on
  // this thread, and watches .requests/ for the command line: once, whatever the queue holds.
  const first = watchFs();
  try {
    t.match(await engine.flush(), { messages: 0 }, "the start: an empty queue");
  } finally {
    first.restore();
  }
  t.same([...new Set(first.calls)].sort(), ["fs.symlinkSync", "fs.watch"], "the start: the lock and the watch, nothing else");
  t.ok(first.calls.length <= 3, `the start: ${first.calls.length} calls`);

  const now = Math.floor(Date.now() / 1000);
  const message = (subject: string, body: string) => `From: talker@test.example\nSubject: ${subject}\n\n${body}`;
  await dropQueueFile(maildir, `${now}.1`, queueFile("talker@test.example", ["ok@test.example"], message("small", "hello\n")));
  await dropQueueFile(maildir, `${now}.2`, queueFile("talker@test.example", ["ok@test.example"], message("large", ".dot line\nplain line\n".repeat(20_000))));
  await dropQueueFile(maildir, `${now}.3`, queueFile("talker@test.example", ["ok@test.example", "later@test.example"], message("half", "one of two\n")));
  await dropQueueFile(maildir, `${now}.4`, queueFile("talker@test.example", ["gone@elsewhere.test"], message("refused", "bounces\n")));
  await dropQueueFile(maildir, `${now}.5`, "no envelope at all");

  const probe = watchFs();
  let summary;
  try {
    summary = await engine.flush();
  } finally {
    probe.restore();
  }
  t.same(probe.calls, [], "no call of node:fs on the host's thread from flush() to its end");
  // What the flush did, so that the calls above were all needed ones.
  t.match(summary, { sent: 3, deferred: 1, bounced: 1, corrupt: 1, byRecipient: { sent: 4, deferred: 1, bounced: 1 } },
    `small, large and the bounce report sent, the half-delivered one deferred, one bounced, one quarantined (${JSON.stringify(summary)})`);
  const received = (await postfix.waitForMessages(4, 20_000)).map((m) => m.toString("latin1"));
  t.equal(received.length, 4, "small, large, half of the third, and the bounce report reached Postfix");
  for (const subject of ["small", "large", "half"]) {
    t.match(received.find((m) => m.includes(`Subject: ${subject}\n`)) ?? "", /^DKIM-Signature: /m, `${subject}: DKIM-signed on the way`);
  }
  t.same(await listFolder(maildir, "deferred"), [`${now}.3`], "the half-delivered message waits in deferred/");
  t.same(await listFolder(maildir, "corrupt"), [`${now}.5`], "the broken file is in corrupt/");
  t.match(lines.join("\n"), /sender non-delivery notification/, "the bounce report was made in the same flush");

  // send() writes and syncs its queue file through the same thread.
  const sending = watchFs();
  let id;
  try {
    id = await engine.send({ from: "talker@test.example", to: "ok@test.example", subject: "sent", text: "through send()" });
  } finally {
    sending.restore();
  }
  t.same(sending.calls, [], "send() made no call of node:fs on the host's thread");
  t.same(await listFolder(maildir, "outgoing"), [id], "and its queue file is in outgoing/");

  // A daemon: started (its own tick, the watch on outgoing/), then mail sent while it runs.
  const sentIds: string[] = [];
  engine.on("sent", (o: { queueId: string }) => sentIds.push(o.queueId));
  const sentSoon = async (queueId: string) => {
    for (let waited = 0; !sentIds.includes(queueId); waited += 20) {
      if (waited > 15_000) throw new Error(`${queueId} not sent within 15 s`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  engine.start();
  await sentSoon(id);
  const running = watchFs();
  let later = "";
  try {
    later = await engine.send({ from: "talker@test.example", to: "ok@test.example", subject: "while running", text: "sent by the daemon" });
    await sentSoon(later);
  } finally {
    running.restore();
  }
  t.same(running.calls, [], "a running engine took, sent and removed a message from send() with no call of node:fs on the host's thread");
});
