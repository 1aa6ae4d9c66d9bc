// Unit tests of queue.ts's queue control (postsuper's -d, -h, -H, -r) and its request files:
// bookkeeping follows, a claim wins or loses by one rename, held ids are never reused, an
// orphaned .X in hold/ is repaired, a request is taken once or withdrawn, never both.

import fs from "node:fs/promises";
import path from "node:path";
import t from "tap";
import { queueEntries } from "../../queue.js";
import { tempSpool, list, put, exists } from "../helpers/queue-units.js";

const MSG = "a@x.org\nr@y.org\nSubject: s\n\nbody\n";

t.test("hold and release move the message and its bookkeeping; requeue makes it due now", async (t) => {
  const spool = await tempSpool(t);
  await put(spool, "deferred", "1700000000.1", MSG);
  await put(spool, "deferred", ".1700000000.1", JSON.stringify({ attempts: 2, nextAttempt: Date.now() + 3600_000, lastError: "451 later" }));
  t.same(await spool.control("hold", "1700000000.1"), { done: ["1700000000.1"], skipped: [] });
  t.same(await list(spool, "hold"), [".1700000000.1", "1700000000.1"], "the bookkeeping follows");
  t.match((await queueEntries(spool))[0], { state: "hold", attempts: 2 });
  t.same(await spool.control("requeue", "1700000000.1"), { done: [], skipped: [{ id: "1700000000.1", folder: "hold" }] }, "a held message is not requeued");
  t.same(await spool.control("release", "ALL"), { done: ["1700000000.1"], skipped: [] });
  t.same(await list(spool, "outgoing"), [".1700000000.1", "1700000000.1"]);
  await spool.control("hold", "1700000000.1");
  await spool.control("release", "1700000000.1");
  await fs.rename(spool.pathOf("outgoing", "1700000000.1"), spool.pathOf("deferred", "1700000000.1"));
  await fs.rename(spool.pathOf("outgoing", ".1700000000.1"), spool.pathOf("deferred", ".1700000000.1"));
  t.same(await spool.control("requeue", "ALL"), { done: ["1700000000.1"], skipped: [] });
  t.match(await spool.readBookkeeping("1700000000.1", "outgoing"), { attempts: 2, nextAttempt: null, lastError: "451 later" }, "due now, attempts kept");
});

t.test("a claim and queue control: one rename wins", async (t) => {
  const spool = await tempSpool(t);
  await put(spool, "outgoing", "1700000000.2", MSG);
  const claimed = await spool.claim("1700000000.2");
  t.ok(claimed);
  t.same(await spool.control("hold", "1700000000.2"), { done: [], skipped: [{ id: "1700000000.2", folder: "outgoing_active" }] }, "being delivered: left alone");
  t.same(await spool.control("delete", "ALL"), { done: [], skipped: [] }, "ALL never touches outgoing_active/");
  await put(spool, "outgoing", "1700000000.3", MSG);
  t.same(await spool.control("hold", "1700000000.3"), { done: ["1700000000.3"], skipped: [] });
  t.equal(await spool.claim("1700000000.3"), null, "a claim after the hold finds nothing");
  t.same(await spool.control("delete", "1700000000.9"), { done: [], skipped: [{ id: "1700000000.9", folder: null }] });
  t.same(await spool.control("delete", "../outgoing_active/1700000000.2"), { done: [], skipped: [{ id: "../outgoing_active/1700000000.2", folder: null }] }, "only queue ids");
  t.ok(await exists(spool.pathOf("outgoing_active", "1700000000.2")));
});

t.test("delete ALL takes corrupt files whatever their names; held ids are never given to new mail", async (t) => {
  const spool = await tempSpool(t);
  await put(spool, "corrupt", "not a queue id", "junk");
  await put(spool, "corrupt", "1700000000.4", "junk");
  await put(spool, "hold", "1700000000.5", MSG);
  await put(spool, "hold", ".1700000000.5", "{}");
  const r = await spool.control("delete", "ALL");
  t.same(r.done.sort(), ["1700000000.4", "1700000000.5", "not a queue id"]);
  t.same(await list(spool, "hold"), [], "the bookkeeping goes too");
  t.same(await list(spool, "corrupt"), []);
  await put(spool, "hold", "1700000001.0", MSG);
  const id = await spool.create(MSG);
  t.not(id, "1700000001.0");
});

t.test("init repairs an orphaned .X beside a held message", async (t) => {
  const spool = await tempSpool(t);
  await put(spool, "hold", "1700000000.6", MSG);
  await put(spool, "outgoing", ".1700000000.6", JSON.stringify({ attempts: 1, nextAttempt: null, lastError: null }));
  await spool.init({ recover: true });
  t.same(await list(spool, "hold"), [".1700000000.6", "1700000000.6"], "moved beside its message (a hold that crashed between its renames)");
});

t.test("requests: taken once, or withdrawn; stale ones dropped", async (t) => {
  const spool = await tempSpool(t);
  const a = await spool.putRequest({ op: "hold", target: "ALL" });
  const b = await spool.putRequest({ op: "flush" });
  t.ok(await spool.withdrawRequest(b), "withdrawn before it was taken");
  const taken = await spool.takeRequests();
  t.same(taken, [{ name: a, body: { op: "hold", target: "ALL" } }], "only the one still there");
  t.same(await spool.takeRequests(), [], "taken once");
  t.notOk(await spool.withdrawRequest(a), "too late to withdraw a taken request");
  await spool.answerRequest(a, { ok: true, result: 1 });
  t.same(await spool.takeAnswer(a), { ok: true, result: 1 });
  t.equal(await spool.takeAnswer(a), null, "an answer is read once");
  const old = `${Date.now() - 120_000}.1.1`;
  await fs.writeFile(path.join(spool.dir, ".requests", old), JSON.stringify({ op: "delete", target: "ALL" }));
  t.same(await spool.takeRequests(), [], "a request older than a minute is dropped, not acted on");
  t.same(await fs.readdir(path.join(spool.dir, ".requests")), []);
  t.equal((await fs.stat(path.join(spool.dir, ".requests"))).mode & 0o777, 0o700);
});
