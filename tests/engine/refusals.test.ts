// Refusals at every stage against the scripted server (tests/helpers/engine-rig.ts): per
// recipient 450 / 550 / 250, all recipients refused (RSET, next message), MAIL FROM refused,
// EHLO refused (HELO), DATA and the final reply refused, and the null sender never bounced.
// A recipient that fails for good gets its DSN checked with expectDsn().

import * as fs from "node:fs";
import * as path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { type Message, type Session } from "../helpers/scripted-server.js";
import {
  FOLDERS, NOTIFICATION_LINE, droppedLine, setup, checkLog, expectDsn, mailCommands, testMails, inTestTransaction, rcptsOf, verbs, queueFile, SIMPLE_BODY, simple, PIPELINING_VARIANTS,
} from "../helpers/engine-rig.js";

t.test("3. per-recipient 450, 550 and 250; the 450 one is retried in the next flush", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(variant.name, async (tt) => {
      const rig = await setup(tt, {
        script: {
          pipelining: variant.pipelining,
          rcpt: (address) => {
            if (address === "busy@example.net") return "450 4.2.0 <busy@example.net>: Recipient address rejected: Mailbox busy";
            if (address === "nobody@example.net") return "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown";
            return undefined;
          },
        },
      });
      const body = "Subject: mixed\nFrom: a@example.org\n\nline one\n.dot line\n";
      const original = queueFile("a@example.org", ["busy@example.net", "nobody@example.net", "ok@example.net"], body);
      const id = rig.drop(original);

      const first = await rig.flush();
      // The message (3 recipients) is deferred; nobody@'s 550 makes a DSN to a@example.org,
      // a second message with one recipient, sent in the same flush.
      tt.match(first, { sent: 1, deferred: 1, bounced: 0, corrupt: 0, messages: 2, recipients: 4 }, "first flush: the message is deferred, its DSN sent");
      tt.same(rig.where(id), ["deferred"], "in deferred/ only");
      const rewritten = fs.readFileSync(path.join(rig.maildir, "deferred", id), "latin1");
      const [line1, line2] = rewritten.split("\n");
      tt.equal(line1, "a@example.org", "line 1 unchanged");
      tt.equal(line2.trim(), "busy@example.net", "line 2 rewritten to the 450 recipient alone");
      tt.equal(rewritten.slice(rewritten.indexOf("\n", line1.length + 1) + 1), body, "message lines unchanged");
      const book = JSON.parse(fs.readFileSync(path.join(rig.maildir, "deferred", `.${id}`), "utf8")) as Record<string, unknown>;
      tt.equal(book.attempts, 1, "bookkeeping: one attempt");
      tt.ok(typeof book.nextAttempt === "number" && book.nextAttempt > Date.now(), "bookkeeping: the next attempt is later");
      tt.match(String(book.lastError), /450 4\.2\.0 <busy@example\.net>: Recipient address rejected: Mailbox busy/, "bookkeeping: the last error");
      tt.equal(rig.originals().length, 1, "one test message accepted");
      tt.same(rig.originals()[0].to, ["ok@example.net"], "for the 250 recipient only");
      for (const session of rig.server.sessions) tt.same(session.pipeliningViolations, [], `no pipelining violation (session ${session.id})`);
      const dsnId = expectDsn(tt, rig, {
        id, sender: "a@example.org", file: original,
        failed: [{ rcpt: "nobody@example.net", status: "5.1.1", diagnostic: "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown" }],
      });

      const outcomes = checkLog(tt, rig, { dsns: 1 });
      tt.same(outcomes.map((o) => o.id), [id, id, id], "three outcome lines of the message (the DSN's apart)");
      const of = (to: string) => outcomes.find((o) => o.to === to);
      tt.equal(of("ok@example.net")?.status, "sent");
      tt.equal(of("busy@example.net")?.status, "deferred");
      tt.equal(of("busy@example.net")?.dsn, "4.2.0");
      tt.equal(of("busy@example.net")?.text,
        "host 127.0.0.1[127.0.0.1] said: 450 4.2.0 <busy@example.net>: Recipient address rejected: Mailbox busy (in reply to RCPT TO command)");
      tt.equal(of("nobody@example.net")?.status, "bounced");
      tt.equal(of("nobody@example.net")?.dsn, "5.1.1");
      tt.match(of("nobody@example.net")?.text ?? "", /^host \S+ said: 550 5\.1\.1 <nobody@example\.net>: Recipient address rejected: User unknown \(in reply to RCPT TO command\)$/);
      for (const o of outcomes) tt.equal(o.relay, rig.relay);
      tt.match(rig.events.bounced, [{ queueId: id, recipient: "nobody@example.net", status: "bounced", code: 550, dsn: "5.1.1", relay: rig.relay }]);
      tt.equal(rig.events.bounced.length, 1, "one bounced event");
      tt.match(rig.events.deferred, [{ queueId: id, recipient: "busy@example.net", status: "deferred", code: 450, dsn: "4.2.0" }]);
      tt.equal(rig.events.deferred.length, 1, "one deferred event");
      const sentEvents = rig.events.sent.filter((e) => e.queueId !== dsnId);
      tt.match(sentEvents, [{ queueId: id, recipient: "ok@example.net", status: "sent", code: 250, dsn: "2.0.0" }]);
      tt.equal(sentEvents.length, 1, "one sent event of the message (the DSN's apart)");
      tt.notOk(rig.lines.some((l) => l.endsWith(`${id}: removed`)), "not removed yet");

      // Second flush: the server now accepts; only the pending recipient gets the message.
      rig.server.script = { pipelining: variant.pipelining };
      tt.match(await rig.flush(), { sent: 0, deferred: 0, messages: 0 }, "not due yet: a plain flush leaves it waiting");
      const second = await rig.flush(undefined, true);
      tt.match(second, { sent: 1, deferred: 0, bounced: 0, corrupt: 0, messages: 1, recipients: 1 }, "second flush, forced: sent");
      tt.same(rig.where(id), [], "the file is gone");
      tt.same(fs.readdirSync(path.join(rig.maildir, "deferred")), [], "no bookkeeping left behind either");
      tt.equal(rig.originals().length, 2, "two test messages accepted in all");
      tt.equal(rig.dsns().length, 1, "no further DSN: nothing failed in the second flush");
      tt.same(rig.originals()[1].to, ["busy@example.net"], "just that recipient");
      const header = (m: Message, name: string) => new RegExp(`^${name}: (.*)\r$`, "mi").exec(m.data.toString("latin1"))?.[1];
      const [m1, m2] = rig.originals();
      tt.equal(header(m2, "Date"), header(m1, "Date"), "the added Date: is the same in both attempts");
      tt.equal(header(m2, "From"), "a@example.org", "From: kept");
      tt.equal(header(m2, "Message-ID"), header(m1, "Message-ID"), "the added Message-ID: is the same in both attempts");
      tt.same(rig.server.sessions.flatMap((x) => rcptsOf(x)),
        ["RCPT TO:<busy@example.net>", "RCPT TO:<nobody@example.net>", "RCPT TO:<ok@example.net>", "RCPT TO:<busy@example.net>"],
        "the bounced and the sent recipients are not tried again");
      tt.same(rig.server.sessions.flatMap((x) => rcptsOf(x, true)), ["RCPT TO:<a@example.org>"], "and the DSN's one RCPT, to the sender");
      checkLog(tt, rig, { dsns: 1 });
      tt.ok(rig.lines.some((l) => l.endsWith(`${id}: removed`)), "removed");
    });
  }
});

t.test("4. all recipients refused: RSET, then the next message on the same connection", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(variant.name, async (tt) => {
      // Whichever test message comes first has every recipient refused; the second is accepted.
      // So is the DSN for the refused one: the refusal is keyed on the session's first test
      // transaction, never on one from <>.
      const rig = await setup(tt, {
        engine: { maxConnections: 1 },
        script: {
          pipelining: variant.pipelining,
          rcpt: (_a, s) => (inTestTransaction(s) && testMails(s).length === 1 ? "550 5.1.1 User unknown" : undefined),
        },
      });
      const files = {
        "one@example.org": simple("one@example.org", ["x1@example.net", "y1@example.net"]),
        "two@example.org": simple("two@example.org", ["x2@example.net", "y2@example.net"]),
      };
      const one = rig.drop(files["one@example.org"]);
      const two = rig.drop(files["two@example.org"]);
      const summary = await rig.flush();
      // The refused message (bounced), the next one (sent), and the refused one's DSN (sent, one recipient).
      tt.match(summary, { sent: 2, deferred: 0, bounced: 1, corrupt: 0, messages: 3, recipients: 5 });
      tt.same(rig.where(one), [], "first message gone");
      tt.same(rig.where(two), [], "second message gone");
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
      const s = rig.server.sessions[0];
      tt.equal(testMails(s).length, 2, "both test messages on the first connection");
      tt.ok(rig.server.sessions.slice(1).every((x) => testMails(x).length === 0), "no test message on another connection");
      tt.ok(rig.server.connections <= 2, `the DSN on that connection or on one more (${rig.server.connections} connection(s))`);
      const v = verbs(s);
      const mails = v.flatMap((verb, i) => (verb === "MAIL" && !/^MAIL FROM:<>/i.test(s.commands[i]) ? [i] : []));
      const rset = v.indexOf("RSET");
      tt.ok(rset > v.indexOf("RCPT") && rset < mails[1], `RSET between the refused and the next transaction: ${v.join(" ")}`);
      // Without PIPELINING no DATA may follow a transaction without recipients.
      if (!variant.pipelining) tt.same(v.slice(0, 5), ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"], "no DATA without recipients");
      for (const x of rig.server.sessions) tt.same(x.pipeliningViolations, [], `no pipelining violation (session ${x.id})`);
      tt.equal(rig.originals().length, 1, "the next message was delivered");
      const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
      tt.not(rig.originals()[0]?.from, refusedFrom, "the delivered one is the second transaction");
      const outcomes = checkLog(tt, rig, { dsns: 1 });
      tt.same(outcomes.filter((o) => o.status === "bounced").length, 2, "both refused recipients bounced");
      tt.same(outcomes.filter((o) => o.status === "sent").length, 2, "both recipients of the next message sent");
      tt.equal(outcomes.length, 4, "no other outcome of the test messages");
      expectDsn(tt, rig, {
        id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
        failed: ["x", "y"].map((p) => ({ rcpt: `${p}${refusedFrom === "one@example.org" ? 1 : 2}@example.net`, status: "5.1.1", diagnostic: "550 5.1.1 User unknown" })),
      });
    });
  }

  await tt.test("the server answers 354 to a pipelined DATA with no recipient accepted", async (tt) => {
    // RFC 2920: the client must then send an empty message (".") and must not count it.
    const first = (s: Session) => inTestTransaction(s) && testMails(s).length === 1;
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: {
        rcpt: (_a, s) => (first(s) ? "550 5.1.1 User unknown" : undefined),
        onCommand: (c, s) => (c === "DATA" && first(s) ? "354 go ahead anyway" : undefined),
        onData: (m) => (m.to.length === 0 ? "554 5.5.1 Error: no valid recipients" : undefined),
      },
    });
    const files = {
      "one@example.org": simple("one@example.org", ["x1@example.net"]),
      "two@example.org": simple("two@example.org", ["x2@example.net"]),
    };
    const one = rig.drop(files["one@example.org"]);
    const two = rig.drop(files["two@example.org"]);
    const summary = await rig.flush();
    // The refused one bounced, the other sent, and the DSN for the refused one sent.
    tt.match(summary, { sent: 2, deferred: 0, bounced: 1, messages: 3, recipients: 3 });
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const s = rig.server.sessions[0];
    tt.equal(s.unaccepted.length, 1, "one empty message");
    tt.equal(s.unaccepted[0]?.raw.toString("latin1"), ".\r\n", "just the terminator");
    tt.same(rig.server.sessions.slice(1).flatMap((x) => x.unaccepted), [], "no other unaccepted message");
    tt.equal(rig.originals().length, 1, "the next message delivered");
    tt.ok(verbs(s).includes("RSET"), "RSET after the empty message");
    checkLog(tt, rig, { dsns: 1 });
    const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
    tt.not(rig.originals()[0]?.from, refusedFrom, "the delivered one is the second transaction");
    expectDsn(tt, rig, {
      id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
      failed: [{ rcpt: refusedFrom === "one@example.org" ? "x1@example.net" : "x2@example.net", status: "5.1.1", diagnostic: "550 5.1.1 User unknown" }],
    });
  });
});

t.test("5. MAIL FROM refused", async (tt) => {
  for (const variant of PIPELINING_VARIANTS) {
    await tt.test(`with 5xx, ${variant.name}: bounced, RSET, the next message goes through`, async (tt) => {
      const rig = await setup(tt, {
        engine: { maxConnections: 1 },
        script: {
          pipelining: variant.pipelining,
          // The session's first test message is refused; a DSN's MAIL FROM:<> never is.
          mail: (a, s) => (a !== "" && testMails(s).length === 1 ? "553 5.7.1 Sender address rejected: not owned by user" : undefined),
        },
      });
      const files = {
        "one@example.org": simple("one@example.org", ["a@example.net", "b@example.net"]),
        "two@example.org": simple("two@example.org", ["c@example.net", "d@example.net"]),
      };
      const one = rig.drop(files["one@example.org"]);
      const two = rig.drop(files["two@example.org"]);
      const summary = await rig.flush();
      // The refused message (bounced), the next one (sent) and the refused one's DSN (sent, one recipient).
      tt.match(summary, { sent: 2, deferred: 0, bounced: 1, corrupt: 0, messages: 3, recipients: 5 });
      for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
      const s = rig.server.sessions[0];
      tt.equal(testMails(s).length, 2, "both test messages on the first connection");
      tt.ok(rig.server.sessions.slice(1).every((x) => testMails(x).length === 0), "no test message on another connection");
      tt.ok(rig.server.connections <= 2, `the DSN on that connection or on one more (${rig.server.connections} connection(s))`);
      const v = verbs(s);
      const mails = v.flatMap((verb, i) => (verb === "MAIL" && !/^MAIL FROM:<>/i.test(s.commands[i]) ? [i] : []));
      tt.ok(v.includes("RSET") && v.indexOf("RSET") > mails[0] && v.indexOf("RSET") < mails[1], `RSET before the next MAIL: ${v.join(" ")}`);
      if (!variant.pipelining) tt.same(v.slice(0, 3), ["EHLO", "MAIL", "RSET"], "no RCPT after a refused MAIL");
      for (const x of rig.server.sessions) tt.same(x.pipeliningViolations, [], `no pipelining violation (session ${x.id})`);
      tt.equal(rig.originals().length, 1, "the next message delivered");
      const refusedFrom = /<([^>]*)>/.exec(testMails(s)[0])?.[1] as keyof typeof files;
      tt.not(rig.originals()[0]?.from, refusedFrom);
      const outcomes = checkLog(tt, rig, { dsns: 1 });
      const bounced = outcomes.filter((o) => o.status === "bounced");
      tt.equal(bounced.length, 2, "both recipients of the refused message bounced");
      for (const o of bounced) {
        tt.match(o.text, /^host \S+ said: 553 5\.7\.1 Sender address rejected: not owned by user \(in reply to MAIL FROM command\)$/);
        tt.equal(o.dsn, "5.7.1");
      }
      tt.equal(rig.events.bounced.length, 2, "two bounced events");
      tt.ok(rig.events.bounced.every((e) => e.code === 553), "bounced events carry code 553");
      const refused = refusedFrom === "one@example.org" ? ["a@example.net", "b@example.net"] : ["c@example.net", "d@example.net"];
      expectDsn(tt, rig, {
        id: refusedFrom === "one@example.org" ? one : two, sender: refusedFrom, file: files[refusedFrom],
        failed: refused.map((rcpt) => ({ rcpt, status: "5.7.1", diagnostic: "553 5.7.1 Sender address rejected: not owned by user" })),
      });
    });
  }

  await tt.test("with 4xx: deferred, the file waits in deferred/", async (tt) => {
    const rig = await setup(tt, { script: { mail: () => "451 4.3.0 Temporary lookup failure" } });
    const id = rig.drop(simple("one@example.org", ["a@example.net", "b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0, messages: 1 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), simple("one@example.org", ["a@example.net", "b@example.net"]), "file unchanged");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.equal(o.dsn, "4.3.0");
      tt.match(o.text, /said: 451 4\.3\.0 Temporary lookup failure \(in reply to MAIL FROM command\)$/);
    }
    tt.equal(rig.server.messages.length + rig.server.sessions.flatMap((s) => s.unaccepted).length, 0, "no data sent");
  });
});

t.test("6. EHLO refused: HELO is used and delivery works", async (tt) => {
  for (const refusal of ["502 5.5.2 Error: command not recognized", "550 5.7.1 go away with your EHLO"]) {
    await tt.test(refusal.slice(0, 3), async (tt) => {
      const rig = await setup(tt, { script: { ehlo: refusal } });
      const id = rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"]));
      const summary = await rig.flush();
      tt.match(summary, { sent: 1, deferred: 0, bounced: 0 });
      tt.same(rig.where(id), []);
      const s = rig.server.sessions[0];
      tt.same(verbs(s).slice(0, 2), ["EHLO", "HELO"], "HELO after the refused EHLO");
      tt.equal(s.helo, "client.test");
      tt.notOk(s.esmtp);
      tt.same(s.pipeliningViolations, [], "no pipelining without EHLO");
      tt.notMatch(mailCommands(s)[0], /SIZE=|BODY=/, "no ESMTP parameters after HELO");
      tt.equal(rig.server.messages.length, 1);
      checkLog(tt, rig);
    });
  }
});

t.test("7. DATA refused, and the final reply after the dot", async (tt) => {
  await tt.test("DATA 554: bounced, removed", async (tt) => {
    // DATA of the test message is refused; that of its DSN (MAIL FROM:<>) is not.
    const rig = await setup(tt, { script: { onCommand: (c, s) => (c === "DATA" && inTestTransaction(s) ? "554 5.7.1 DATA refused by policy" : undefined) } });
    const file = simple("a@example.org", ["b@example.net", "c@example.net"]);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 3 });
    tt.same(rig.where(id), []);
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "bounced");
      tt.equal(o.dsn, "5.7.1");
      tt.match(o.text, /said: 554 5\.7\.1 DATA refused by policy \(in reply to DATA command\)$/);
    }
    tt.equal(rig.server.sessions.flatMap((s) => [...s.messages, ...s.unaccepted]).filter((m) => m.from !== "").length, 0, "no message data of the test message sent");
    tt.ok(verbs(rig.server.sessions[0]).includes("RSET"), "RSET after the refused DATA");
    expectDsn(tt, rig, {
      id, sender: "a@example.org", file,
      failed: ["b@example.net", "c@example.net"].map((rcpt) => ({ rcpt, status: "5.7.1", diagnostic: "554 5.7.1 DATA refused by policy" })),
    });
  });

  await tt.test("451 after the dot: deferred, in deferred/ unchanged", async (tt) => {
    const rig = await setup(tt, { script: { onData: () => "451 4.3.0 Error: queue file write error" } });
    const content = simple("a@example.org", ["b@example.net", "c@example.net"]);
    const id = rig.drop(content);
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content, "file unchanged");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2);
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.equal(o.dsn, "4.3.0");
      tt.match(o.text, /said: 451 4\.3\.0 Error: queue file write error \(in reply to end of DATA command\)$/);
    }
    tt.equal(rig.server.sessions[0].unaccepted.length, 1, "the data was sent and refused");
  });

  await tt.test("552 after the dot: bounced, removed", async (tt) => {
    // The test message is refused after the dot; its DSN (from <>) is accepted.
    const rig = await setup(tt, { script: { onData: (m) => (m.from !== "" ? "552 5.3.4 Message too big for you" : undefined) } });
    const file = simple("a@example.org", ["b@example.net"]);
    const id = rig.drop(file);
    const summary = await rig.flush();
    // The message bounced; its DSN (one recipient) sent.
    tt.match(summary, { sent: 1, deferred: 0, bounced: 1, messages: 2, recipients: 2 });
    tt.same(rig.where(id), []);
    for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty`);
    const outcomes = checkLog(tt, rig, { dsns: 1 });
    tt.equal(outcomes.length, 1);
    tt.match(outcomes[0], { status: "bounced", dsn: "5.3.4" });
    tt.match(outcomes[0].text, /said: 552 5\.3\.4 Message too big for you \(in reply to end of DATA command\)$/);
    tt.equal(rig.server.sessions.flatMap((s) => s.unaccepted).length, 1, "the test message's data was sent and refused");
    expectDsn(tt, rig, { id, sender: "a@example.org", file, failed: [{ rcpt: "b@example.net", status: "5.3.4", diagnostic: "552 5.3.4 Message too big for you" }] });
  });
});

t.test("17. a message from the null sender that fails for good: bounced, never answered with a DSN", async (tt) => {
  const rig = await setup(tt, {
    script: { rcpt: (a) => (a === "gone@example.net" ? "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown" : undefined) },
  });
  // Line 1 "<>": a message from the null sender (a DSN of another system, say).
  const file = queueFile("<>", ["gone@example.net"], SIMPLE_BODY.replace("From: a@example.org", "From: MAILER-DAEMON@example.org"));
  const id = rig.drop(file);
  const summary = await rig.flush();
  tt.match(summary, { sent: 0, deferred: 0, bounced: 1, corrupt: 0, messages: 1, recipients: 1 }, "bounced, and no DSN queued or sent");
  for (const f of FOLDERS) tt.same(rig.files(f), [], `${f}/ is empty: nothing queued for the null sender`);

  const outcomes = checkLog(tt, rig, { dsns: 0 });
  tt.equal(outcomes.length, 1, "one outcome line");
  tt.match(outcomes[0], { id, to: "gone@example.net", status: "bounced", dsn: "5.1.1", relay: rig.relay });
  tt.match(outcomes[0]?.text ?? "", /^host \S+ said: 550 5\.1\.1 <gone@example\.net>: Recipient address rejected: User unknown \(in reply to RCPT TO command\)$/);
  tt.match(rig.events.bounced, [{ queueId: id, recipient: "gone@example.net", status: "bounced", code: 550, dsn: "5.1.1" }]);
  tt.equal(rig.events.bounced.length, 1, "one bounced event");
  tt.same(rig.events.sent, [], "no sent event: no DSN went anywhere");
  tt.same(rig.events.deferred, []);
  tt.equal(rig.lines.filter((l) => droppedLine(id).test(l)).length, 1, "logged: dropped, not bounced");
  tt.notOk(rig.lines.some((l) => NOTIFICATION_LINE.test(l)), "no sender non-delivery notification line");
  tt.ok(rig.lines.some((l) => l.endsWith(`: ${id}: removed`)), "removed");
  tt.same(rig.errors, [], "no error event");

  // The server saw the one transaction, MAIL FROM:<>, refused at RCPT, and nothing after it.
  const check = (when: string) => {
    tt.same(rig.server.sessions.flatMap(mailCommands).map((c) => c.replace(/^(MAIL FROM:<[^>]*>).*$/i, "$1")), ["MAIL FROM:<>"], `one MAIL, from <> (${when})`);
    tt.same(rig.server.sessions.flatMap((s) => rcptsOf(s, true)), ["RCPT TO:<gone@example.net>"], `one RCPT (${when})`);
    tt.same(rig.server.messages, [], `no message accepted (${when})`);
    tt.same(rig.server.sessions.flatMap((s) => s.unaccepted), [], `no message data sent (${when})`);
  };
  check("after the flush");
  await sleep(300);
  check("a moment later");
  tt.match(await rig.flush(), { sent: 0, deferred: 0, bounced: 0, messages: 0 }, "a second flush finds nothing to send");
  check("after a second flush");
});
