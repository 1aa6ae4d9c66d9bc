// Every reply code path of the receiver through a raw client: command line ends, the recipient
// limit, errors per session, timeouts, the session cap, close().

import t from "tap";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { RawClient } from "../helpers/smtp-raw.js";
import { HOST, USER, sleep, setup, envelope, splitMbox, readLatin1, queuedAs } from "../helpers/receiver-rig.js";

/* ------------------------------------------------------------------------------------ */
/* Reply code paths                                                                      */

t.test("every reply code path, one command at a time", async (t) => {
  const s = await setup(t, { maxErrors: 1000 });
  const c = await s.connect();
  const script: Array<[string, string | RegExp]> = [
    ["MAIL FROM:<a@x.test>", "503 5.5.1 Error: send HELO/EHLO first"],
    ["RCPT TO:<user@local.test>", "503 5.5.1 Error: need MAIL command"],
    ["HELO", "501 Syntax: HELO hostname"],
    ["EHLO", "501 Syntax: EHLO hostname"],
    ["HELO client.test", `250 ${HOST}`],
    ["EHLO client.test", `250-${HOST}\n250-SIZE 10485760\n250-PIPELINING\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250-DSN\n250 HELP`],
    ["DATA", "503 5.5.1 Error: need MAIL command"],
    ["RCPT TO:<user@local.test>", "503 5.5.1 Error: need MAIL command"],
    ["MAIL FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>"],
    ["MAIL TO:<a@x.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"],
    ["MAIL FROM:<a@x.test", "501 5.5.4 Syntax: MAIL FROM:<address>"],
    ["MAIL FROM:<no-at-sign>", "501 5.1.7 Bad sender address syntax"],
    ["MAIL FROM:<a@x.test> SIZE=10485761", "552 5.3.4 Message size exceeds fixed limit"],
    ["MAIL FROM:<a@x.test> SIZE=big", "501 5.5.4 Bad message size syntax"],
    ["MAIL FROM:<a@x.test> BODY=BINARYMIME", "501 5.5.4 Bad BODY keyword value"],
    ["MAIL FROM:<a@x.test> AUTH=<>", "555 5.5.4 Unsupported option: AUTH"],
    ["MAIL FROM:<a@x.test> SIZE=10485760 BODY=8BITMIME", "250 2.1.0 Ok"],
    ["MAIL FROM:<a@x.test>", "503 5.5.1 Error: nested MAIL command"],
    ["DATA", "503 5.5.1 Error: need RCPT command"],
    ["RCPT TO:", "501 5.5.4 Syntax: RCPT TO: <address>"],
    ["RCPT TO:<>", "501 5.5.4 Syntax: RCPT TO: <address>"],
    ["RCPT FROM:<user@local.test>", "501 5.5.4 Syntax: RCPT TO: <address>"],
    ["RCPT TO:<a..b@local.test>", "501 5.1.3 Bad recipient address syntax"],
    ["RCPT TO:<user@local.test> NOTIFY=SOMETIMES", "501 5.5.4 Bad NOTIFY parameter value"],
    ["RCPT TO:<user@local.test> XNOTIFY=NEVER", "555 5.5.4 Unsupported option: XNOTIFY"],
    ["RCPT TO:<nobody@local.test>", "550 5.1.1 <nobody@local.test>: Recipient address rejected: User unknown"],
    ["RCPT TO:<someone@relay.example>", "550 5.1.1 <someone@relay.example>: Recipient address rejected: User unknown"],
    ['RCPT TO:<"../../etc"@local.test>', `550 5.1.1 <"../../etc"@local.test>: Recipient address rejected: User unknown`],
    ["RCPT TO:<postmaster>", "550 5.1.1 <postmaster>: Recipient address rejected: User unknown"],
    ["DATA", "554 5.5.1 Error: no valid recipients"],
    ["RCPT TO:<User@LOCAL.test>", "250 2.1.5 Ok"],
    ["RCPT TO: user@local.test", "250 2.1.5 Ok"],
    ["RSET extra", "501 5.5.4 Syntax: RSET"],
    ["RSET", "250 2.0.0 Ok"],
    ["RCPT TO:<user@local.test>", "503 5.5.1 Error: need MAIL command"],
    ["MAIL FROM: joe@blow.com", "250 2.1.0 Ok"],
    ["DATA extra", "501 5.5.4 Syntax: DATA"],
    ["NOOP", "250 2.0.0 Ok"],
    ["noop with an argument", "250 2.0.0 Ok"],
    ["VRFY user@local.test", "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"],
    ["VRFY nobody@local.test", "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"],
    ["VRFY", "501 5.5.4 Syntax: VRFY address"],
    ["EXPN staff", "502 5.5.1 Error: EXPN not available"],
    ["HELP", /^214-2\.0\.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY EXPN\n214 2\.0\.0 /],
    ["HELP mail", "214 2.0.0 MAIL FROM:<address> [SIZE=octets] [BODY=7BIT|8BITMIME] [RET=FULL|HDRS] [ENVID=xtext]: start a message"],
    ["HELP RCPT", "214 2.0.0 RCPT TO:<address> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] [ORCPT=addr-type;xtext]: add a recipient (local users only)"],
    ["HELP STARTTLS", "504 5.5.1 Error: no help on that topic"],
    ["HELP bogus", "504 5.5.1 Error: no help on that topic"],
    ["STARTTLS", "502 5.5.2 Error: command not recognized"],
    ["TURN", "502 5.5.2 Error: command not recognized"],
    ["SEND FROM:<a@x.test>", "502 5.5.2 Error: command not recognized"],
    ["AUTH PLAIN AGFAAGI=", "502 5.5.2 Error: command not recognized"],
    ["BDAT 10 LAST", "502 5.5.2 Error: command not recognized"],
    ["", "500 5.5.2 Error: bad syntax"],
    ["  NOOP", "500 5.5.2 Error: bad syntax"],
    ["NO\x00OP", "500 5.5.2 Error: bad syntax"],
    [`NOOP ${"x".repeat(505)}`, "250 2.0.0 Ok"], // 510 octets + CRLF: the longest line allowed
    [`NOOP ${"x".repeat(506)}`, "500 5.5.2 Error: line too long"],
    [`NOOP ${"x".repeat(100_000)}`, "500 5.5.2 Error: line too long"],
    ["NOOP", "250 2.0.0 Ok"],
  ];
  for (const [line, want] of script) {
    const got = await c.cmd(line);
    const label = JSON.stringify(line.length > 60 ? `${line.slice(0, 60)}... (${line.length} octets)` : line);
    if (typeof want === "string") t.equal(got, want, label);
    else t.match(got, want, label);
  }
  // An overlong line in many pieces: discarded as it comes, one 500, and the session goes on.
  for (let i = 0; i < 20; i++) {
    c.write("y".repeat(10_000));
    await sleep(2);
  }
  c.write("\r\n");
  t.equal(await c.text(), "500 5.5.2 Error: line too long", "an overlong line sent in 20 pieces");
  t.equal(await c.cmd("RCPT TO:<user@local.test>"), "250 2.1.5 Ok", "the transaction survived the errors");
  t.equal(await c.cmd("QUIT"), `221 2.0.0 ${HOST} Service closing transmission channel`);
  await c.waitClosed();
  t.equal(s.messages.length, 0);
});

t.test("local users: a new one is accepted at once; one removed meanwhile gets 451 at the end of DATA, and 550 a second later", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  const NEW = "new@local.test";
  t.match(await c.cmd("EHLO client.test"), /^250-/);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.match(await c.cmd(`RCPT TO:<${NEW}>`), /^550 5\.1\.1 /, "not a user yet");
  await fs.mkdir(path.join(s.maildir, "users", NEW));
  t.equal(await c.cmd(`RCPT TO:<${NEW}>`), "250 2.1.5 Ok", "a user as soon as the directory is there");
  t.equal(await c.cmd("RSET"), "250 2.0.0 Ok");
  await fs.rm(path.join(s.maildir, "users", NEW), { recursive: true });
  await envelope(t, c, "a@x.test", [NEW]); // still known: found less than a second ago
  c.write("Subject: gone\r\n\r\nx\r\n.\r\n");
  t.equal(await c.text(), "451 4.3.0 Error: queue file write error", "the mailbox cannot be written: 451, try again");
  t.notOk(existsSync(path.join(s.maildir, "users", NEW)), "nothing made in its place");
  await sleep(1100);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  t.match(await c.cmd(`RCPT TO:<${NEW}>`), /^550 5\.1\.1 /, "a second later: unknown again");
});

t.test("commands end in CRLF or a bare LF; verbs in any case", async (t) => {
  const s = await setup(t);
  const c = await s.connect();
  c.write("helo client.test\n");
  t.equal(await c.text(), `250 ${HOST}`);
  c.write("mail from:<a@x.test>\nrcpt to:<user@local.test>\r\nquit\n");
  t.equal(await c.text(), "250 2.1.0 Ok");
  t.equal(await c.text(), "250 2.1.5 Ok");
  t.match(await c.text(), /^221 /);
  await c.waitClosed();
});

t.test("452 past --max-recipients; the message still goes to the accepted ones", async (t) => {
  const s = await setup(t, { maxRecipients: 100 });
  const c = await s.connect();
  t.match(await c.cmd("EHLO client.test"), /^250-/);
  t.equal(await c.cmd("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
  let script = "";
  for (let i = 0; i < 101; i++) script += `RCPT TO:<${USER}>\r\n`;
  c.write(script);
  const replies: string[] = [];
  for (let i = 0; i < 101; i++) replies.push(await c.text());
  t.equal(replies.filter((r) => r === "250 2.1.5 Ok").length, 100, "100 accepted (pipelined)");
  t.equal(replies[100], "452 4.5.3 Error: too many recipients");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: many\r\n\r\nhi\r\n.\r\n");
  t.match(await c.text(), queuedAs);
  t.equal(s.messages.length, 1);
  t.same(s.messages[0].to, [USER], "one mailbox, written once");
  t.equal(splitMbox(await readLatin1(s.mbox())).length, 1);
  await s.waitForLine(/rcpt to=<user@local\.test>: refused: 452 4\.5\.3 Error: too many recipients/);
});

t.test("errors per session: the last one is followed by 421 and the end", async (t) => {
  const s = await setup(t, { maxErrors: 3 });
  const c = await s.connect();
  t.equal(await c.cmd("FOO"), "502 5.5.2 Error: command not recognized");
  t.equal(await c.cmd("RCPT TO:<a@b.test>"), "503 5.5.1 Error: need MAIL command");
  c.write("BAR\r\nNOOP\r\n");
  t.equal(await c.text(), "502 5.5.2 Error: command not recognized");
  t.equal(await c.text(), `421 4.7.0 ${HOST} Error: too many errors`);
  await c.waitClosed();
  t.equal(c.queued, 0, "nothing after the 421");
  await s.waitForLine(/127\.0\.0\.1 too many errors \(3\)$/);
});

t.test("timeouts: silence, a command line that never ends, a DATA that stops", async (t) => {
  const s = await setup(t, { commandTimeout: 0.3 });
  const started = Date.now();
  const a = await s.connect();
  t.equal(await a.text(2000), `421 4.4.2 ${HOST} Error: timeout exceeded`, "silent after the greeting");
  await a.waitClosed(2000);
  t.ok(Date.now() - started < 1500, "within the timeout");

  const b = await s.connect();
  t.match(await b.cmd("EHLO client.test"), /^250-/);
  for (let i = 0; i < 4; i++) {
    b.write("N"); // a byte now and then does not buy more time
    await sleep(100);
  }
  t.equal(await b.text(2000), `421 4.4.2 ${HOST} Error: timeout exceeded`, "a line that never ends");
  await b.waitClosed(2000);

  const c = await s.connect();
  await envelope(t, c);
  c.write("Subject: cut\r\n\r\npart of a body");
  t.equal(await c.text(2000), `421 4.4.2 ${HOST} Error: timeout exceeded`, "DATA that stops");
  await c.waitClosed(2000);
  await s.waitForLine(/timeout after DATA \(\d+ octets\)/);
  await s.waitForLine(/message dropped/);
  t.same(await s.tmpFiles(), [], "nothing left in tmp/");
  t.notOk(existsSync(s.mbox()), "no mailbox written");
  await s.waitForLine(/127\.0\.0\.1 timeout after CONNECT$/);
  await s.waitForLine(/127\.0\.0\.1 timeout after EHLO$/);
});

t.test("sessions at once: past the cap, 421 4.7.0 and close; a freed place is taken again", async (t) => {
  const s = await setup(t, { maxSessions: 2 });
  const a = await s.connect();
  const b = await s.connect();
  const c = await RawClient.connect(s.server.address.port);
  t.teardown(() => c.destroy());
  t.equal(await c.text(), `421 4.7.0 ${HOST} Error: too many connections`);
  await c.waitClosed();
  t.equal(await b.cmd("NOOP"), "250 2.0.0 Ok", "the others go on");
  t.match(await a.cmd("QUIT"), /^221 /);
  await a.waitClosed();
  await s.waitForLine(/disconnect \(commands=1/);
  const d = await s.connect();
  t.equal(await d.cmd("NOOP"), "250 2.0.0 Ok", "a new session once one ended");
  await s.waitForLine(/refused: too many sessions \(2\)/);
});

t.test("close(): 421 to every session, stops listening, resolves", async (t) => {
  const s = await setup(t);
  const a = await s.connect();
  const b = await s.connect();
  await envelope(t, b);
  b.write("Subject: half\r\n\r\nhalf a bo");
  await sleep(50);
  const port = s.server.address.port;
  await s.server.close();
  t.equal(await a.text(), `421 4.3.2 ${HOST} Service shutting down, closing transmission channel`);
  t.equal(await b.text(), `421 4.3.2 ${HOST} Service shutting down, closing transmission channel`);
  await a.waitClosed();
  await b.waitClosed();
  t.same(await s.tmpFiles(), [], "the half message is gone");
  await t.rejects(RawClient.connect(port, "127.0.0.1", 1000), "no longer listening");
  await s.server.close(); // twice is fine
});
