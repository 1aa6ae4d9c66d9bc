// A delivery whose settling fails (the move into deferred/ cannot be made: here the folder
// was replaced by a file, as a confused script or a broken disk would leave it) is not
// forgotten: the message stays in outgoing_active/, held by the engine, the failure is
// logged, and the next tick (or stop()) moves it once the folder is back. The peer is
// Postfix's smtp-sink refusing every RCPT with a 4xx.

import t, { type Test } from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine, type MailError } from "../../mail.js";
import { requirePostfix, startSmtpSink } from "../helpers/postfix.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

const MESSAGE = "From: a@talker.test\nSubject: s\n\nbody\n";

async function brokenDeferredRig(t: Test) {
  const sink = await startSmtpSink({ extraArgs: ["-r", "RCPT"] });
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const lines: string[] = [];
  const errors: MailError[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${sink.port}`, log: (l) => lines.push(l), tls: "none", helo: "talker.test",
    notifyClasses: [] }); // no postmaster notice of the resource problem: one message in the spool
  engine.on("error", (e: MailError) => errors.push(e));
  t.teardown(() => engine.stop());
  // The engine makes and checks its folders at its first pass; only then is deferred/ swapped for a file.
  await engine.flush();
  const id = await dropQueueFile(maildir, `${Math.floor(Date.now() / 1000)}.4`, queueFile("a@talker.test", ["b@x.test"], MESSAGE));
  const deferred = path.join(maildir, "deferred");
  await fs.rename(deferred, `${deferred}.away`);
  await fs.writeFile(deferred, "not a folder\n");
  const restore = async () => {
    await fs.rm(deferred);
    await fs.rename(`${deferred}.away`, deferred);
  };
  return { maildir, lines, errors, engine, id, restore };
}

t.test("a failed move into deferred/ keeps the message in outgoing_active/ and the next tick finishes it", async (t) => {
  if (!requirePostfix(t)) return;
  const rig = await brokenDeferredRig(t);
  const first = await rig.engine.flush({ force: true });
  t.equal(first.deferred, 1, "counted as deferred in the pass");
  t.same(await listFolder(rig.maildir, "outgoing_active"), [rig.id], "held in outgoing_active/");
  t.match(rig.lines.join("\n"), new RegExp(`warning: ${rig.id.replace(".", "\\.")}: cannot settle the queue file \\(defer, try 1\\): .*ENOTDIR.*tried again at the next tick`));
  t.match(rig.errors.map((e) => e.message).join("\n"), /cannot settle the queue file/, "and reported as an error event");
  t.ok(rig.errors.some((e) => e.code === "EQUEUE" && e.details.queueId === rig.id), "the error carries the queue id");

  const again = await rig.engine.flush({ force: true });
  t.same(await listFolder(rig.maildir, "outgoing_active"), [rig.id], "a tick with the folder still broken keeps it held");
  t.equal(again.messages, 0, "and does not send it again");

  await rig.restore();
  await rig.engine.flush();
  t.same(await listFolder(rig.maildir, "outgoing_active"), [], "the next tick moved it");
  t.same(await listFolder(rig.maildir, "deferred"), [rig.id], "into deferred/");
  const book = JSON.parse(await fs.readFile(path.join(rig.maildir, "deferred", `.${rig.id}`), "utf8"));
  t.equal(book.attempts, 1, "one attempt, decided once");
  t.match(rig.lines.join("\n"), new RegExp(`${rig.id.replace(".", "\\.")}: settled after 2 failed tries`));
});

t.test("stop() finishes a stranded settlement when it can", async (t) => {
  if (!requirePostfix(t)) return;
  const rig = await brokenDeferredRig(t);
  await rig.engine.flush({ force: true });
  t.same(await listFolder(rig.maildir, "outgoing_active"), [rig.id], "held in outgoing_active/");
  await rig.restore();
  await rig.engine.stop();
  t.same(await listFolder(rig.maildir, "outgoing_active"), [], "nothing left active after stop()");
  t.same(await listFolder(rig.maildir, "deferred"), [rig.id], "moved into deferred/");
});
