// Unit tests of queue.ts's Spool: the folders (mode 0700), ids never reused in any folder,
// claim / release / complete, recovery of crashed claims, move and quarantine that never
// overwrite, rewriting the recipients, the scan.

import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { CHUNK, WHOLE, FOLDERS, Spool, splitRecipients, type Folder } from "../../queue.js";
import { latin1, tempSpool, atTime, fixedNow, list, put, read, exists, collect, prng } from "../helpers/queue-units.js";

/* ------------------------------------------------------------------------------------ */
/* The spool                                                                             */

t.test("Spool.init creates the folders, mode 0700", async (t) => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-queue-test-"));
  t.teardown(() => fs.rm(root, { recursive: true, force: true }));
  const dir = path.join(root, "deep", "maildir");
  const spool = new Spool(dir);
  t.same(await spool.init(), { recovered: [] });
  t.equal((await fs.stat(dir)).mode & 0o777, 0o700, "the maildir");
  for (const f of ["tmp", "outgoing", "outgoing_active", "deferred", "corrupt"]) {
    t.ok(FOLDERS.includes(f as (typeof FOLDERS)[number]), `${f} is a spool folder`);
  }
  for (const f of FOLDERS) {
    const st = await fs.stat(path.join(dir, f));
    t.ok(st.isDirectory(), `${f}/ exists`);
    t.equal(st.mode & 0o777, 0o700, `${f}/ is mode 0700`);
  }
  // A second init is harmless and keeps what is there.
  await fs.writeFile(path.join(dir, "outgoing", "1.0"), "a@b.org\nr@x.org\n");
  t.same(await spool.init(), { recovered: [] });
  t.ok(await exists(path.join(dir, "outgoing", "1.0")));
});

t.test("Spool.create: 1,000 concurrent creates in one second", async (t) => {
  const spool = await tempSpool(t);
  const { ms, sec } = fixedNow();
  const bodies = Array.from({ length: 1000 }, (_, i) => `s${i}@x.org\nr${i}@x.org\nSubject: ${i}\n\n${"body ".repeat(i % 50)}${i}\n`);
  const ids = await atTime(ms, () => Promise.all(bodies.map((b) => spool.create(b))));
  t.equal(new Set(ids).size, 1000, "1,000 distinct ids");
  const bad = ids.filter((id) => !new RegExp(`^${sec}\\.(0|[1-9]\\d*)$`).test(id));
  t.same(bad, [], "every id is <seconds>.<n> in the fixed second");
  const subs = ids.map((id) => Number(id.split(".")[1])).sort((a, b) => a - b);
  t.same(subs, Array.from({ length: 1000 }, (_, i) => i), "subtimes 0..999: no ceiling at 100");
  const wrong: string[] = [];
  for (let i = 0; i < ids.length; i++) {
    if ((await read(spool, "outgoing", ids[i])).toString() !== bodies[i]) wrong.push(ids[i]);
  }
  t.same(wrong, [], "each file's content intact, under the id create() returned");
  t.equal((await list(spool, "outgoing")).length, 1000, "1,000 files in outgoing/");
  t.same(await list(spool, "tmp"), [], "nothing left in tmp/");
  for (const id of ids.slice(0, 5)) {
    t.equal((await fs.stat(spool.pathOf("outgoing", id))).mode & 0o777, 0o600, `${id} is mode 0600`);
  }
});

t.test("Spool.create never reuses an id taken in any folder", async (t) => {
  const spool = await tempSpool(t);
  const { ms, sec } = fixedNow();
  const taken: Array<[Folder, string]> = [
    ["outgoing_active", `${sec}.0`],
    ["deferred", `${sec}.1`],
    ["corrupt", `${sec}.2`],
    ["outgoing", `${sec}.3`],
    ["deferred", `${sec}.5`],
  ];
  for (const [folder, id] of taken) await put(spool, folder, id, `old ${folder} ${id}\n`);
  const ids = await atTime(ms, async () => [
    await spool.create("a@b.org\nr@x.org\n\none\n"),
    await spool.create("a@b.org\nr@x.org\n\ntwo\n"),
    await spool.create("a@b.org\nr@x.org\n\nthree\n"),
  ]);
  t.same(ids, [`${sec}.4`, `${sec}.6`, `${sec}.7`], "taken ids skipped");
  for (const [folder, id] of taken) {
    t.equal((await read(spool, folder, id)).toString(), `old ${folder} ${id}\n`, `${folder}/${id} untouched`);
  }
  t.same(await list(spool, "tmp"), []);

  // The clock stepping back does not bring old ids back.
  const later = await atTime(ms - 5000, () => spool.create("a@b.org\nr@x.org\n\nfour\n"));
  t.notOk(ids.includes(later) || taken.some(([, id]) => id === later), `clock step back: fresh id ${later}`);
  t.ok(await exists(spool.pathOf("outgoing", later)));
});

t.test("Spool.claim, release, complete", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const content = "a@b.org\nr@x.org\n\nbody\n";
  const id = await spool.create(content);
  t.same(await spool.claim(id), { id, booked: false }, "claimed under its own name");
  t.same(await list(spool, "outgoing"), [], "gone from outgoing/");
  t.same(await list(spool, "outgoing_active"), [id], "now in outgoing_active/");
  t.equal(await spool.claim(id), null, "a second claim finds nothing");
  t.equal(await spool.claim("1234567890.99"), null, "a missing id: null");

  t.equal(await spool.release(id), id, "released under the same id");
  t.same(await list(spool, "outgoing"), [id]);
  t.same(await list(spool, "outgoing_active"), []);

  t.same(await spool.claim(id), { id, booked: false });
  const book = { attempts: 2, nextAttempt: 1_800_000_000_000, lastError: "451 4.3.0 try later" };
  t.equal(await spool.release(id, "deferred", book), id, "deferred");
  t.same(await list(spool, "deferred"), [`.${id}`, id], "message and bookkeeping in deferred/");
  t.same(await spool.readBookkeeping(id, "deferred"), book, "bookkeeping readable");
  t.equal((await read(spool, "deferred", id)).toString(), content, "content unchanged");
  t.same(await list(spool, "outgoing_active"), []);

  t.same(await spool.claim(id, "deferred"), { id, booked: true }, "claimed from deferred/ with its bookkeeping");
  t.same(await list(spool, "deferred"), []);
  t.same(await list(spool, "outgoing_active"), [`.${id}`, id]);
  t.same(await spool.readBookkeeping(id, "outgoing_active"), book);

  await spool.complete(id);
  t.same(await list(spool, "outgoing_active"), [], "complete removes the message and its bookkeeping");
  t.equal(await spool.readBookkeeping(id, "outgoing_active"), null);
  await t.rejects(spool.complete(id), "completing a message that is not active fails");
});

t.test("Spool.claim never overwrites a message of the same name in outgoing_active/", async (t) => {
  // Another program may drop a file into outgoing/ under a name that is, at that moment,
  // claimed by a slot (the name left outgoing/ when it was claimed). Claiming it must not
  // destroy the message in flight. (The spool's lock means only this Spool claims.)
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing", "1700000003.0", "in flight\n");
  t.same(await spool.claim("1700000003.0"), { id: "1700000003.0", booked: false });
  await put(spool, "outgoing", "1700000003.0", "dropped later\n");
  const second = await spool.claim("1700000003.0");
  t.not(second?.id, "1700000003.0", "the second message is claimed under a fresh id");
  const contents: string[] = [];
  for (const f of ["outgoing", "outgoing_active", "deferred", "corrupt"] as const) {
    for (const name of await list(spool, f)) if (!name.startsWith(".")) contents.push((await read(spool, f, name)).toString());
  }
  t.same(contents.sort(), ["dropped later\n", "in flight\n"], "both messages still in the spool");
});

t.test("Spool.init({ recover: true }) puts crashed claims back", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing_active", "1700000000.0", "a@b.org\nr@x.org\n\nzero\n");
  await put(spool, "outgoing_active", "1700000000.1", "a@b.org\nr@x.org\n\none\n");
  await put(spool, "outgoing_active", ".1700000000.1", JSON.stringify({ attempts: 3, nextAttempt: null, lastError: "x" }));
  await put(spool, "outgoing", "1700000000.2", "a@b.org\nr@x.org\n\ntwo\n");

  const plain = new Spool(spool.dir);
  t.same(await plain.init(), { recovered: [] }, "without recover nothing moves");
  t.same(await list(spool, "outgoing_active"), [".1700000000.1", "1700000000.0", "1700000000.1"]);

  const { recovered } = await new Spool(spool.dir).init({ recover: true });
  t.same([...recovered].sort(), ["1700000000.0", "1700000000.1"]);
  t.same(await list(spool, "outgoing_active"), [], "outgoing_active/ emptied");
  t.same(await list(spool, "outgoing"), [".1700000000.1", "1700000000.0", "1700000000.1", "1700000000.2"]);
  t.equal((await read(spool, "outgoing", "1700000000.0")).toString(), "a@b.org\nr@x.org\n\nzero\n");
  t.equal((await spool.readBookkeeping("1700000000.1", "outgoing"))?.attempts, 3, "bookkeeping follows");
});

t.test("Spool.init({ recover: true }) with a name taken in outgoing/", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  await put(spool, "outgoing_active", "1700000000.7", "active\n");
  await put(spool, "outgoing", "1700000000.7", "queued\n");
  const { recovered } = await new Spool(spool.dir).init({ recover: true });
  const names = (await list(spool, "outgoing")).filter((n) => !n.startsWith("."));
  t.equal(names.length, 2, "both messages in outgoing/");
  t.equal((await read(spool, "outgoing", "1700000000.7")).toString(), "queued\n", "the queued one is not overwritten");
  const other = names.find((n) => n !== "1700000000.7")!;
  t.equal((await read(spool, "outgoing", other)).toString(), "active\n", "the recovered one under a fresh id");
  t.same(recovered, [other], "init reports the id the recovered message now has");
});

t.test("Spool.move never overwrites", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const id = "1700000001.0";
  await put(spool, "outgoing_active", id, "moving\n");
  await put(spool, "outgoing_active", `.${id}`, JSON.stringify({ attempts: 1, nextAttempt: null, lastError: "moving" }));
  await put(spool, "deferred", id, "staying\n");
  await put(spool, "deferred", `.${id}`, JSON.stringify({ attempts: 9, nextAttempt: null, lastError: "staying" }));
  const fresh = await spool.move(id, "outgoing_active", "deferred");
  t.not(fresh, id, "a fresh id");
  t.match(fresh, /^\d+\.\d+$/);
  t.equal((await read(spool, "deferred", id)).toString(), "staying\n", "the file already there is intact");
  t.equal((await read(spool, "deferred", fresh)).toString(), "moving\n", "the moved file is intact");
  t.equal((await spool.readBookkeeping(id, "deferred"))?.lastError, "staying", "its bookkeeping too");
  t.equal((await spool.readBookkeeping(fresh, "deferred"))?.lastError, "moving", "bookkeeping follows to the fresh id");
  t.same(await list(spool, "outgoing_active"), [], "nothing left behind");

  // Without a clash the id stays.
  await put(spool, "outgoing", "1700000001.5", "plain\n");
  t.equal(await spool.move("1700000001.5", "outgoing", "deferred"), "1700000001.5");
  t.equal((await read(spool, "deferred", "1700000001.5")).toString(), "plain\n");
});

t.test("Spool.move: the fresh id is not taken in any other folder", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const { ms, sec } = fixedNow();
  // Another program's messages hold the next ids of this second, in other folders.
  await put(spool, "outgoing", `${sec}.0`, "other 0\n");
  await put(spool, "outgoing_active", `${sec}.1`, "other 1\n");
  await put(spool, "corrupt", `${sec}.2`, "other 2\n");
  await put(spool, "outgoing_active", "1700000002.0", "moving\n");
  await put(spool, "deferred", "1700000002.0", "staying\n");
  const fresh = await atTime(ms, () => spool.move("1700000002.0", "outgoing_active", "deferred"));
  t.equal((await read(spool, "deferred", fresh)).toString(), "moving\n");
  const elsewhere: string[] = [];
  for (const f of ["outgoing", "outgoing_active", "corrupt"] as const) {
    if (await exists(spool.pathOf(f, fresh))) elsewhere.push(`${f}/${fresh}`);
  }
  t.same(elsewhere, [], `fresh id ${fresh} names no other message (one id, one message)`);
});

t.test("Spool.quarantine", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const id = await spool.create("not an address\nr@x.org\n\nbody\n");
  const reason = 'bad sender "not an address": not of the form addr@domain';
  t.equal(await spool.quarantine(id, "outgoing", reason), id);
  t.same(await list(spool, "outgoing"), [], "gone from outgoing/");
  t.same(await list(spool, "corrupt"), [`.${id}`, id]);
  t.equal((await spool.readBookkeeping(id, "corrupt"))?.lastError, reason, "the reason is readable");
  t.equal((await read(spool, "corrupt", id)).toString(), "not an address\nr@x.org\n\nbody\n", "content kept for a human");

  // A clash in corrupt/: fresh id, both kept, reason under the new id.
  await put(spool, "outgoing_active", id, "second\n");
  const other = await spool.quarantine(id, "outgoing_active", "second reason");
  t.not(other, id);
  t.equal((await read(spool, "corrupt", id)).toString(), "not an address\nr@x.org\n\nbody\n");
  t.equal((await read(spool, "corrupt", other)).toString(), "second\n");
  t.equal((await spool.readBookkeeping(other, "corrupt"))?.lastError, "second reason");
  t.equal((await spool.readBookkeeping(id, "corrupt"))?.lastError, reason);
  t.same(await list(spool, "outgoing_active"), []);
  t.same(await list(spool, "tmp"), []);
});

t.test("Spool.rewriteRecipients", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rest = latin1("Subject: x\r\nFrom: a@b.org\r\n\r\nbody\n.\nline \0 with NUL \xe9\rend");
  const file = Buffer.concat([latin1("a@b.org\nr1@x.org, r2@x.org \"john doe\"@x.org, r3@x.org\n"), rest]);
  const id = await spool.create(file);
  await spool.claim(id);
  const msg = await spool.open(id);
  t.same(msg.recipients, ["r1@x.org", "r2@x.org", '"john doe"@x.org', "r3@x.org"]);
  await spool.rewriteRecipients(msg, ["r2@x.org", '"john doe"@x.org']);
  t.same(msg.recipients, ["r2@x.org", '"john doe"@x.org'], "the message object follows");
  const after = await read(spool, "outgoing_active", id);
  const lines = after.toString("latin1").split("\n");
  t.equal(lines[0], "a@b.org", "line 1 unchanged");
  t.same(splitRecipients(lines[1]), ["r2@x.org", '"john doe"@x.org'], "line 2 holds the pending ones");
  const firstTwo = lines[0].length + lines[1].length + 2;
  t.ok(after.subarray(firstTwo).equals(rest), "message lines byte for byte");
  const again = await spool.open(id);
  t.same(again.recipients, ["r2@x.org", '"john doe"@x.org'], "re-read");
  t.equal(again.sender, "a@b.org");
  t.ok(again.head.equals(rest));
  t.same(await list(spool, "tmp"), [], "nothing left in tmp/");
  t.same(await list(spool, "outgoing_active"), [id]);

  // Null sender stays the null sender.
  const nid = await spool.create(Buffer.concat([latin1("<>\nr1@x.org r2@x.org\n"), rest]));
  await spool.claim(nid);
  const nmsg = await spool.open(nid);
  await spool.rewriteRecipients(nmsg, ["r1@x.org"]);
  const nagain = await spool.open(nid);
  t.equal(nagain.sender, "", "null sender kept");
  t.same(nagain.recipients, ["r1@x.org"]);
  t.ok(nagain.head.equals(rest));
});

t.test("Spool.rewriteRecipients: a message too big to be read whole (read in CHUNK pieces)", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rnd = prng(7);
  const rest = Buffer.alloc(WHOLE + 3 * CHUNK + 12345);
  for (let i = 0; i < rest.length; i++) rest[i] = Math.floor(rnd() * 256);
  const head = latin1("<sender@b.org>\n<r1@x.org>,<r2@x.org>\n");
  const id = await spool.create(Buffer.concat([head, rest]));
  await spool.claim(id);
  const msg = await spool.open(id);
  t.equal(msg.whole, false);
  await spool.rewriteRecipients(msg, ["r2@x.org"]);
  const after = await read(spool, "outgoing_active", id);
  const text = after.toString("latin1");
  const nl1 = text.indexOf("\n");
  const nl2 = text.indexOf("\n", nl1 + 1);
  t.ok(after.subarray(nl2 + 1).equals(rest), "every byte of the message lines kept");
  t.equal(after.length - nl2 - 1, rest.length);
  const again = await spool.open(id);
  t.equal(again.sender, "sender@b.org");
  t.same(again.recipients, ["r2@x.org"]);
  t.ok((await collect(spool.content(again))).equals(rest));
  t.same(await list(spool, "tmp"), []);
});

t.test("Spool.scan", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  for (const name of ["1700000000.0", "1700000000.12", "abc_def-1", ".1700000000.0", ".hidden", ".", "bad name", "x".repeat(200), "\u00fcml", "a:b"]) {
    if (name === ".") continue;
    await put(spool, "outgoing", name, "a@b.org\nr@x.org\n");
  }
  const got = await spool.scan();
  t.same([...got.ids].sort(), ["1700000000.0", "1700000000.12", "abc_def-1"], "queue ids");
  t.same([...got.booked].sort(), ["1700000000.0", "hidden"], "dot files: bookkeeping, never ids");
  t.same([...got.badNames].sort(), ["a:b", "bad name", "x".repeat(200), "\u00fcml"].sort(), "bad names apart");
  for (const n of [...got.ids, ...got.badNames]) t.notOk(n.startsWith("."), `${n} is not a dot file`);
  const empty = await spool.scan("deferred");
  t.same(empty.ids, []);
  t.same(empty.badNames, []);
});
