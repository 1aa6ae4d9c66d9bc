// Group commit: sessions that finish their messages at once share one taking of the mailbox
// locks and one fsync per mailbox, and each session's 250 comes only after that fsync (the
// journal's "synced" line, written after it, comes before the client sees its 250, and the
// mailbox already holds the whole message when it does); a message that cannot be written
// fails alone and every mailbox stays whole.

import t from "tap";
import fs from "node:fs/promises";
import { readFileSync } from "node:fs";
import { requireTool } from "../helpers/postfix.js";
import { RawClient } from "../helpers/smtp-raw.js";
import {
  USER, PRLIMIT, sleep, setup, envelope, splitMbox, readLatin1, queuedAs, limitFileSize, type Setup,
} from "../helpers/receiver-rig.js";

const OTHER = "other@local.test";

/** Message n's body as sent (CRLF) and as the mbox holds it (LF). */
function body(n: number, lines: number): { wire: string; stored: string } {
  let text = `Subject: group ${n}\nX-Seq: ${n}\n\n`;
  for (let k = 0; k < lines; k++) text += `message ${n} line ${k}\n`;
  return { wire: text.replace(/\n/g, "\r\n"), stored: text };
}

/** Opens a session and sends a whole message (the final dot included); its reply is still to come. */
async function sendMessage(t: Parameters<typeof setup>[0], s: Setup, n: number, to: string[], lines: number): Promise<RawClient> {
  const c = await s.connect();
  await envelope(t, c, `s${n}@x.test`, to);
  await c.writeAndDrain(`${body(n, lines).wire}.\r\n`);
  return c;
}

t.test("sessions at once: one fsync for the group, each 250 only after it, the message whole in the mailbox when it comes", async (t) => {
  const s = await setup(t, {}, [USER, OTHER]);
  const lock = `${s.mbox()}.lock`;
  // Another program holds the mailbox: the messages finished meanwhile gather into one group.
  await fs.writeFile(lock, "12345\n");
  const N = 8;
  const LINES = 50;
  // Half the messages are for USER alone, half for USER and OTHER: two groups share USER's mailbox.
  const recipients = (n: number) => (n % 2 === 0 ? [USER] : [USER, OTHER]);
  const clients = await Promise.all(Array.from({ length: N }, (_, n) => sendMessage(t, s, n, recipients(n), LINES)));
  await sleep(500);
  t.same(clients.map((c) => c.queued), Array(N).fill(0), "no reply while the mailbox is locked");
  const seenWhole: boolean[] = [];
  const replies = clients.map(async (c, n) => {
    const reply = await c.text(10_000);
    // The moment the 250 arrives: the journal (same array) and the mailboxes as they are now.
    s.lines.push(`client ${n} got: ${reply}`);
    const { stored } = body(n, LINES);
    seenWhole[n] = recipients(n).every((r) => splitMbox(readFileSync(s.mbox(r), "latin1")).some((m) => m.startsWith(`From s${n}@x.test `) && m.endsWith(`\n${stored}\n`)));
    return reply;
  });
  await fs.unlink(lock);
  const got = await Promise.all(replies);
  t.equal(got.filter((r) => queuedAs.test(r)).length, N, `${N} × 250`);
  t.same(seenWhole, Array(N).fill(true), "each message was whole in each of its mailboxes when its 250 arrived");

  const synced = s.lines.filter((l) => / - synced \d+ messages? \(/.test(l));
  const idsOf = (line: string) => /\(([0-9A-F,]+)\)/.exec(line)![1].split(",");
  for (const [n, reply] of got.entries()) {
    const id = queuedAs.exec(reply)![1];
    const syncedAt = s.lines.findIndex((l) => / - synced /.test(l) && idsOf(l).includes(id));
    const repliedAt = s.lines.indexOf(`client ${n} got: ${reply}`);
    t.ok(syncedAt >= 0 && syncedAt < repliedAt, `message ${n} (${id}): synced (line ${syncedAt}) before its 250 reached the client (line ${repliedAt})`);
    t.equal(synced.filter((l) => idsOf(l).includes(id)).length, 1, `${id} is in one group`);
  }
  t.ok(synced.length < N, `the messages shared fsyncs: ${synced.length} groups for ${N} messages:\n${synced.join("\n")}`);
  t.ok(synced.some((l) => idsOf(l).length > 1), "a group of several sessions' messages");

  for (const [user, expect] of [[USER, N], [OTHER, N / 2]] as const) {
    const messages = splitMbox(await readLatin1(s.mbox(user)));
    t.equal(messages.length, expect, `${user}: ${expect} messages`);
    const whole = messages.filter((m) => {
      const n = Number(/\nX-Seq: (\d+)\n/.exec(m)?.[1]);
      return m.startsWith(`From s${n}@x.test `) && m.endsWith(`\n${body(n, LINES).stored}\n`);
    });
    t.equal(whole.length, expect, `${user}: each one whole and contiguous`);
  }
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  t.equal(s.messages.length, N, `${N} message events`);
});

t.test("in a group, a message that cannot be written fails alone; every mailbox holds whole messages, those answered 250", async (t) => {
  if (!requireTool(t, PRLIMIT)) return;
  const a = "a@local.test";
  const b = "b@local.test";
  const s = await setup(t, {}, [a, b]);
  const old = "From old@x.test Mon Nov 23 10:00:00 2026\nSubject: old\n\nold\n\n";
  await fs.writeFile(s.mbox(a), old);
  // b's mailbox (sparse) has room for two of the messages below, not three (each is its body
  // and 150 to 400 octets of From_ line, trace fields and blank line): writes past the file
  // size limit fail with EFBIG.
  const N = 5;
  const LINES = 400;
  const size = body(0, LINES).stored.length;
  const ROOM = 2 * (size + 400) + Math.floor(size / 2);
  if (ROOM >= 3 * (size + 150)) throw new Error(`test setup: ${ROOM} octets would hold three messages`);
  const limit = 64 * 1024 * 1024;
  await fs.writeFile(s.mbox(b), "");
  await fs.truncate(s.mbox(b), limit - ROOM);
  const restoreLimit = await limitFileSize(t, limit);
  const lock = `${s.mbox(a)}.lock`;
  await fs.writeFile(lock, "12345\n");
  const clients = await Promise.all(Array.from({ length: N }, (_, n) => sendMessage(t, s, n, [a, b], LINES)));
  await sleep(500);
  await fs.unlink(lock);
  const got = await Promise.all(clients.map((c) => c.text(10_000)));
  await restoreLimit();
  const stored = got.flatMap((r, n) => (queuedAs.test(r) ? [n] : []));
  const refused = got.filter((r) => r === "451 4.3.0 Error: queue file write error");
  t.equal(stored.length, 2, `two fit: ${got.join(" | ")}`);
  t.equal(refused.length, N - 2, "the others are answered 451");

  const aText = await readLatin1(s.mbox(a));
  t.ok(aText.startsWith(old), "a's old mail is untouched");
  const bText = (await fs.readFile(s.mbox(b))).subarray(limit - ROOM).toString("latin1");
  t.ok((await fs.stat(s.mbox(b))).size <= limit, "b's mailbox within the limit");
  for (const [user, text] of [[a, aText.slice(old.length)], [b, bText]] as const) {
    const messages = splitMbox(text);
    const seqs = messages.map((m) => Number(/\nX-Seq: (\d+)\n/.exec(m)?.[1]));
    t.same([...seqs].sort(), stored, `${user}: exactly the messages answered 250`);
    t.ok(messages.every((m, i) => m.startsWith(`From s${seqs[i]}@x.test `) && m.endsWith(`\n${body(seqs[i], LINES).stored}\n`)), `${user}: each one whole`);
  }
  await s.waitForLine(/error: delivering [0-9A-F]{12}: .*EFBIG/);
  const ids = got.filter((r) => queuedAs.test(r)).map((r) => queuedAs.exec(r)![1]).sort();
  const synced = s.lines.filter((l) => / - synced /.test(l)).flatMap((l) => /\(([0-9A-F,]+)\)/.exec(l)![1].split(","));
  t.same(synced.sort(), ids, "the synced lines name exactly the stored messages");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  t.equal(s.messages.length, 2);
});
