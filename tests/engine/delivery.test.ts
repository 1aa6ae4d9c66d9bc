// Integration against a real Postfix: smtp-sink for volume, a private Postfix smtpd whose
// mailbox is read back and compared byte for byte with what was queued.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { requirePostfix, requireTool, startPostfix, startSmtpSink, SMTP_SINK } from "../helpers/postfix.js";
import {
  dropQueueFile, fromTestHeader, listFolder, makeSpool, normaliseLineEnds, queueFile, tempMaildir, testMessage, testNumber,
} from "../helpers/spool-files.js";

t.test("1,000 messages through 5 slots reach a real Postfix smtpd byte for byte, over few connections", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix();
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const expected = new Map<number, string>();
  const second = Math.floor(Date.now() / 1000);
  for (let n = 0; n < 1000; n++) {
    // Every third file uses CRLF line ends, as a C program on another system might write them.
    const message = testMessage(n, { crlf: n % 3 === 0, bodyLines: n % 50 });
    expected.set(n, normaliseLineEnds(message));
    await dropQueueFile(maildir, `${second}.${n}`, queueFile("talker@test.example", [`user${n}@${postfix.domain}`], message));
  }
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `${postfix.host}:${postfix.port}`, maxConnections: 5, log: (l) => lines.push(l), fsync: false });
  const summary = await engine.flush();
  await engine.stop();
  t.match(summary, { sent: 1000, deferred: 0, bounced: 0, corrupt: 0, messages: 1000, recipients: 1000 });
  t.same(await listFolder(maildir, "outgoing"), [], "outgoing/ is empty");
  t.same(await listFolder(maildir, "outgoing_active"), [], "outgoing_active/ is empty");

  const stored = await postfix.waitForMessages(1000, 60_000);
  t.equal(stored.length, 1000, "Postfix stored exactly 1,000 messages");
  const seen = new Set<number>();
  let intact = 0;
  for (const copy of stored) {
    const n = testNumber(copy);
    if (n === null || seen.has(n)) continue;
    seen.add(n);
    if (fromTestHeader(copy) === expected.get(n)) intact++;
    else t.equal(fromTestHeader(copy), expected.get(n), `message ${n} is stored as queued`);
  }
  t.equal(seen.size, 1000, "every message arrived once");
  t.equal(intact, 1000, "every message is byte for byte what was queued (line ends as the server stores them)");

  const connects = (await postfix.log()).split("\n").filter((l) => /smtpd\[\d+\]: connect from/.test(l)).length;
  t.ok(connects >= 1 && connects <= 20, `far fewer connections than messages (${connects})`);
  const sentLines = lines.filter((l) => / mudmail\/smtp\[\d+\]: \S+: to=<user\d+@test\.example>, relay=\S+\[127\.0\.0\.1\]:\d+, delay=[\d.]+, delays=[\d.]+\/[\d.]+\/[\d.]+\/[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as \w+\)$/.test(l));
  t.equal(sentLines.length, 1000, "one Postfix-shaped log line per recipient");
  t.equal(lines.filter((l) => / \S+: removed$/.test(l)).length, 1000, "one removed line per message");
});

t.test("headers the message lacks are added; a body-only message gets a header block", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix();
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  await dropQueueFile(maildir, "1700000000.1", queueFile("talker@test.example", [`a@${postfix.domain}`], "X-Mudmail-Test: 1\nSubject: no date\n\nbody one\n"));
  await dropQueueFile(maildir, "1700000000.2", queueFile("talker@test.example", [`b@${postfix.domain}`], "just a body line, X-Mudmail-Test: 2\nsecond line\n"));
  const engine = new MailEngine({ maildir, relay: `${postfix.host}:${postfix.port}`, log: () => undefined, fsync: false });
  t.match(await engine.flush(), { sent: 2 });
  await engine.stop();
  const stored = (await postfix.waitForMessages(2, 20_000)).map(String);
  const one = stored.find((m) => m.includes("X-Mudmail-Test: 1\n"))!;
  t.match(one, /\nDate: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\n/, "Date added");
  t.match(one, /\nMessage-ID: <20231114221320\.1700000000\.1@[^>]+>\n/, "Message-ID added, derived from the queue id");
  t.match(one, /\nFrom: talker@test\.example\n/, "From added from the envelope sender");
  t.match(one, /\nSubject: no date\n\nbody one\n$/, "the message follows unchanged");
  const two = stored.find((m) => m.includes("just a body line"))!;
  t.match(two, /\nFrom: talker@test\.example\n\njust a body line, X-Mudmail-Test: 2\nsecond line\n$/, "a blank line separates the added headers from the body");
});

t.test("smtp-sink takes a burst through every slot", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const second = Math.floor(Date.now() / 1000);
  for (let n = 0; n < 500; n++) {
    await dropQueueFile(maildir, `${second}.${n}`, queueFile("<talker@test.example>", [`a${n}@test.example`, `b${n}@test.example`], testMessage(n)));
  }
  const engine = new MailEngine({ maildir, relay: `${sink.host}:${sink.port}`, maxConnections: 5, log: () => undefined, fsync: false });
  const summary = await engine.flush();
  await engine.stop();
  t.match(summary, { sent: 500, deferred: 0, bounced: 0, corrupt: 0, recipients: 1000 });
  t.same(await listFolder(maildir, "outgoing"), []);
  t.same(await listFolder(maildir, "outgoing_active"), []);
  const files = await fs.readdir(path.join(maildir, "tmp"));
  t.same(files, [], "nothing left in tmp/");
});
