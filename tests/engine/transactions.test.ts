// Transactions against the scripted server (tests/helpers/engine-rig.ts): PIPELINING and
// without it, CRLF envelope lines, SIZE and 8BITMIME, the recipient limit (50 per transaction)
// and 452 too many recipients. Each test checks the flush counts, the spool folders, the log
// lines (SPEC section 4), the events and what the server saw.

import * as fs from "node:fs";
import * as path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { MailEngine } from "../../mail.js";
import { type Message } from "../helpers/scripted-server.js";
import {
  FOLDERS, bounded, stopTried, setup, checkLog, expectDsn, messageLines, crlf, mailCommands, testMails, inTestTransaction, verbs, queueFile, simple, PIPELINING_VARIANTS,
} from "../helpers/engine-rig.js";

t.test("1. happy path with PIPELINING: 3 messages, 2 recipients each, one connection", async (tt) => {
  const rig = await setup(tt, { proxy: true, engine: { maxConnections: 1 } });
  // A: LF line ends, no Date/Message-ID/From, lines that need dot-stuffing, a bare CR, no final newline.
  const aBody = "Subject: plain file\nTo: bob@example.net\n\nHello Bob.\n.leading dot\n..two dots\n.\nbare\rcr\nlast line without newline";
  const a = rig.drop(queueFile("alice@example.org", ["bob@example.net", "carol@example.net"], aBody));
  // B: CRLF message lines, has all three header fields; recipients in <> separated by a space.
  // (Envelope lines ending in CRLF are tested apart: see "queue file with CRLF envelope lines".)
  const bBody = "From: Dave <dave@example.org>\r\nDate: Mon, 23 Nov 2026 15:44:09 +0000\r\nMessage-ID: <b1@example.org>\r\nSubject: complete\r\n\r\nBody of B\r\n.\r\n";
  const b = rig.drop(`<dave@example.org>\n<erin@example.com> <frank@example.com>\n${bBody}`);
  // C: composed by send().
  const c = await rig.engine.send({ from: "gina@example.org", to: ["hal@example.com", "ivy@example.com"], subject: "composed", text: "Hi.\n.\nbye\n" });
  const files = new Map([a, b, c].map((id) => [id, fs.readFileSync(path.join(rig.maildir, "outgoing", id))]));

  const summary = await rig.flush();
  tt.match(summary, { sent: 3, deferred: 0, bounced: 0, corrupt: 0, messages: 3, recipients: 6 }, "flush counts");
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: every message left the queue`);

  const { server } = rig;
  tt.equal(server.connections, 1, "all three messages on ONE connection");
  const session = server.sessions[0];
  await server.waitFor(() => session.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
  tt.equal(session.commands.at(-1), "QUIT", "QUIT is the last command");
  tt.equal(mailCommands(session).length, 3, "three transactions");
  tt.same(session.pipeliningViolations, [], "no pipelining violation");
  tt.equal(server.messages.length, 3, "three messages accepted");

  // Pipelining: each MAIL/RCPT/RCPT/DATA group reached the server in one packet.
  const chunks = rig.proxy!.chunks[0] ?? [];
  const stream = Buffer.concat(chunks).toString("latin1");
  const ends: number[] = [];
  let offset = 0;
  for (const chunk of chunks) ends.push((offset += chunk.length));
  const chunkOf = (at: number) => ends.findIndex((end) => at < end);
  const groups = [...stream.matchAll(/MAIL FROM:<[^>]*>[^\r\n]*\r\nRCPT TO:<[^>]*>\r\nRCPT TO:<[^>]*>\r\nDATA\r\n/g)];
  tt.equal(groups.length, 3, "three MAIL/RCPT/RCPT/DATA groups, back to back");
  for (const g of groups) {
    tt.equal(chunkOf(g.index!), chunkOf(g.index! + g[0].length - 1), `one packet: ${JSON.stringify(g[0].slice(0, 40))}...`);
  }

  const byFrom = (from: string): Message | undefined => server.messages.find((m) => m.from === from);
  const ma = byFrom("alice@example.org");
  const mb = byFrom("dave@example.org");
  const mc = byFrom("gina@example.org");
  tt.same(ma?.to, ["bob@example.net", "carol@example.net"], "A's recipients");
  tt.same(mb?.to, ["erin@example.com", "frank@example.com"], "B's recipients");
  tt.same(mc?.to, ["hal@example.com", "ivy@example.com"], "C's recipients");

  // A lacks Date, Message-ID and From: the engine adds them, in front, then the file's lines.
  const aWire = crlf(messageLines(files.get(a)!));
  const aData = ma?.data ?? Buffer.alloc(0);
  const added = /^Date: [A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\nMessage-ID: <[^>\s]+@[^>\s]+>\r\nFrom: alice@example\.org\r\n/.exec(aData.toString("latin1"));
  tt.ok(added, `Date, Message-ID and From added to A: ${JSON.stringify(aData.subarray(0, 160).toString("latin1"))}`);
  if (added) tt.ok(aData.subarray(added[0].length).equals(aWire), "A's data: the file's message lines, CRLF, byte for byte");
  tt.ok(ma?.raw.toString("latin1").includes("\r\n..leading dot\r\n...two dots\r\n..\r\nbare\r\ncr\r\n"), "A was dot-stuffed on the wire");
  tt.ok(ma?.raw.toString("latin1").endsWith("last line without newline\r\n.\r\n"), "the last line was ended before the terminator");
  // B and C have all three: nothing added.
  tt.ok(mb?.data.equals(crlf(messageLines(files.get(b)!))), "B's data equals its message lines, nothing added");
  tt.ok(mc?.data.equals(crlf(messageLines(files.get(c)!))), "C's data equals its message lines, nothing added");
  tt.equal((mb?.data.toString("latin1").match(/^Date:/gim) ?? []).length, 1, "B keeps its one Date:");
  tt.equal((mb?.data.toString("latin1").match(/^Message-ID:/gim) ?? []).length, 1, "B keeps its one Message-ID:");
  // SIZE= declares the wire octets exactly.
  for (const m of server.messages) {
    const cmd = mailCommands(session).find((x) => x.startsWith(`MAIL FROM:<${m.from}>`)) ?? "";
    tt.equal(Number(/SIZE=(\d+)/.exec(cmd)?.[1]), m.raw.length, `SIZE= of ${m.from} is the wire size`);
    tt.notMatch(cmd, /BODY=8BITMIME/, "7-bit messages: no BODY=8BITMIME");
  }

  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.length, 6, "six log lines");
  for (const o of outcomes) {
    tt.equal(o.status, "sent");
    tt.equal(o.relay, rig.relay, "relay=host[ip]:port");
    tt.equal(o.dsn, "2.0.0");
    tt.match(o.text, /^250 2\.0\.0 Ok: queued as \d+$/, "the server's words");
  }
  for (const id of [a, b, c]) tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), `${id}: removed`);
  tt.equal(rig.events.sent.length, 6, "six sent events");
  tt.same(rig.errors, [], "no error events");
});

t.test("1b. a queue file whose envelope lines end in CRLF is delivered, not quarantined", async (tt) => {
  // SPEC 2: "LF or CRLF line ends"; queue.ts strips the CR of both envelope lines, so a
  // file written with CRLF throughout (as a Windows-side or network-fed writer does) must work.
  const rig = await setup(tt);
  const body = "From: Dave <dave@example.org>\r\nDate: Mon, 23 Nov 2026 15:44:09 +0000\r\nMessage-ID: <b1@example.org>\r\nSubject: crlf\r\n\r\nBody\r\n";
  const id = rig.drop(`<dave@example.org>\r\n<erin@example.com> <frank@example.com>\r\n${body}`);
  const single = rig.drop(`dave@example.org\r\nerin@example.com\r\n${body}`);
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, corrupt: 0, deferred: 0, bounced: 0 }, "both delivered, none corrupt");
  tt.same(rig.where(id), [], "the bracketed one left the queue");
  tt.same(rig.where(single), [], "the plain one left the queue");
  tt.same(rig.server.messages.map((m) => m.to).sort(), [["erin@example.com"], ["erin@example.com", "frank@example.com"]]);
  tt.same(rig.lines.filter((l) => l.includes("corrupt queue file")), [], "no corrupt-file log line");
  tt.equal(rig.server.messages.length, 2, "two messages accepted");
  tt.ok(rig.server.messages.every((m) => m.data.equals(Buffer.from(body))), "data byte for byte");
});

t.test("2. without PIPELINING: one command at a time, still delivered", async (tt) => {
  const rig = await setup(tt, { script: { pipelining: false }, engine: { maxConnections: 1 } });
  rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"], "one"));
  rig.drop(simple("d@example.org", ["e@example.net", "f@example.net"], "two"));
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, deferred: 0, bounced: 0, corrupt: 0, messages: 2, recipients: 4 });
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
  tt.equal(rig.server.connections, 1, "one connection");
  const s = rig.server.sessions[0];
  await rig.server.waitFor(() => s.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
  tt.same(s.pipeliningViolations, [], "never sent more before a reply");
  tt.notOk(s.extensions.includes("PIPELINING"), "PIPELINING was not offered");
  tt.same(verbs(s), ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]);
  tt.equal(rig.server.messages.length, 2);
  const outcomes = checkLog(tt, rig);
  tt.same(outcomes.map((o) => o.status), ["sent", "sent", "sent", "sent"]);
});

t.test("12. SIZE and 8BITMIME", async (tt) => {
  await tt.test("SIZE 10000, a 15000-byte message: bounced without MAIL", async (tt) => {
    // The limit leaves room for the DSN (a few kB), which goes through the same server.
    const rig = await setup(tt, { script: { size: 10000 } });
    const file = queueFile("a@example.org", ["b@example.net"], `Subject: big\n\n${`${"y".repeat(99)}\n`.repeat(150)}`);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 2 });
    tt.same(rig.where(id), [], "removed");
    tt.same(rig.server.sessions.flatMap(testMails), [], "no MAIL sent for the message");
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 1);
    tt.match(outcomes[0], { status: "bounced", dsn: "5.3.4", relay: rig.relay });
    tt.match(outcomes[0].text, /size limit 10000/, "names the size limit");
    tt.match(rig.events.bounced, [{ queueId: id, recipient: "b@example.net", code: 552, dsn: "5.3.4" }]);
    tt.equal(rig.events.bounced.length, 1, "one bounced event");
    // No server refused anything: the engine found the limit in the EHLO reply.
    expectDsn(tt, rig, { id, sender: "a@example.org", file, failed: [{ rcpt: "b@example.net", status: "5.3.4" }] });
  });

  await tt.test("SIZE: an oversized message pipelined behind a small one on the same connection", async (tt) => {
    // The big one is queued (send() while the flush runs) while the small one waits for its
    // 354, so the engine takes it in endOfData() and starts it pipelined behind the small
    // message's dot: the small message's dot reply must still be awaited and settled.
    let engine: MailEngine | null = null;
    let bigId = "";
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: {
        // Room for the DSN the big one makes, which goes through the same server.
        size: 10000,
        onCommand: async (c, s) => {
          if (c !== "DATA" || !inTestTransaction(s) || testMails(s).length !== 1 || !engine) return undefined;
          bigId = await engine.send({ from: "big@example.org", to: "b@example.net", subject: "big", text: "z".repeat(50000) });
          await sleep(300);
          return undefined;
        },
      },
    });
    engine = rig.engine;
    const small = rig.drop(simple("small@example.org", ["b@example.net"]));
    const summary = await rig.flush(4000).catch((err: Error) => {
      tt.fail(`flush did not end: ${err.message}; spool: ${JSON.stringify(Object.fromEntries(FOLDERS.map((f) => [f, rig.files(f)])))}; ` +
        `log: ${JSON.stringify(rig.lines)}; server: ${rig.server.transcripts()}`);
      return null;
    });
    tt.ok(bigId, "the big message was queued during the flush");
    tt.equal(rig.originals().length, 1, "the small message was accepted by the server");
    tt.equal(rig.originals()[0]?.from, "small@example.org");
    tt.match(rig.events.bounced, [{ queueId: bigId, dsn: "5.3.4" }], "the big one bounced on the size limit");
    tt.equal(rig.events.bounced.length, 1, "one bounced event");
    const dsnId = expectDsn(tt, rig, {
      id: bigId, sender: "big@example.org", failed: [{ rcpt: "b@example.net", status: "5.3.4" }],
      headerLines: [/^From: big@example\.org$/m, /^To: b@example\.net$/m, /^Subject: big$/m],
    });
    const sent = rig.events.sent.filter((e) => e.queueId !== dsnId);
    tt.match(sent, [{ queueId: small, recipient: "b@example.net" }], "the small one got its sent outcome");
    tt.equal(sent.length, 1, "one sent event besides the DSN's");
    tt.same(rig.where(small), [], "the small one, accepted by the server, left the queue");
    // The small one and the big one's DSN sent, the big one bounced.
    if (summary) tt.match(summary, { sent: 2, bounced: 1, deferred: 0, messages: 3 });
    stopTried.add(rig.engine);
    const stopped = await bounded(rig.engine.stop(), 2000, "engine.stop()").then(() => true, () => false);
    tt.ok(stopped, "stop() resolves");
    tt.same(rig.files("outgoing_active"), [], "nothing left in outgoing_active/ after stop()");
  });

  await tt.test("8BITMIME: BODY=8BITMIME for an 8-bit body when offered, not for 7-bit", async (tt) => {
    const rig = await setup(tt, { engine: { maxConnections: 1 } });
    const eight = rig.drop(Buffer.concat([Buffer.from("e8@example.org\nb@example.net\nSubject: 8\n\ncaf"), Buffer.from([0xc3, 0xa9]), Buffer.from(" \xff\n", "latin1")]));
    rig.drop(simple("s7@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 2, deferred: 0, bounced: 0 });
    const cmds = mailCommands(rig.server.sessions[0]);
    tt.match(cmds.find((c) => c.includes("<e8@")), /^MAIL FROM:<e8@example\.org> SIZE=\d+ BODY=8BITMIME$/);
    tt.notMatch(cmds.find((c) => c.includes("<s7@")), /BODY=/);
    const m8 = rig.server.messages.find((m) => m.from === "e8@example.org");
    tt.ok(m8?.data.includes(Buffer.from([0x63, 0x61, 0x66, 0xc3, 0xa9, 0x20, 0xff, 0x0d, 0x0a])), "8-bit bytes went through untouched");
    tt.same(rig.where(eight), []);
  });

  await tt.test("8BITMIME not offered: no BODY= parameter", async (tt) => {
    const rig = await setup(tt, { script: { withoutExtensions: ["8BITMIME"] } });
    rig.drop(Buffer.concat([Buffer.from("e8@example.org\nb@example.net\nSubject: 8\n\ncaf"), Buffer.from([0xc3, 0xa9, 0x0a])]));
    await rig.flush();
    tt.notMatch(mailCommands(rig.server.sessions[0])[0], /BODY=/);
  });
});

t.test("15. recipient limit: 120 recipients in 3 transactions of at most 50", async (tt) => {
  const rig = await setup(tt, { engine: { maxConnections: 1 } });
  const rcpts = Array.from({ length: 120 }, (_, i) => `r${i}@example.net`);
  const id = rig.drop(simple("a@example.org", rcpts));
  const summary = await rig.flush();
  tt.match(summary, { sent: 1, deferred: 0, bounced: 0, messages: 1, recipients: 120 });
  tt.same(rig.where(id), []);
  const sessions = rig.server.sessions;
  tt.equal(sessions.flatMap(mailCommands).length, 3, "three MAIL commands");
  tt.same(rig.server.messages.map((m) => m.to.length).sort((x, y) => x - y), [20, 50, 50], "50 + 50 + 20 recipients");
  tt.same(rig.server.messages.flatMap((m) => m.to).sort(), [...rcpts].sort(), "every recipient once");
  const data = rig.server.messages.map((m) => m.data.toString("latin1"));
  tt.ok(data.every((d) => d === data[0]), "the same data in each transaction");
  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.filter((o) => o.status === "sent").length, 120);
});

t.test("18. 452 4.5.3 too many recipients: the rest go in a new transaction at once", async (tt) => {
  const tooMany = "452 4.5.3 Error: too many recipients";
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(`2 recipients a transaction, ${variant.name}: 5 recipients in 3 transactions on one connection`, async (tt) => {
      const rig = await setup(tt, {
        script: { pipelining: variant.pipelining, rcpt: (_a, s) => (s.rcptTo.length >= 2 ? tooMany : undefined) },
      });
      const rcpts = Array.from({ length: 5 }, (_, i) => `r${i}@example.net`);
      const id = rig.drop(simple("a@example.org", rcpts));
      const summary = await rig.flush();
      tt.match(summary, { sent: 1, deferred: 0, bounced: 0, corrupt: 0, messages: 1, recipients: 5 }, "delivered to all in one flush");
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: nothing deferred`);
      tt.equal(rig.server.connections, 1, "one connection");
      const s = rig.server.sessions[0];
      await rig.server.waitFor(() => s.commands.includes("QUIT"), 3000, "QUIT").catch((e) => tt.fail(String(e)));
      tt.equal(mailCommands(s).length, 3, "three transactions");
      tt.same(rig.server.messages.map((m) => m.to), [["r0@example.net", "r1@example.net"], ["r2@example.net", "r3@example.net"], ["r4@example.net"]],
        "2 + 2 + 1 recipients, in order");
      tt.same(rig.server.messages.flatMap((m) => m.to).sort(), rcpts, "every recipient accepted once");
      const data = rig.server.messages.map((m) => m.data.toString("latin1"));
      tt.ok(data.every((d) => d === data[0]), "the same data in each transaction");
      tt.same(s.pipeliningViolations, [], "no pipelining violation");
      tt.equal(s.commands.at(-1), "QUIT", "QUIT is the last command");
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 5, "one outcome line per recipient: no deferred line for the 452s");
      tt.same(outcomes.map((o) => o.to).sort(), rcpts);
      for (const o of outcomes) tt.match(o, { id, status: "sent", dsn: "2.0.0", relay: rig.relay });
      tt.same(rig.events.deferred, [], "no deferred event");
      tt.same(rig.events.bounced, [], "no bounced event");
      tt.equal(rig.events.sent.length, 5);
      tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), "removed");
    });
  }

  await tt.test("452 4.5.3 to the very first RCPT: no progress, deferred, no endless loop", async (tt) => {
    const rig = await setup(tt, { script: { rcpt: () => tooMany } });
    const file = simple("a@example.org", ["r0@example.net", "r1@example.net"]);
    const id = rig.drop(file);
    const before = Date.now();
    const summary = await rig.flush(5000);
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0, messages: 1, recipients: 2 }, "deferred");
    tt.same(rig.where(id), ["deferred"], "in deferred/ only");
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), file, "file unchanged");
    const book = JSON.parse(fs.readFileSync(path.join(rig.maildir, "deferred", `.${id}`), "utf8")) as Record<string, unknown>;
    tt.equal(book.attempts, 1, "bookkeeping: one attempt");
    tt.ok(typeof book.nextAttempt === "number" && book.nextAttempt >= before + 300_000, `bookkeeping: next attempt after the 300 s minimum backoff (${book.nextAttempt})`);
    tt.match(String(book.lastError), /452 4\.5\.3 Error: too many recipients/, "bookkeeping: the last error");
    tt.equal(rig.server.sessions.flatMap(mailCommands).length, 1, "one transaction: none more without progress");
    tt.equal(rig.server.connections, 1, "one connection");
    tt.same(rig.server.sessions.flatMap((s) => [...s.messages, ...s.unaccepted]), [], "no message data sent");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2, "both recipients deferred");
    for (const o of outcomes) {
      tt.match(o, { id, status: "deferred", dsn: "4.5.3", relay: rig.relay });
      tt.match(o.text, /said: 452 4\.5\.3 Error: too many recipients \(in reply to RCPT TO command\)$/);
    }
    tt.equal(rig.events.deferred.length, 2);
    tt.ok(rig.events.deferred.every((e) => e.code === 452), "deferred events carry code 452");
    tt.match(await rig.flush(), { sent: 0, deferred: 0, messages: 0 }, "not due yet: a plain flush leaves it waiting");
    tt.equal(rig.server.connections, 1, "and does not connect");
  });
});
