// The spool thread (spool-worker.ts) as the engine uses it for a body too large to be prepared
// whole: the pieces that cross from the worker are the bytes queue.ts's wireChunks makes, and
// each piece the caller is done with goes back to the worker to be filled again, so a large
// body does not leave a buffer behind for the garbage collector per piece.

import * as fs from "node:fs";
import * as path from "node:path";
import t, { type Test } from "tap";
import { Worker } from "node:worker_threads";
import { Spool, queueEntries, wireChunks } from "../../queue.js";
import { SpoolThread } from "../../spool-worker.js";
import { collect } from "../helpers/queue-units.js";
import { queueFile, tempMaildir } from "../helpers/spool-files.js";

/** Lines that make the stuffer work: dots to double, bare LF and CR to mend, long plain runs. */
function awkwardBody(bytes: number): Buffer {
  const lines = [".", "..dot first", "plain text line of some length, nothing to do here", "", "tab\tand trailing space ", "x".repeat(900)];
  const ends = ["\n", "\r\n", "\r"];
  let text = "";
  for (let i = 0; text.length < bytes; i++) text += lines[i % lines.length] + ends[i % ends.length];
  return Buffer.from(text.slice(0, bytes), "latin1");
}

/** A spool in a temp dir and its thread, both gone after the test. */
async function startThread(t: Test): Promise<{ maildir: string; thread: SpoolThread }> {
  const maildir = await tempMaildir("mudmail-spool-thread-");
  t.teardown(() => fs.rmSync(path.dirname(maildir), { recursive: true, force: true }));
  const thread = new SpoolThread(maildir, { fsync: false, helo: "client.test" });
  t.teardown(() => thread.close());
  await thread.init();
  return { maildir, thread };
}

t.test("a large body crosses from the worker intact, in buffers handed back", async (t) => {
  const { maildir, thread } = await startThread(t);

  // 3 MiB, and a bare-LF stretch that doubles on the wire (a piece larger than its read).
  const body = Buffer.concat([awkwardBody(3 * 1024 * 1024), Buffer.alloc(200 * 1024, 0x0a), Buffer.from("last line")]);
  const content = Buffer.concat([Buffer.from(queueFile("a@client.test", ["b@server.test"], "Subject: big\n\n")), body]);
  const id = await thread.create(content);
  const ready = await thread.prepare(id, "outgoing");
  if (ready.kind !== "ready") throw new Error(`prepare gave ${ready.kind}`);
  t.equal(ready.wire.bytes, null, "too large to be prepared whole: it is streamed");

  // A prefix larger than what crosses at once must still cross whole.
  const prefix = Buffer.from(`X-Large-Prefix: ${"p".repeat(300 * 1024)}\r\n`);
  const spool = new Spool(maildir, { fsync: false });
  const expected = await collect(wireChunks(spool, await spool.open(ready.id), prefix));

  const received: Buffer[] = [];
  const pieces: Buffer[] = [];
  for await (const piece of thread.wireChunks(ready.msg, prefix)) {
    received.push(Buffer.from(piece));
    pieces.push(piece);
  }
  const wire = Buffer.concat(received);
  t.equal(wire.length, expected.length, "as many octets as queue.ts's wireChunks makes");
  t.ok(wire.equals(expected), "the same octets");
  t.ok(wire.subarray(-5).equals(Buffer.from("\r\n.\r\n")), "ends with the end of data");
  // A crossing carries several stuffed pieces: at least half of its 256 KiB (a piece that
  // does not fit waits for the next), against one 64 KiB read's worth a crossing before.
  const most = Math.ceil(wire.length / (128 * 1024)) + 2;
  t.ok(pieces.length >= 10 && pieces.length <= most, `crossed in ${pieces.length} pieces (10 to ${most})`);
  // A piece handed back is transferred: on this side its memory is gone (detached).
  const handedBack = pieces.filter((p) => p.buffer.byteLength === 0).length;
  t.equal(handedBack, pieces.length - 1, "every piece but the last went back to the worker");
});

t.test("a body abandoned halfway keeps the piece its writer may still hold", async (t) => {
  const { thread } = await startThread(t);
  const id = await thread.create(Buffer.concat([Buffer.from(queueFile("a@client.test", ["b@server.test"], "Subject: big\n\n")), awkwardBody(2 * 1024 * 1024)]));
  const ready = await thread.prepare(id, "outgoing");
  if (ready.kind !== "ready") throw new Error(`prepare gave ${ready.kind}`);

  const pieces: Buffer[] = [];
  for await (const piece of thread.wireChunks(ready.msg, Buffer.alloc(0))) {
    pieces.push(piece);
    if (pieces.length === 3) break;
  }
  t.equal(pieces.length, 3);
  t.ok(pieces[2].buffer.byteLength > 0, "the piece being written when the body was abandoned is still ours");
  t.equal(pieces.filter((p) => p.buffer.byteLength === 0).length, 2, "the pieces written before it went back");
  // The thread still serves after an abandoned body.
  t.same(await thread.counts().then((c) => c.outgoing_active), 1, "the message is still claimed, one file");
});

t.test("a body whose spool thread was restarted midway fails; it is never continued or cut short quietly", async (t) => {
  const { thread } = await startThread(t);
  const id = await thread.create(Buffer.concat([Buffer.from(queueFile("a@client.test", ["b@server.test"], "Subject: big\n\n")), awkwardBody(2 * 1024 * 1024)]));
  const ready = await thread.prepare(id, "outgoing");
  if (ready.kind !== "ready") throw new Error(`prepare gave ${ready.kind}`);
  const body = thread.wireChunks(ready.msg, Buffer.alloc(0));
  const first = await body.next();
  t.equal(first.done, false, "a first piece came");
  // The thread ends (as after a crash) and the next request starts a new one.
  await thread.close();
  const received: Buffer[] = [];
  const ending = (async () => {
    for (let next = await body.next(); !next.done; next = await body.next()) received.push(next.value);
  })();
  await t.rejects(ending, /body \d+ is not open in this spool thread/, "the rest of the body fails with a reason");
  t.ok(received.length <= 1, "at most the piece already asked for before the restart came");
  t.notOk(Buffer.concat(received).includes(Buffer.from("\r\n.\r\n")), "no end of data was handed out");
});

t.test("the queue listing crosses in slices and arrives whole, oldest first", async (t) => {
  const { maildir, thread } = await startThread(t);
  // Several slices' worth, with ids out of order in the directory and across the seconds.
  const base = Math.floor(Date.now() / 1000) - 1000;
  const names: string[] = [];
  for (let i = 0; i < 1234; i++) names.push(`${base + (i % 7)}.${(i * 7919) % 1234}`);
  for (const name of names) {
    fs.writeFileSync(path.join(maildir, "outgoing", name), queueFile("a@client.test", [`r${name}@server.test`], "Subject: s\n\nbody\n"));
  }
  fs.writeFileSync(path.join(maildir, "outgoing", `.${names[5]}`), JSON.stringify({ attempts: 3, nextAttempt: null, lastError: "451 4.3.0 later" }));
  fs.mkdirSync(path.join(maildir, "corrupt"), { recursive: true });
  fs.writeFileSync(path.join(maildir, "corrupt", "not-a-queue-id"), "junk");
  const listed = await thread.queueEntries();
  t.equal(listed.length, 1235, "every message, and the file with a bad name in corrupt/");
  const direct = await queueEntries(new Spool(maildir, { fsync: false }));
  t.same(listed.map((e) => e.id), direct.map((e) => e.id), "the same order as the spool's own listing");
  const ids = listed.filter((e) => e.state === "queued").map((e) => e.id);
  const numeric = (id: string) => id.split(".").map(Number);
  const sorted = [...ids].sort((a, b) => numeric(a)[0] - numeric(b)[0] || numeric(a)[1] - numeric(b)[1]);
  t.same(ids, sorted, "by arrival, then by sub-second number (not as text: .10 after .9)");
  t.match(listed.find((e) => e.id === names[5]), { attempts: 3, lastError: "451 4.3.0 later" }, "bookkeeping read where there is one");
  t.match(listed.find((e) => e.id === names[6]), { attempts: 0, lastError: null }, "none where there is none");
});

t.test("a spool thread that dies while a piece is being written fails the body, and nothing goes unhandled", async (t) => {
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => { unhandled.push(reason); };
  process.on("unhandledRejection", onUnhandled);
  t.teardown(() => { process.off("unhandledRejection", onUnhandled); });
  // The thread is private to SpoolThread: it is caught as it is sent its first request.
  let worker: Worker | null = null;
  const postMessage = Worker.prototype.postMessage;
  Worker.prototype.postMessage = function (this: Worker, ...args: Parameters<Worker["postMessage"]>) {
    worker = this;
    return postMessage.apply(this, args);
  };
  t.teardown(() => { Worker.prototype.postMessage = postMessage; });
  const { thread } = await startThread(t);
  const id = await thread.create(Buffer.concat([Buffer.from(queueFile("a@client.test", ["b@server.test"], "Subject: big\n\n")), awkwardBody(3 * 1024 * 1024)]));
  const ready = await thread.prepare(id, "outgoing");
  if (ready.kind !== "ready") throw new Error(`prepare gave ${ready.kind}`);
  let pieces = 0;
  const writing = (async () => {
    for await (const _piece of thread.wireChunks(ready.msg, Buffer.alloc(0))) {
      // The thread ends while the second piece is "written", its next one asked for meanwhile.
      if (++pieces === 2) void worker!.terminate();
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  })();
  await t.rejects(writing, /spool worker for .* stopped|not open in this spool thread/, "the body fails with the reason");
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.same(unhandled.map(String), [], "no rejection went unhandled (it would end the host's process)");
  t.ok(pieces >= 2, `${pieces} pieces came before`);
});
