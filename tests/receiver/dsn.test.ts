// DSN (RFC 3461) in the receiver: the parameter parsers, every parameter good and bad in a
// session, parameters after HELO, and mudmail's own engine putting them on the wire through it.

import t from "tap";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseRet, parseEnvid, parseNotify, parseOrcpt, splitParam } from "../../receiver.js";
import { MailEngine } from "../../mail.js";
import { recordingProxy } from "../helpers/proxy.js";
import { HOST, USER, setup, withoutDates, splitMbox, readLatin1, queuedAs } from "../helpers/receiver-rig.js";

/* ------------------------------------------------------------------------------------ */
/* DSN (RFC 3461)                                                                        */

t.test("DSN parameters, units: RET, ENVID, NOTIFY, ORCPT, good and bad", async (t) => {
  t.same(splitParam("notify=never"), { key: "NOTIFY", value: "never" }, "keyword upper-cased, value as given");
  t.same(splitParam("ORCPT=rfc822;a=b"), { key: "ORCPT", value: "rfc822;a=b" }, "split at the first =");
  t.same(splitParam("RET"), { key: "RET", value: null });

  for (const [v, want] of [["FULL", "full"], ["hdrs", "hdrs"], ["Hdrs", "hdrs"]] as const) t.equal(parseRet(v), want, `RET=${v}`);
  for (const v of [null, "", "FULLY", "HEADERS", "FULL,HDRS", " FULL"]) t.equal(parseRet(v), null, `RET=${v} is bad`);

  const envids: Array<[string | null, string | null]> = [
    ["ABC123", "ABC123"],
    ["ABC+2B123", "ABC+123"],
    ["a+3Db+20c", "a=b c"],
    ["x".repeat(100), "x".repeat(100)],
    ["x".repeat(101), null], // more than 100 characters as sent
    [`${"+41".repeat(34)}`, null], // 102 characters as sent, though 34 once decoded
    [null, null],
    ["", null],
    ["ABC+2b123", null], // hex digits are upper case (RFC 3461 4)
    ["ABC+2", null],
    ["ABC+", null],
    ["a=b", null],
    ["ABC+0A", null], // a line feed once decoded
    ["+C3+A9", null], // not US-ASCII once decoded
  ];
  for (const [v, want] of envids) t.equal(parseEnvid(v), want, `ENVID=${v}`);

  const notifies: Array<[string | null, string[] | null]> = [
    ["NEVER", ["never"]],
    ["never", ["never"]],
    ["SUCCESS", ["success"]],
    ["FAILURE,DELAY", ["failure", "delay"]],
    ["success,Failure,DELAY", ["success", "failure", "delay"]],
    ["DELAY,SUCCESS", ["delay", "success"]],
    ["NEVER,SUCCESS", null], // NEVER stands alone
    ["FAILURE,NEVER", null],
    ["NEVER,NEVER", null],
    ["SUCCESS,SUCCESS", null],
    ["SUCCESS,", null],
    [",SUCCESS", null],
    ["SUCCESS;FAILURE", null],
    ["SUCCESS FAILURE", null],
    ["ALWAYS", null],
    ["", null],
    [null, null],
  ];
  for (const [v, want] of notifies) t.same(parseNotify(v), want, `NOTIFY=${v}`);

  const orcpts: Array<[string | null, { type: string; address: string } | null]> = [
    ["rfc822;user@local.test", { type: "rfc822", address: "user@local.test" }],
    ["RFC822;a+2Bb@local.test", { type: "rfc822", address: "a+b@local.test" }],
    ["rfc822;+22a+20b+22@local.test", { type: "rfc822", address: '"a b"@local.test' }],
    ["x400;/C=US/", null], // "=" is not xtext
    ["x400;+2FC+3DUS+2F", { type: "x400", address: "/C=US/" }],
    ["utf-8;j\\x{F6}rg@local.test", { type: "utf-8", address: "jörg@local.test" }],
    ["UTF-8;+E2+82+AC@local.test", { type: "utf-8", address: "€@local.test" }],
    [`rfc822;${"a".repeat(493)}`, { type: "rfc822", address: "a".repeat(493) }], // 500 characters
    [`rfc822;${"a".repeat(494)}`, null], // 501
    ["rfc822;j+C3+B6rg@local.test", null], // rfc822: US-ASCII only
    ["utf-8;bad\\escape", null],
    ["utf-8;a\\x{D800}b", null],
    ["utf-8;a+0Ab", null],
    ["rfc822;a+0Db", null],
    ["rfc822;", null],
    [";user@local.test", null],
    ["rfc 822;user@local.test", null],
    ["rfc822:user@local.test", null],
    ["rfc822;user+2b@local.test", null],
    ["rfc822;user+@local.test", null],
    ["", null],
    [null, null],
  ];
  for (const [v, want] of orcpts) t.same(parseOrcpt(v), want, `ORCPT=${v}`);
});

t.test("DSN in a session: advertised, every parameter good and bad, duplicates, case, long lines", async (t) => {
  const s = await setup(t, { maxErrors: 1000, maxSize: 123456 });
  const c = await s.connect();
  const from = "MAIL FROM:<a@x.test>";
  const to = `RCPT TO:<${USER}>`;
  const script: Array<[string, string]> = [
    ["EHLO client.test", `250-${HOST}\n250-SIZE 123456\n250-PIPELINING\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250-DSN\n250 HELP`],
    // MAIL: RET and ENVID
    [`${from} RET=FOO`, "501 5.5.4 Bad RET parameter value"],
    [`${from} RET=`, "501 5.5.4 Bad RET parameter value"],
    [`${from} RET`, "501 5.5.4 Bad RET parameter value"],
    [`${from} RET=FULL RET=FULL`, "501 5.5.4 Duplicate RET parameter"],
    [`${from} RET=FULL ret=hdrs`, "501 5.5.4 Duplicate RET parameter"],
    [`${from} ENVID=`, "501 5.5.4 Bad ENVID parameter value"],
    [`${from} ENVID=ABC+2b`, "501 5.5.4 Bad ENVID parameter value"],
    [`${from} ENVID=A=B`, "501 5.5.4 Bad ENVID parameter value"],
    [`${from} ENVID=${"x".repeat(101)}`, "501 5.5.4 Bad ENVID parameter value"],
    [`${from} ENVID=+0D+0Abcc:evil`, "501 5.5.4 Bad ENVID parameter value"],
    [`${from} ENVID=A ENVID=B`, "501 5.5.4 Duplicate ENVID parameter"],
    [`${from} SIZE=10 SIZE=10`, "501 5.5.4 Duplicate SIZE parameter"],
    [`${from} BODY=7BIT body=8bitmime`, "501 5.5.4 Duplicate BODY parameter"],
    [`${from} RET=HDRS ENVID=ok NOTIFY=NEVER`, "555 5.5.4 Unsupported option: NOTIFY"],
    [`${from} ret=full envid=${"x".repeat(100)} SIZE=100 BODY=8BITMIME`, "250 2.1.0 Ok"],
    ["RSET", "250 2.0.0 Ok"],
    // RCPT: NOTIFY and ORCPT
    [`${from} RET=hdrs ENVID=QQ+2B1`, "250 2.1.0 Ok"],
    [`${to} NOTIFY=`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=SOMETIMES`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=NEVER,SUCCESS`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=DELAY,NEVER`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=SUCCESS,,DELAY`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=SUCCESS,SUCCESS`, "501 5.5.4 Bad NOTIFY parameter value"],
    [`${to} NOTIFY=NEVER NOTIFY=NEVER`, "501 5.5.4 Duplicate NOTIFY parameter"],
    [`${to} ORCPT=rfc822`, "501 5.5.4 Bad ORCPT parameter value"],
    [`${to} ORCPT=;user@local.test`, "501 5.5.4 Bad ORCPT parameter value"],
    [`${to} ORCPT=rfc822;`, "501 5.5.4 Bad ORCPT parameter value"],
    [`${to} ORCPT=rfc822;a+2x@local.test`, "501 5.5.4 Bad ORCPT parameter value"],
    [`${to} ORCPT=rfc822;${"a".repeat(494)}`, "501 5.5.4 Bad ORCPT parameter value"],
    [`${to} ORCPT=rfc822;a@b ORCPT=rfc822;a@b`, "501 5.5.4 Duplicate ORCPT parameter"],
    [`${to} orcpt=rfc822;a@b Orcpt=rfc822;a@b`, "501 5.5.4 Duplicate ORCPT parameter"],
    [`${to} NOTIFY=NEVER SIZE=1`, "555 5.5.4 Unsupported option: SIZE"],
    [`${to} RET=FULL`, "555 5.5.4 Unsupported option: RET"],
    ["DATA", "503 5.5.1 Error: need RCPT command"], // nothing above was accepted
    [`${to} NOTIFY=NEVER`, "250 2.1.5 Ok"],
    [`${to} notify=success,failure,delay orcpt=RFC822;${USER}`, "250 2.1.5 Ok"],
    [`${to} ORCPT=rfc822;Old+2BUser@local.test NOTIFY=Delay,Failure`, "250 2.1.5 Ok"],
    // The longest ORCPT (500 characters) makes a line past 512 octets: allowed for RCPT.
    [`${to} NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;${"a".repeat(493)}`, "250 2.1.5 Ok"],
    [`${to} NOTIFY=SUCCESS ORCPT=rfc822;${"a".repeat(493)} ${"X".repeat(500)}`, "500 5.5.2 Error: line too long"],
    [`NOOP ${"x".repeat(506)}`, "500 5.5.2 Error: line too long"], // other commands keep 512
    [to, "250 2.1.5 Ok"],
  ];
  for (const [line, want] of script) {
    const label = JSON.stringify(line.length > 80 ? `${line.slice(0, 80)}... (${line.length} octets)` : line);
    t.equal(await c.cmd(line), want, label);
  }
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: dsn\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(), queuedAs);
  t.equal(s.messages.length, 1);
  t.same(s.messages[0].dsn, {
    ret: "hdrs",
    envid: "QQ+1",
    recipients: [
      { rcpt: USER, notify: ["never"], orcpt: null },
      { rcpt: USER, notify: ["success", "failure", "delay"], orcpt: { type: "rfc822", address: USER } },
      { rcpt: USER, notify: ["delay", "failure"], orcpt: { type: "rfc822", address: "Old+User@local.test" } },
      { rcpt: USER, notify: ["success", "failure", "delay"], orcpt: { type: "rfc822", address: "a".repeat(493) } },
      { rcpt: USER, notify: null, orcpt: null },
    ],
  }, "the event: RET, ENVID decoded, every accepted RCPT with its NOTIFY and ORCPT");
  t.same(s.messages[0].to, [USER], "still one mailbox");
  await s.waitForLine(/mail from=<a@x\.test> size=100 body=8BITMIME ret=FULL envid=x{100}$/);
  await s.waitForLine(/mail from=<a@x\.test> body=7BIT ret=HDRS envid=QQ\+2B1$/);
  await s.waitForLine(/rcpt to=<user@local\.test> notify=NEVER: accepted$/);
  await s.waitForLine(/rcpt to=<user@local\.test> notify=DELAY,FAILURE orcpt=rfc822;Old\+2BUser@local\.test: accepted$/);
  await s.waitForLine(/rcpt to=<user@local\.test> NOTIFY=SUCCESS,SUCCESS: 501 5\.5\.4 Bad NOTIFY parameter value$/);
  await s.waitForLine(/mail from=<a@x\.test> ENVID=B: 501 5\.5\.4 Duplicate ENVID parameter$/);

  // The next transaction starts without the last one's parameters.
  t.equal(await c.cmd("MAIL FROM:<b@x.test>"), "250 2.1.0 Ok");
  t.equal(await c.cmd(to), "250 2.1.5 Ok");
  t.equal(await c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
  c.write("Subject: plain\r\n\r\nx\r\n.\r\n");
  t.match(await c.text(), queuedAs);
  t.same(s.messages[1].dsn, { ret: null, envid: null, recipients: [{ rcpt: USER, notify: null, orcpt: null }] }, "no DSN parameters: all null");
  await s.waitForLine(/mail from=<b@x\.test> body=7BIT$/);
  await s.waitForLine(/rcpt to=<user@local\.test>: accepted$/);

  // The parameters go to the journal and the event, never into the stored message.
  const [first, second] = splitMbox(await readLatin1(s.mbox()));
  const headers = (m: string) => m.split("\n\n")[0].replace(/ id [0-9A-F]{12}/, " id ID").replace(/^From \S+/, "From X").replace(/<[ab]@x\.test>/g, "<S>");
  t.equal(withoutDates(headers(first)).replace("Subject: dsn", "Subject: S"), withoutDates(headers(second)).replace("Subject: plain", "Subject: S"),
    "the message with DSN parameters is stored as one without");
  t.notMatch(first, /ENVID|NOTIFY|ORCPT|QQ/i, "no trace of them in the mailbox");
});

t.test("DSN parameters after HELO: unknown (555), as any extension's", async (t) => {
  const s = await setup(t, { maxErrors: 1000 });
  const c = await s.connect();
  const script: Array<[string, string]> = [
    ["HELO client.test", `250 ${HOST}`],
    ["MAIL FROM:<a@x.test> RET=FULL", "555 5.5.4 Unsupported option: RET"],
    ["MAIL FROM:<a@x.test> envid=ABC", "555 5.5.4 Unsupported option: ENVID"],
    ["MAIL FROM:<a@x.test> RET=BOGUS", "555 5.5.4 Unsupported option: RET"],
    ["MAIL FROM:<a@x.test> SIZE=10", "250 2.1.0 Ok"],
    [`RCPT TO:<${USER}> NOTIFY=NEVER`, "555 5.5.4 Unsupported option: NOTIFY"],
    [`RCPT TO:<${USER}> ORCPT=rfc822;${USER}`, "555 5.5.4 Unsupported option: ORCPT"],
    [`RCPT TO:<${USER}>`, "250 2.1.5 Ok"],
    // EHLO turns them on, and a HELO after it off again.
    ["EHLO client.test", `250-${HOST}\n250-SIZE 10485760\n250-PIPELINING\n250-8BITMIME\n250-ENHANCEDSTATUSCODES\n250-DSN\n250 HELP`],
    ["MAIL FROM:<a@x.test> RET=FULL", "250 2.1.0 Ok"],
    [`RCPT TO:<${USER}> NOTIFY=NEVER`, "250 2.1.5 Ok"],
    ["HELO client.test", `250 ${HOST}`],
    ["MAIL FROM:<a@x.test> RET=FULL", "555 5.5.4 Unsupported option: RET"],
  ];
  for (const [line, want] of script) t.equal(await c.cmd(line), want, JSON.stringify(line));
  await s.waitForLine(/mail from=<a@x\.test> RET=FULL: 555 5\.5\.4 Unsupported option: RET$/);
});

t.test("DSN end to end: mudmail's own engine, relaying through the receiver, puts its parameters on the wire", async (t) => {
  const s = await setup(t);
  // A tap between the engine and the receiver: what the engine sends, byte for byte.
  const tap = await recordingProxy(s.server.address.port);
  t.teardown(() => tap.close());
  const spool = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-receiver-engine-"));
  t.teardown(() => fs.rm(spool, { recursive: true, force: true }));
  const engineLines: string[] = [];
  const engine = new MailEngine({
    maildir: spool, relay: `127.0.0.1:${tap.port}`, helo: "engine.test", fsync: false, log: (l) => engineLines.push(l),
  });
  t.teardown(() => engine.stop());
  const other = "other@local.test";
  await fs.mkdir(path.join(s.maildir, "users", other));
  await engine.send({
    from: "sender@x.test", to: [USER, other], subject: "dsn end to end", text: "hello",
    dsn: { notify: ["success", "failure"], ret: "hdrs", envid: "ABC+123" },
  });
  await engine.send({ from: "sender@x.test", to: USER, subject: "no dsn asked", text: "hello" });
  await engine.flush();
  t.equal(s.messages.length, 2, "both messages stored");
  if (s.messages.length !== 2) t.comment(engineLines.join("\n"));
  const sent = Buffer.concat(tap.chunks.flat()).toString("latin1");
  t.match(sent, /\r\nMAIL FROM:<sender@x\.test>[^\r\n]* RET=HDRS ENVID=ABC\+2B123\r\n/, "MAIL carries RET=HDRS ENVID=ABC+2B123");
  t.match(sent, /\r\nRCPT TO:<user@local\.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@local\.test\r\n/, "RCPT carries NOTIFY and ORCPT");
  t.match(sent, /\r\nRCPT TO:<other@local\.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;other@local\.test\r\n/);
  t.match(sent, /\r\nMAIL FROM:<sender@x\.test>(?: SIZE=\d+| BODY=\w+)*\r\n/, "the other message's MAIL has neither");
  const asked = s.messages.find((m) => m.dsn.envid !== null);
  const plain = s.messages.find((m) => m.dsn.envid === null);
  t.same(asked?.dsn, {
    ret: "hdrs",
    envid: "ABC+123",
    recipients: [
      { rcpt: USER, notify: ["success", "failure"], orcpt: { type: "rfc822", address: USER } },
      { rcpt: other, notify: ["success", "failure"], orcpt: { type: "rfc822", address: other } },
    ],
  }, "the receiver saw RET, ENVID, NOTIFY and ORCPT, and decoded them");
  t.same(plain?.dsn, { ret: null, envid: null, recipients: [{ rcpt: USER, notify: null, orcpt: null }] }, "a message that asked for nothing carries nothing");
  // The journal keeps them in the xtext form too.
  await s.waitForLine(/ehlo engine\.test$/);
  await s.waitForLine(/mail from=<sender@x\.test> size=\d+ body=\w+ ret=HDRS envid=ABC\+2B123$/);
  await s.waitForLine(/rcpt to=<user@local\.test> notify=SUCCESS,FAILURE orcpt=rfc822;user@local\.test: accepted$/);
  await s.waitForLine(/rcpt to=<other@local\.test> notify=SUCCESS,FAILURE orcpt=rfc822;other@local\.test: accepted$/);
  t.ok(s.lines.some((l) => /mail from=<sender@x\.test>( size=\d+)? body=\w+$/.test(l)), "the other message's MAIL without RET or ENVID");
  t.notOk(engineLines.some((l) => /relayed|non-delivery|delivery status notification/i.test(l)), "the server offered DSN: no 'relayed' report from the engine");
});
