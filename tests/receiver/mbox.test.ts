// The receiver's mailboxes: the mbox byte for byte, pipelining, concurrent sessions, a client
// that disconnects mid-DATA, SMTP smuggling, the size limit with bounded memory, failures that
// must leave every mailbox whole, mail.lock, and the hourly journal.

import t, { type Test } from "tap";
import fs from "node:fs/promises";
import { constants as fsConstants, existsSync, statSync, readdirSync } from "node:fs";
import path from "node:path";
import { RawClient } from "../helpers/smtp-raw.js";
import { run } from "../helpers/daemon.js";
import { requireTool } from "../helpers/postfix.js";
import {
  HOST, USER, PRLIMIT, sleep, setup, envelope, withoutDates, splitMbox, readLatin1, queuedAs, limitFileSize,
} from "../helpers/receiver-rig.js";

const MKFIFO = "/usr/bin/mkfifo";

/* ------------------------------------------------------------------------------------ */
/* Delivery: mbox byte for byte                                                          */

t.test("mbox byte for byte: From_ line, trace headers, >From quoting, dot lines, 8-bit, line ends", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  await envelope(t, c, "sender@x.test");
  const wire =
    "From: sender@x.test\r\n" +
    "To: user@local.test\r\n" +
    "Subject: mbox test\r\n" +
    "\r\n" +
    "From the start of a line\r\n" +
    ">From already quoted\r\n" +
    ">>From twice quoted\r\n" +
    "From\r\n" +
    " From indented\r\n" +
    "..leading dot\r\n" +
    "..\r\n" +
    "...\r\n" +
    ".From after a lax client's dot\r\n" +
    "caf\xc3\xa9 in UTF-8, \xe9\xff in Latin-1\r\n" +
    "bare\nFrom after a bare LF\r\n" +
    "bare\rCR\r\n" +
    "last line\r\n" +
    ".\r\n";
  c.write(Buffer.from(wire, "latin1"));
  const first = (await c.text()).match(queuedAs);
  t.ok(first, "queued");
  // The second message: HELO (SMTP, not ESMTP), the null sender, an empty body.
  t.equal(await c.cmd("HELO old.client"), `250 ${HOST}`);
  t.equal(await c.cmd("MAIL FROM:<>"), "250 2.1.0 Ok");
  t.equal(await c.cmd("RCPT TO:<USER@local.test>"), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write(".\r\n");
  const second = (await c.text()).match(queuedAs);
  t.ok(second, "an empty message is queued too");
  t.match(await c.cmd("QUIT"), /^221 /);

  const body =
    "From: sender@x.test\n" +
    "To: user@local.test\n" +
    "Subject: mbox test\n" +
    "\n" +
    ">From the start of a line\n" +
    ">>From already quoted\n" +
    ">>>From twice quoted\n" +
    "From\n" +
    " From indented\n" +
    ".leading dot\n" +
    ".\n" +
    "..\n" +
    ">From after a lax client's dot\n" +
    "caf\xc3\xa9 in UTF-8, \xe9\xff in Latin-1\n" +
    "bare\n>From after a bare LF\n" +
    "bare\rCR\n" +
    "last line\n";
  const expected =
    "From sender@x.test DATE\n" +
    "Return-Path: <sender@x.test>\n" +
    "Received: from client.test ([127.0.0.1])\n" +
    `\tby ${HOST} (mudmail) with ESMTP id ${first![1]}\n` +
    "\tfor <user@local.test>; DATE\n" +
    body +
    "\n" +
    "From MAILER-DAEMON DATE\n" +
    "Return-Path: <>\n" +
    "Received: from old.client ([127.0.0.1])\n" +
    `\tby ${HOST} (mudmail) with SMTP id ${second![1]}\n` +
    "\tfor <USER@local.test>; DATE\n" +
    "\n";
  const actual = await readLatin1(s.mbox());
  t.equal(withoutDates(actual), expected, "the mailbox, byte for byte (dates aside)");
  t.match(actual, /^From sender@x\.test [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\n/, "asctime date in the From_ line");
  t.equal(s.messages.length, 2);
  const wireSize = Buffer.byteLength(wire.slice(0, -3).replace(/^\.(.)/gm, "$1"), "latin1");
  t.match(s.messages[0], { id: first![1], from: "sender@x.test", to: [USER], size: wireSize, mailboxes: [s.mbox()] }, "the message event");
  t.match(s.messages[1], { id: second![1], from: "", to: ["USER@local.test"], size: 0, mailboxes: [s.mbox()] });
  t.equal((statSync(s.mbox()).mode & 0o777).toString(8), "600", "mailbox mode 0600");
  t.notOk(existsSync(`${s.mbox()}.lock`), "no lock left behind");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
});

t.test("messages on either side of 64 KB (held in memory, or in a temp file) are stored byte for byte", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  const sizes = [65_535, 65_536, 65_537, 200_001]; // octets as stored (LF line ends), header included
  const expected: string[] = [];
  const received: number[] = [];
  for (const [n, size] of sizes.entries()) {
    await envelope(t, c, `s${n}@x.test`);
    let text = `Subject: size ${size}\n\n`;
    for (let k = 0; text.length < size; k++) text += `${String(k).padStart(8, "0")} ${"x".repeat(54)}\n`;
    text = text.slice(0, size - 1) + "\n";
    t.equal(text.length, size);
    received.push(size + text.split("\n").length - 1);
    await c.writeAndDrain(`${text.replace(/\n/g, "\r\n")}.\r\n`);
    const id = queuedAs.exec(await c.text(10_000))?.[1];
    t.ok(id, `${size} octets: queued`);
    expected.push(`From s${n}@x.test DATE\nReturn-Path: <s${n}@x.test>\nReceived: from client.test ([127.0.0.1])\n` +
      `\tby ${HOST} (mudmail) with ESMTP id ${id}\n\tfor <${USER}>; DATE\n${text}\n`);
  }
  t.equal(withoutDates(await readLatin1(s.mbox())), expected.join(""), "the mailbox, byte for byte (dates aside)");
  t.same(s.messages.map((m) => m.size), received, "sizes as received (CRLF)");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
});

t.test("PIPELINING: a whole session in one packet, and the same one byte at a time", async (t) => {
  const s = await setup(t, {}, [USER, "other@local.test"]);
  const session = (n: number) =>
    "EHLO client.test\r\n" +
    "MAIL FROM:<a@x.test> BODY=8BITMIME\r\n" +
    "RCPT TO:<user@local.test>\r\n" +
    "RCPT TO:<nobody@local.test>\r\n" +
    "RCPT TO:<other@local.test>\r\n" +
    "DATA\r\n" +
    `Subject: pipelined ${n}\r\n\r\n..dot\r\nbody ${n}\r\n.\r\n` +
    "MAIL FROM:<b@x.test>\r\n" +
    "RCPT TO:<user@local.test>\r\n" +
    "DATA\r\n" +
    `Subject: second ${n}\r\n\r\nbody\r\n.\r\n` +
    "QUIT\r\n";
  const expect = async (c: RawClient) => {
    t.match(await c.text(), /^250-mx\.local\.test\n/);
    t.equal(await c.text(), "250 2.1.0 Ok");
    t.equal(await c.text(), "250 2.1.5 Ok");
    t.match(await c.text(), /^550 5\.1\.1 <nobody@local\.test>/);
    t.equal(await c.text(), "250 2.1.5 Ok");
    t.equal(await c.text(), "354 End data with <CR><LF>.<CR><LF>");
    t.match(await c.text(), queuedAs);
    t.equal(await c.text(), "250 2.1.0 Ok");
    t.equal(await c.text(), "250 2.1.5 Ok");
    t.equal(await c.text(), "354 End data with <CR><LF>.<CR><LF>");
    t.match(await c.text(), queuedAs);
    t.match(await c.text(), /^221 /);
    await c.waitClosed();
  };
  const a = await s.connect();
  a.write(session(1));
  await expect(a);
  const b = await s.connect();
  for (const byte of Buffer.from(session(2))) {
    b.write(Buffer.from([byte]));
    await new Promise((r) => setImmediate(r));
  }
  await expect(b);
  const user = splitMbox(await readLatin1(s.mbox()));
  const other = splitMbox(await readLatin1(s.mbox("other@local.test")));
  t.equal(user.length, 4, "4 messages for user");
  t.equal(other.length, 2, "2 for other");
  t.match(user[0], /\nSubject: pipelined 1\n\n\.dot\nbody 1\n\n$/);
  t.match(user[2], /\nSubject: pipelined 2\n\n\.dot\nbody 2\n\n$/);
  t.match(s.messages[0], { from: "a@x.test", to: [USER, "other@local.test"], mailboxes: [s.mbox(), s.mbox("other@local.test")] });
});

t.test("20 concurrent sessions to one mailbox: 20 whole messages, none interleaved", async (t) => {
  const s = await setup(t);
  const LINES = 8000; // ~150 KB each: many chunks per message, so writes would interleave without the lock
  const send = async (n: number) => {
    const c = await RawClient.connect(s.server.address.port);
    t.teardown(() => c.destroy());
    let body = `Subject: concurrent ${n}\r\nX-Seq: ${n}\r\n\r\n`;
    for (let k = 0; k < LINES; k++) body += `message ${n} line ${k}\r\n`;
    c.write(`EHLO c${n}.test\r\nMAIL FROM:<s${n}@x.test>\r\nRCPT TO:<${USER}>\r\nDATA\r\n`);
    for (let i = 0; i < 5; i++) await c.reply(10_000);
    for (let i = 0; i < body.length; i += 16_384) await c.writeAndDrain(body.slice(i, i + 16_384));
    c.write(".\r\nQUIT\r\n");
    const done = await c.text(20_000);
    await c.waitClosed(20_000);
    return done;
  };
  const results = await Promise.all(Array.from({ length: 20 }, (_, n) => send(n)));
  t.equal(results.filter((r) => queuedAs.test(r)).length, 20, "20 × 250");
  const messages = splitMbox(await readLatin1(s.mbox()));
  t.equal(messages.length, 20, "20 messages in the mbox");
  const seen = new Set<number>();
  let whole = 0;
  for (const m of messages) {
    const n = Number(/\nX-Seq: (\d+)\n/.exec(m)?.[1]);
    seen.add(n);
    let want = `From s${n}@x.test `;
    if (!m.startsWith(want)) continue;
    want = `Subject: concurrent ${n}\nX-Seq: ${n}\n\n`;
    for (let k = 0; k < LINES; k++) want += `message ${n} line ${k}\n`;
    if (m.endsWith(`\n${want}\n`)) whole++;
  }
  t.equal(seen.size, 20, "each message once");
  t.equal(whole, 20, "each one whole and contiguous");
  t.equal(s.messages.length, 20, "20 message events");
});

t.test("a client that disconnects mid-DATA leaves no partial message and nothing in tmp/", async (t) => {
  const s = await setup(t);
  await fs.writeFile(s.mbox(), "From old@x.test Mon Nov 23 10:00:00 2026\nSubject: old\n\nold\n\n");
  const before = await fs.readFile(s.mbox());
  const cuts = ["Subject: cut\r\n\r\n" + "z".repeat(200_000), "Subject: cut\r\n\r\nbody\r\n.", "Subject: cut\r\n\r\nbody\r\n.\r", ""];
  for (const cut of cuts) {
    const c = await s.connect();
    await envelope(t, c);
    if (cut) await c.writeAndDrain(cut);
    // A message past 64 KB goes to a temp file, a smaller one is held in memory.
    const deadline = Date.now() + 5000;
    while (cut.length > 65_536 && (await s.tmpFiles()).length === 0 && Date.now() < deadline) await sleep(5);
    await sleep(30);
    c.destroy();
    await s.waitForLine(/lost connection after DATA \(\d+ octets\): message dropped/);
    s.lines.length = 0;
  }
  t.same(await fs.readFile(s.mbox()), before, "the mailbox is as it was");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  t.equal(s.messages.length, 0);
});

t.test("SMTP smuggling: LF.LF, CRLF.CR and LF.CRLF inside DATA do not end the message", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  await envelope(t, c, "honest@x.test");
  const smuggled = (how: string) => `MAIL FROM:<evil@x.test>\r\nRCPT TO:<${USER}>\r\nDATA\r\nSubject: smuggled ${how}\r\n\r\nevil\r\n`;
  c.write(
    "Subject: honest\r\n\r\nstart\r\n" +
    `one\n.\n${smuggled("LF.LF")}` +
    `two\r\n.\r${smuggled("CRLF.CR")}` +
    `three\n.\r\n${smuggled("LF.CRLF")}` +
    `four\r\n.\n${smuggled("CRLF.LF")}` +
    `five\r.\r\n${smuggled("CR.CRLF")}` +
    "end\r\n.\r\nQUIT\r\n",
  );
  t.match(await c.text(), queuedAs, "one message");
  t.match(await c.text(), /^221 /, "then QUIT: nothing in between");
  await c.waitClosed();
  const messages = splitMbox(await readLatin1(s.mbox()));
  t.equal(messages.length, 1, "one message in the mailbox");
  t.equal(s.messages.length, 1);
  for (const how of ["LF.LF", "CRLF.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF"]) t.match(messages[0], `Subject: smuggled ${how}\n`, `${how} stayed inside the honest message`);
  t.notMatch(s.lines.join("\n"), /evil@x\.test>? body|mail from=<evil/, "no MAIL FROM:<evil> was ever a command");
});

t.test("size limit: 552 after the data, exact boundary, nothing stored past the limit, memory bounded", async (t) => {
  const small = await setup(t, { maxSize: 1000 });
  const c = await small.connect();
  await envelope(t, c);
  c.write(`..${"a".repeat(997)}\r\n.\r\n`); // 1000 octets once un-stuffed
  t.match(await c.text(), queuedAs, "exactly the limit (1000 octets, counted after un-stuffing) is accepted");
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd(`RCPT TO:<${USER}>`), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write(`${"a".repeat(999)}\r\n.\r\n`);
  t.equal(await c.text(), "552 5.3.4 Error: message file too big", "one octet more is refused");
  t.equal(await c.cmd("NOOP"), "250 2.0.0 Ok", "the session goes on");
  t.equal(small.messages.length, 1);

  const s = await setup(t); // the default limit, 10 MB
  const before = await fs.readFile(s.mbox()).catch(() => Buffer.alloc(0));
  const d = await s.connect();
  await envelope(t, d);
  const line = Buffer.from(`${"0123456789".repeat(9)}abcdef\r\n`); // 98 octets
  const block = Buffer.concat(Array.from({ length: 640 }, () => line)); // 62,720 octets
  const total = 30 * 1024 * 1024;
  const rss0 = process.memoryUsage().rss;
  let peakRss = rss0;
  let peakTmp = 0;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage().rss);
    for (const name of readdirSync(path.join(s.maildir, "tmp"))) {
      try {
        peakTmp = Math.max(peakTmp, statSync(path.join(s.maildir, "tmp", name)).size);
      } catch {
        // gone meanwhile
      }
    }
  }, 10);
  let sent = 0;
  while (sent < total) {
    await d.writeAndDrain(block);
    sent += block.length;
  }
  d.write(".\r\n");
  const reply = await d.text(60_000);
  clearInterval(sampler);
  t.equal(reply, "552 5.3.4 Error: message file too big", `${sent} octets to a 10 MB limit`);
  const growth = (peakRss - rss0) / 1024 / 1024;
  t.ok(growth < 40, `rss grew by ${growth.toFixed(1)} MB while 30 MB went through`);
  t.ok(peakTmp <= 10 * 1024 * 1024, `the temp file stopped at the limit (peak ${peakTmp} octets)`);
  t.ok(peakTmp > 0, "the temp file was seen");
  t.same(await fs.readFile(s.mbox()).catch(() => Buffer.alloc(0)), before, "nothing stored");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  t.equal(await d.cmd("NOOP"), "250 2.0.0 Ok", "the session goes on");
  await s.waitForLine(/message refused: \d+ octets, more than the limit of 10485760/);
});

/* ------------------------------------------------------------------------------------ */
/* Failures and locks                                                                    */

t.test("a failed write answers 451 and leaves every mailbox as it was", async (t) => {
  if (!requireTool(t, PRLIMIT)) return;
  const s = await setup(t, {}, ["a@local.test", "b@local.test"]);
  const old = "From old@x.test Mon Nov 23 10:00:00 2026\nSubject: old\n\nold\n\n";
  await fs.writeFile(s.mbox("a@local.test"), old);
  // b's mailbox (sparse) ends 1,000 octets short of the file size limit: its writes fail
  // with EFBIG once a's trace headers and first piece of body are written.
  const limit = 64 * 1024 * 1024;
  await fs.writeFile(s.mbox("b@local.test"), "");
  await fs.truncate(s.mbox("b@local.test"), limit - 1000);
  const restoreLimit = await limitFileSize(t, limit);
  const c = await s.connect();
  await envelope(t, c, "a@x.test", ["a@local.test", "b@local.test"]);
  c.write(`Subject: fails\r\n\r\n${"x".repeat(100_000)}\r\n.\r\n`);
  t.equal(await c.text(), "451 4.3.0 Error: queue file write error");
  await restoreLimit();
  t.equal(await readLatin1(s.mbox("a@local.test")), old, "a's mailbox truncated back to its old content");
  t.equal((await fs.stat(s.mbox("b@local.test"))).size, limit - 1000, "b's mailbox truncated back too");
  t.notOk(existsSync(`${s.mbox("a@local.test")}.lock`), "locks released");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  await s.waitForLine(/error: delivering [0-9A-F]{12}: .*EFBIG/);
  // And the session still delivers where it can.
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd("RCPT TO:<a@local.test>"), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: works\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(), queuedAs);
  t.equal(splitMbox(await readLatin1(s.mbox("a@local.test"))).length, 2);
  t.equal(s.messages.length, 1);
});

t.test("a mailbox that is a symlink, a directory or a hard link is refused with 451; nothing is written through it", async (t) => {
  const s = await setup(t, {}, ["a@local.test", "b@local.test"]);
  const old = "From old@x.test Mon Nov 23 10:00:00 2026\nSubject: old\n\nold\n\n";
  await fs.writeFile(s.mbox("a@local.test"), old);
  const elsewhere = path.join(path.dirname(s.maildir), "elsewhere");
  await fs.writeFile(elsewhere, "not a mailbox\n");
  const missing = path.join(path.dirname(s.maildir), "missing");
  const b = s.mbox("b@local.test");
  const cases: Array<[string, () => Promise<unknown>, RegExp]> = [
    ["a symlink to a file", () => fs.symlink(elsewhere, b), /is a symbolic link/],
    ["a symlink to no file", () => fs.symlink(missing, b), /is a symbolic link/],
    ["a directory", () => fs.mkdir(b), /is a directory/],
    ["a hard link", () => fs.link(elsewhere, b), /has 2 hard links/],
  ];
  const c = await s.connect();
  for (const [what, plant, why] of cases) {
    await plant();
    await envelope(t, c, "a@x.test", ["a@local.test", "b@local.test"]);
    c.write("Subject: refused\r\n\r\nx\r\n.\r\n");
    t.equal(await c.text(), "451 4.2.0 Error: mailbox unavailable, try again later", `b's mailbox is ${what}`);
    const line = await s.waitForLine(new RegExp(`error: delivering [0-9A-F]{12}: \\S*/users/b@local\\.test/mail ${why.source}`));
    s.lines.splice(s.lines.indexOf(line), 1);
    t.equal(await readLatin1(s.mbox("a@local.test")), old, "a's mailbox as it was");
    await fs.rm(b, { recursive: true });
  }
  t.equal(await fs.readFile(elsewhere, "latin1"), "not a mailbox\n", "the file the links point to is unchanged");
  t.notOk(existsSync(missing), "and a symlink's missing target was not created");
  t.same(await fs.readdir(path.dirname(b)), [], "no lock left behind");
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
  t.equal(s.messages.length, 0);
  await envelope(t, c, "a@x.test", ["a@local.test", "b@local.test"]);
  c.write("Subject: works\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(), queuedAs, "a plain mailbox, created afresh, works");
  t.equal((await fs.lstat(b)).mode & 0o777, 0o600);
  t.equal(splitMbox(await readLatin1(b)).length, 1);
  t.equal(splitMbox(await readLatin1(s.mbox("a@local.test"))).length, 2);
});

t.test("a mailbox that is a FIFO is refused at once, with or without a reader, and nothing is written into it", async (t) => {
  if (!requireTool(t, MKFIFO)) return;
  const s = await setup(t);
  const fifo = s.mbox();
  const made = await run(MKFIFO, ["-m", "600", fifo], { timeoutMs: 10_000 });
  t.equal(made.code, 0, `mkfifo ${made.stderr}`);
  const readSide = () => fs.open(fifo, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  const c = await s.connect();
  await envelope(t, c);
  c.write("Subject: fifo\r\n\r\nx\r\n.\r\n");
  const alone = await c.text(5000).catch(async (err) => {
    // A receiver stuck in open() waiting for a reader is set free, so close() cannot hang too.
    await (await readSide()).close();
    throw err;
  });
  t.equal(alone, "451 4.2.0 Error: mailbox unavailable, try again later", "no reader: refused at once");
  await s.waitForLine(/error: delivering [0-9A-F]{12}: \S*\/users\/user@local\.test\/mail is a FIFO/);
  const reader = await readSide();
  t.teardown(() => reader.close());
  await envelope(t, c);
  c.write("Subject: fifo\r\n\r\nx\r\n.\r\n");
  t.equal(await c.text(5000), "451 4.2.0 Error: mailbox unavailable, try again later", "with a reader: refused too");
  const { bytesRead } = await reader.read(Buffer.alloc(4096), 0, 4096, null);
  t.equal(bytesRead, 0, "nothing was written into the FIFO");
  await fs.unlink(fifo);
  await envelope(t, c);
  c.write("Subject: plain\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(), queuedAs, "a plain mailbox in its place works");
  t.ok((await fs.lstat(fifo)).isFile());
  t.same(await s.tmpFiles(), [], "tmp/ is empty");
});

t.test("mail.lock: another program's lock is waited for; a stale one is broken", async (t) => {
  const s = await setup(t);
  const lock = `${s.mbox()}.lock`;
  await fs.writeFile(lock, "12345\n");
  const c = await s.connect();
  await envelope(t, c);
  c.write("Subject: locked\r\n\r\nx\r\n.\r\n");
  await sleep(400);
  t.equal(c.queued, 0, "no reply while another program holds the lock");
  t.notOk(existsSync(s.mbox()), "and no write");
  await fs.unlink(lock);
  t.match(await c.text(3000), queuedAs, "delivered once the lock is gone");
  t.notOk(existsSync(lock), "our own lock removed after");

  await fs.writeFile(lock, "12345\n");
  const old = new Date(Date.now() - 10 * 60 * 1000);
  await fs.utimes(lock, old, old);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd(`RCPT TO:<${USER}>`), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  const started = Date.now();
  c.write("Subject: stale\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(3000), queuedAs, "a ten-minute-old lock is stale");
  t.ok(Date.now() - started < 1000, "and broken at once");
  t.notOk(existsSync(lock));
  t.equal(splitMbox(await readLatin1(s.mbox())).length, 2);

  // A symlink planted as mail.lock is never followed: the exclusive create does not go
  // through it, and its own age, not its target's, makes it stale.
  const target = path.join(path.dirname(s.maildir), "lock-target");
  await fs.symlink(target, lock);
  await fs.lutimes(lock, old, old);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd(`RCPT TO:<${USER}>`), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: stale link\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(3000), queuedAs, "a ten-minute-old symlink is a stale lock");
  t.notOk(existsSync(target), "its target was never created");
  t.equal(await fs.lstat(lock).catch(() => null), null, "and the symlink is gone");
  t.equal(splitMbox(await readLatin1(s.mbox())).length, 3);
});

/* ------------------------------------------------------------------------------------ */
/* The journal                                                                           */

t.test("journal: hourly files, one line per event, timestamp and client address first", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  await envelope(t, c);
  c.write("Subject: j\r\n\r\nx\r\n.\r\n");
  const id = queuedAs.exec(await c.text())![1];
  t.match(await c.cmd("RCPT TO:<nobody@local.test>"), /^503 /);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.match(await c.cmd("RCPT TO:<nobody@local.test>"), /^550 /);
  t.match(await c.cmd("QUIT"), /^221 /);
  await c.waitClosed();
  await s.waitForLine(/disconnect/);
  await s.server.close();
  const dir = path.join(s.maildir, "journal");
  const files = (await fs.readdir(dir)).sort();
  t.ok(files.length >= 1 && files.every((f) => /^\d{4}_\d\d_\d\d_\d\d$/.test(f)), `hourly files: ${files.join(" ")}`);
  let text = "";
  for (const f of files) text += await fs.readFile(path.join(dir, f), "utf8");
  t.equal(text, `${s.lines.join("\n")}\n`, "the journal holds the same lines as the log");
  const session = s.lines.filter((l) => / 127\.0\.0\.1 /.test(l));
  for (const l of session) t.match(l, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 127\.0\.0\.1 \S/);
  const events = [
    /127\.0\.0\.1 connect from 127\.0\.0\.1:\d+ \(session 1, 1 open\)$/,
    /127\.0\.0\.1 ehlo client\.test$/,
    /127\.0\.0\.1 mail from=<a@x\.test> body=7BIT$/,
    /127\.0\.0\.1 rcpt to=<user@local\.test>: accepted$/,
    new RegExp(`127\\.0\\.0\\.1 stored id=${id} from=<a@x\\.test> size=17 nrcpt=1 mailboxes=.*/users/user@local\\.test/mail$`),
    /127\.0\.0\.1 RCPT: 503 5\.5\.1 Error: need MAIL command$/,
    /127\.0\.0\.1 rcpt to=<nobody@local\.test>: refused: 550 5\.1\.1 <nobody@local\.test>: Recipient address rejected: User unknown$/,
    /127\.0\.0\.1 quit$/,
    /127\.0\.0\.1 disconnect \(commands=8 messages=1 errors=2\)$/,
  ];
  let at = 0;
  for (const pattern of events) {
    const i = session.findIndex((l, k) => k >= at && pattern.test(l));
    t.ok(i >= 0, `in order: ${pattern}`);
    if (i >= 0) at = i + 1;
  }
});
