// The engine's life as a host program sees it: start, tick, stop at awkward moments, the
// spool lock, listeners that misbehave. Each case ends on its own, bounded in time.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine, type Outcome } from "../../mail.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "../helpers/spool-files.js";

const MESSAGE = "From: a@talker.test\nSubject: s\n\nbody\n";
const within = <T>(p: Promise<T>, ms: number, what: string) =>
  Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms))]);

t.test("stop() while the first scan of a large outgoing/ runs resolves, and puts nothing in two places", async (t) => {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  await Promise.all(Array.from({ length: 5000 }, (_, n) => fs.writeFile(path.join(maildir, "outgoing", `${now}.${n}`), `a@talker.test\nb@x.test\n${MESSAGE}`)));
  const engine = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  engine.start();
  await new Promise((r) => setTimeout(r, 5));
  await within(engine.stop(), 10_000, "stop()");
  t.same(await listFolder(maildir, "outgoing_active"), [], "nothing left active");
  const count = (await listFolder(maildir, "outgoing")).length + (await listFolder(maildir, "deferred")).length;
  t.equal(count, 5000, "every message is in exactly one folder");
});

t.test("stop() right after start() releases the lock; a second engine can take the spool", async (t) => {
  const maildir = await tempMaildir();
  const first = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  first.start();
  await within(first.stop(), 5000, "stop()");
  await new Promise((r) => setTimeout(r, 200));
  await t.rejects(fs.lstat(path.join(maildir, ".mudmail.lock")), "no lock left behind");
  const second = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  t.match(await within(second.flush(), 5000, "flush()"), { messages: 0 }, "the second engine runs");
  await second.stop();
});

t.test("a spool locked by another engine: refused with a clear error, and taken once free", async (t) => {
  const maildir = await tempMaildir();
  const holder = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  await holder.flush();
  const other = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  await t.rejects(other.flush(), { code: "ELOCKED", message: /sending from/ }, "refused while held");
  await holder.stop();
  t.match(await within(other.flush(), 5000, "flush()"), { messages: 0 }, "taken once free (the refusal is not remembered)");
  await other.stop();
});

t.test("a lock left by a process that died is taken over", async (t) => {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  await fs.writeFile(path.join(maildir, ".mudmail.lock"), "999999999\n");
  const engine = new MailEngine({ maildir, relay: "127.0.0.1:1", log: () => undefined });
  t.match(await within(engine.flush(), 5000, "flush()"), { messages: 0 });
  await engine.stop();
});

t.test("a listener that calls stop() or throws does not leave a session half-way or a timer behind", async (t) => {
  const server = await startScriptedServer({ pipelining: false, rcpt: (a) => (a.startsWith("no") ? "550 5.1.1 unknown" : undefined) });
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  await dropQueueFile(maildir, `${now}.1`, queueFile("<>", ["no@x.test", "yes@x.test"], MESSAGE));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, log: (l) => lines.push(l), rcptTimeout: 300 });
  engine.on("bounced", () => { throw new Error("a host bug"); });
  let stopped: Promise<void> | null = null;
  engine.on("sent", (_o: Outcome) => { stopped ??= engine.stop(); });
  const summary = await within(engine.flush(), 10_000, "flush()");
  await within(stopped ?? Promise.resolve(), 5000, "stop()");
  t.match(summary, { messages: 1 });
  t.ok(lines.some((l) => /warning: a "bounced" listener threw: a host bug/.test(l)), "the listener's error is logged");
  t.equal(server.messages.length, 1, "the accepted recipient still got the message");
  t.same(await listFolder(maildir, "outgoing_active"), []);
  // No stage timer may keep the process alive after stop(): tap's own timeout would catch a 300 s one.
});

t.test("flush() after stop() works again", async (t) => {
  const server = await startScriptedServer();
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, log: () => undefined });
  await engine.flush();
  await engine.stop();
  await engine.send({ from: "a@talker.test", to: "b@x.test", subject: "after stop", text: "hi" });
  t.match(await within(engine.flush(), 5000, "flush()"), { sent: 1 });
  await engine.stop();
});
