// stop() keeps SPEC section 3's promise: active messages go back to outgoing/. A message
// stopped before its final dot was never tried: it goes back untouched, no attempt counted.
// Only one whose dot went out unanswered is an attempt (the server may have it), as in
// Postfix and qmail. The server is scripted: a real one will not stall on request.

import t, { type Test } from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { startScriptedServer, type Script } from "../helpers/scripted-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

const MESSAGE = "From: a@talker.test\nSubject: s\n\nbody\n";

async function stalledRig(t: Test, script: Script) {
  const server = await startScriptedServer(script);
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, log: (l) => lines.push(l), tls: "none", helo: "talker.test" });
  t.teardown(() => engine.stop());
  return { server, maildir, lines, engine };
}

/** Starts a flush, waits until the server has seen `command`, then stops the engine. */
async function stopAfter(rig: Awaited<ReturnType<typeof stalledRig>>, seen: (commands: string[]) => boolean): Promise<void> {
  const flushed = rig.engine.flush();
  await rig.server.waitFor(() => rig.server.sessions.some((s) => seen(s.commands) || s.unaccepted.length > 0), 10_000, "the stall");
  await rig.engine.stop();
  await flushed;
}

for (const [stage, script, seen] of [
  ["the greeting", { greeting: { action: "silence" } }, (c: string[]) => c.length === 0] as const,
  // Without PIPELINING the client waits for each reply, so a silence is a real stall.
  ["RCPT", { pipelining: false, rcpt: () => ({ action: "silence" }) }, (c: string[]) => c.some((x) => x.startsWith("RCPT"))] as const,
  ["DATA", { pipelining: false, onCommand: (c: string) => (c === "DATA" ? { action: "silence" } : undefined) }, (c: string[]) => c.includes("DATA")] as const,
]) {
  t.test(`stop() while the server stalls at ${stage}: the message goes back to outgoing/ untouched, no attempt counted`, async (t) => {
    const rig = await stalledRig(t, script as Script);
    const now = Math.floor(Date.now() / 1000);
    const content = queueFile("a@talker.test", ["b@x.test", "c@x.test"], MESSAGE);
    const id = await dropQueueFile(rig.maildir, `${now}.7`, content);
    if (stage === "the greeting") {
      const flushed = rig.engine.flush();
      await rig.server.waitForSessions(1, 10_000);
      await new Promise((r) => setTimeout(r, 100));
      await rig.engine.stop();
      await flushed;
    } else {
      await stopAfter(rig, seen);
    }
    t.same(await listFolder(rig.maildir, "outgoing"), [id], "back in outgoing/ under its own id");
    t.same(await listFolder(rig.maildir, "deferred"), [], "not deferred");
    t.same(await listFolder(rig.maildir, "outgoing_active"), []);
    t.equal(await fs.readFile(path.join(rig.maildir, "outgoing", id), "utf8"), content, "byte for byte what was queued");
    await t.rejects(fs.access(path.join(rig.maildir, "outgoing", `.${id}`)), "no bookkeeping written: no attempt");
    t.notMatch(rig.lines.join("\n"), /status=deferred/, "no deferral logged");
  });
}

t.test("stop() after the final dot went out unanswered: that is an attempt, deferred with attempts=1", async (t) => {
  const rig = await stalledRig(t, { onData: () => ({ action: "silence" }) });
  const now = Math.floor(Date.now() / 1000);
  const id = await dropQueueFile(rig.maildir, `${now}.8`, queueFile("a@talker.test", ["b@x.test"], MESSAGE));
  await stopAfter(rig, () => false);
  t.same(await listFolder(rig.maildir, "deferred"), [id], "deferred");
  const book = JSON.parse(await fs.readFile(path.join(rig.maildir, "deferred", `.${id}`), "utf8"));
  t.equal(book.attempts, 1, "one attempt counted");
  t.match(rig.lines.join("\n"), new RegExp(`${id.replace(".", "\\.")}: to=<b@x\\.test>, .*status=deferred \\(delivery stopped`));
});

t.test("stop() on a message claimed from deferred/: back to outgoing/ with its bookkeeping as it was", async (t) => {
  const rig = await stalledRig(t, { mail: () => ({ action: "silence" }) });
  const id = "1700000000.3";
  await fs.writeFile(path.join(rig.maildir, "deferred", id), queueFile("a@talker.test", ["b@x.test"], MESSAGE));
  const book = { attempts: 2, nextAttempt: Date.now() - 1000, lastError: "451 4.3.0 try later" };
  await fs.writeFile(path.join(rig.maildir, "deferred", `.${id}`), JSON.stringify(book));
  await stopAfter(rig, (c) => c.some((x) => x.startsWith("MAIL")));
  t.same(await listFolder(rig.maildir, "outgoing"), [id], "in outgoing/");
  t.same(JSON.parse(await fs.readFile(path.join(rig.maildir, "outgoing", `.${id}`), "utf8")), book, "bookkeeping unchanged");
  t.same(await listFolder(rig.maildir, "deferred"), []);
});

t.test("stop() after one recipient was sent: the other goes back to outgoing/ alone, no attempt counted", async (t) => {
  // Without PIPELINING the client waits for each reply, so the silence is a real stall.
  const rig = await stalledRig(t, { pipelining: false, rcpt: (a: string) => (a === "c@x.test" ? { action: "silence" } : undefined) });
  // One recipient a transaction: b's goes through, c's stalls at its RCPT.
  const engine = new MailEngine({ maildir: rig.maildir, relay: `127.0.0.1:${rig.server.port}`, log: (l) => rig.lines.push(l), tls: "none", helo: "talker.test", recipientLimit: 1 });
  t.teardown(() => engine.stop());
  const id = await dropQueueFile(rig.maildir, `${Math.floor(Date.now() / 1000)}.9`, queueFile("a@talker.test", ["b@x.test", "c@x.test"], MESSAGE));
  let sentToB = false;
  engine.on("sent", (o) => { if (o.recipient === "b@x.test") sentToB = true; });
  const flushed = engine.flush();
  await rig.server.waitFor(() => sentToB && rig.server.sessions.some((s) => s.commands.includes("RCPT TO:<c@x.test>")), 10_000, "b sent, c stalled");
  await engine.stop();
  await flushed;
  t.same(await listFolder(rig.maildir, "outgoing"), [id], "back in outgoing/");
  t.match(await fs.readFile(path.join(rig.maildir, "outgoing", id), "utf8"), /^a@talker\.test\nc@x\.test\n/, "with only the recipient still to do");
  await t.rejects(fs.access(path.join(rig.maildir, "outgoing", `.${id}`)), "no bookkeeping: no attempt counted");
  t.same(await listFolder(rig.maildir, "deferred"), []);
});
