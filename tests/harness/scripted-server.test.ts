// Tests of the scripted SMTP server (tests/helpers/scripted-server.ts) with the raw client of
// tests/helpers/smtp-raw.ts, so that the client tests built on it can trust it.
import t from "tap";
import { multiline, startScriptedServer, type ScriptedServer } from "../helpers/scripted-server.js";
import { RawClient } from "../helpers/smtp-raw.js";

const WAIT_MS = 2000;

/** Connects a client; the server and the client are closed when the test ends. */
async function setup(t: { teardown(fn: () => unknown): void }, server: ScriptedServer): Promise<RawClient> {
  t.teardown(() => server.close());
  const client = await RawClient.connect(server.port);
  t.teardown(() => client.destroy());
  return client;
}

const codeOf = (lines: string[]): string => (lines[lines.length - 1] ?? "").slice(0, 3);

t.test("default session: pipelining, fragments, dot-stuffing, empty message", async (t) => {
  const server = await startScriptedServer();
  t.equal(server.host, "127.0.0.1");
  t.ok(server.port > 0);
  const c = await setup(t, server);

  t.same(await c.reply(), ["220 scripted.test ESMTP"]);
  await c.sendInPieces(["EH", "LO client.te", "st\r", "\n"]); // one command split across packets
  t.same(await c.reply(), [
    "250-scripted.test",
    "250-PIPELINING",
    "250-SIZE 10240000",
    "250-8BITMIME",
    "250 ENHANCEDSTATUSCODES",
  ]);

  // MAIL, RCPT, RCPT, DATA in one write
  await c.send("MAIL FROM:<a@x.test> SIZE=100\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n");
  t.same(await c.replies(4), [["250 2.1.0 Ok"], ["250 2.1.5 Ok"], ["250 2.1.5 Ok"], ["354 End data with <CR><LF>.<CR><LF>"]]);

  // dot-stuffed body with binary bytes, the terminator split across writes
  const wire = "Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nbyte \xff\x00 end\r\n.\r\n";
  const pieces = ["Subject: dots\r\n\r\n.", ".leading dot\r\n...two", " dots\r\n..\r\nbyte \xff\x00 end\r", "\n", ".", "\r", "\n"];
  t.equal(pieces.join(""), wire);
  await c.sendInPieces(pieces.map((p) => Buffer.from(p, "latin1")));
  t.same(await c.reply(), ["250 2.0.0 Ok: queued as 1"]);

  // a second transaction with an empty message
  await c.send("MAIL FROM:<>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n");
  t.same((await c.replies(3)).map(codeOf), ["250", "250", "354"]);
  await c.send(".\r\n");
  t.same(await c.reply(), ["250 2.0.0 Ok: queued as 2"]);

  await c.send("RSET\r\n");
  t.same(await c.reply(), ["250 2.0.0 Ok"]);
  await c.send("NOOP\r\n");
  t.same(await c.reply(), ["250 2.0.0 Ok"]);
  await c.send("VRFY someone\r\n");
  t.same(await c.reply(), ["502 5.5.2 Error: command not recognized"]);
  await c.send("QUIT\r\n");
  t.same(await c.reply(), ["221 2.0.0 Bye"]);
  await c.waitClosed();

  const [first, second] = await server.waitForMessages(2, WAIT_MS);
  t.equal(first?.from, "a@x.test");
  t.same(first?.to, ["b@y.test", "c@y.test"]);
  t.equal(first?.raw.toString("latin1"), wire, "raw is exactly the wire bytes");
  t.equal(
    first?.data.toString("latin1"),
    "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nbyte \xff\x00 end\r\n",
    "data is un-stuffed and keeps the CRLF of its last line",
  );
  t.equal(second?.from, "");
  t.equal(second?.raw.toString(), ".\r\n");
  t.equal(second?.data.length, 0);

  await server.waitForSessions(1, WAIT_MS, { closed: true });
  const [s] = server.sessions;
  t.same(s?.commands, [
    "EHLO client.test",
    "MAIL FROM:<a@x.test> SIZE=100",
    "RCPT TO:<b@y.test>",
    "RCPT TO:<c@y.test>",
    "DATA",
    "MAIL FROM:<>",
    "RCPT TO:<d@y.test>",
    "DATA",
    "RSET",
    "NOOP",
    "VRFY someone",
    "QUIT",
  ]);
  t.equal(s?.transcript[0], "S: 220 scripted.test ESMTP");
  t.ok(s?.transcript.includes("C: EHLO client.test"));
  t.ok(s?.transcript.includes("S: 250 2.0.0 Ok: queued as 1"));
  t.same(s?.pipeliningViolations, [], "MAIL/RCPT pipelined after PIPELINING is allowed");
  t.equal(s?.esmtp, true);
  t.equal(s?.helo, "client.test");
  t.equal(s?.closed, true);
  t.equal(s?.closedByClient, false, "closed by the server after 221");
  t.equal(server.connections, 1);
  t.equal(server.messages.length, 2);
});

t.test("sequence errors and SIZE", async (t) => {
  const server = await startScriptedServer({ size: 1000 });
  const c = await setup(t, server);
  await c.reply();
  await c.send("MAIL FROM:<a@x.test>\r\n");
  t.same(await c.reply(), ["503 5.5.1 Error: send HELO/EHLO first"]);
  await c.send("EHLO client.test\r\n");
  t.ok((await c.reply()).includes("250-SIZE 1000"));
  await c.send("RCPT TO:<b@y.test>\r\n");
  t.same(await c.reply(), ["503 5.5.1 Error: need MAIL command"]);
  await c.send("MAIL FROM:<a@x.test> SIZE=2000\r\n");
  t.same(await c.reply(), ["552 5.3.4 Message size exceeds fixed limit"]);
  await c.send("MAIL FROM:<a@x.test>\r\n");
  await c.reply();
  await c.send("DATA\r\n");
  t.same(await c.reply(), ["554 5.5.1 Error: no valid recipients"]);
  await c.send("RCPT TO:<b@y.test>\r\n");
  await c.reply();
  await c.send("DATA\r\n");
  t.equal(codeOf(await c.reply()), "354");
  await c.send(Buffer.concat([Buffer.alloc(1200, "x"), Buffer.from("\r\n.\r\n")]));
  t.same(await c.reply(), ["552 5.3.4 Error: message file too big"]);
  t.equal(server.messages.length, 0);
  t.equal(server.sessions[0]?.unaccepted.length, 1);
});

t.test("per-recipient 550 and 450", async (t) => {
  const server = await startScriptedServer({
    rcpt: (address) =>
      address.startsWith("bad@")
        ? `550 5.1.1 <${address}>: Recipient address rejected`
        : address.startsWith("later@")
          ? "450 4.2.0 <later@y.test>: Recipient address rejected: greylisted"
          : undefined,
  });
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  await c.reply();
  await c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<bad@y.test>\r\nRCPT TO:<good@y.test>\r\nRCPT TO:<later@y.test>\r\nDATA\r\n");
  const replies = await c.replies(5);
  t.same(replies.map(codeOf), ["250", "550", "250", "450", "354"]);
  t.same(replies[1], ["550 5.1.1 <bad@y.test>: Recipient address rejected"]);
  await c.send("hello\r\n.\r\n");
  t.equal(codeOf(await c.reply()), "250");
  const [message] = await server.waitForMessages(1, WAIT_MS);
  t.same(message?.to, ["good@y.test"], "only the accepted recipient");
});

for (const refusal of ["502 5.5.2 Error: command not recognized", "550 5.7.1 no ESMTP here"]) {
  t.test(`EHLO refused (${refusal.slice(0, 3)}), then HELO`, async (t) => {
    const server = await startScriptedServer({ ehlo: refusal });
    const c = await setup(t, server);
    await c.reply();
    await c.send("EHLO client.test\r\n");
    t.same(await c.reply(), [refusal]);
    await c.send("MAIL FROM:<a@x.test>\r\n");
    t.equal(codeOf(await c.reply()), "503", "not greeted yet");
    await c.send("HELO client.test\r\n");
    t.same(await c.reply(), ["250 scripted.test"]);
    await c.send("MAIL FROM:<a@x.test>\r\n");
    t.same(await c.reply(), ["250 2.1.0 Ok"]);
    const [s] = server.sessions;
    t.equal(s?.esmtp, false);
    t.equal(s?.helo, "client.test");
    t.same(s?.extensions, []);
  });
}

t.test("pipelining: false, one command at a time works, pipelining is recorded", async (t) => {
  const server = await startScriptedServer({ pipelining: false, withoutExtensions: ["8bitmime"] });
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  t.same(await c.reply(), multiline(250, ["scripted.test", "SIZE 10240000", "ENHANCEDSTATUSCODES"]));
  for (const command of ["MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "DATA"]) {
    await c.send(`${command}\r\n`);
    t.match(codeOf(await c.reply()), /^(250|354)$/);
  }
  await c.send("x\r\n.\r\n");
  t.equal(codeOf(await c.reply()), "250");
  t.same(server.sessions[0]?.pipeliningViolations, []);

  await c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
  t.same((await c.replies(2)).map(codeOf), ["250", "250"], "still answered");
  t.same(server.sessions[0]?.pipeliningViolations, ["MAIL FROM:<a@x.test>"]);
});

t.test("close action after the first message's data", async (t) => {
  let seen = 0;
  const server = await startScriptedServer({
    onData: () => (++seen === 1 ? { action: "close" } : undefined),
  });
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  await c.reply();
  await c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
  await c.replies(3);
  await c.send("body\r\n.\r\n");
  await c.waitClosed();
  await t.rejects(c.reply(100), /connection closed; unread: ""/, "no reply before the close");
  await server.waitForSessions(1, WAIT_MS, { closed: true });
  const [s] = server.sessions;
  t.equal(s?.closedByClient, false);
  t.equal(s?.messages.length, 0);
  t.equal(s?.unaccepted[0]?.data.toString(), "body\r\n");
  t.equal(s?.transcript.at(-1), "S: [close]");

  // the next connection is served normally
  const d = await RawClient.connect(server.port);
  t.teardown(() => d.destroy());
  t.equal(codeOf(await d.reply()), "220");
  t.equal(server.connections, 2);
});

t.test("silence action and a server that never greets", async (t) => {
  const server = await startScriptedServer({
    onCommand: (command) => (command.startsWith("MAIL") ? { action: "silence" } : undefined),
  });
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  await c.reply();
  await c.send("MAIL FROM:<a@x.test>\r\n");
  t.equal(await c.quietFor(300), "", "no reply within 300 ms");
  t.equal(c.closed, false);
  await c.send("NOOP\r\n");
  t.same(await c.reply(), ["250 2.0.0 Ok"], "later commands are answered");
  t.ok(server.sessions[0]?.transcript.includes("S: [no reply]"));

  const mute = await startScriptedServer({ greeting: null });
  const m = await setup(t, mute);
  t.equal(await m.quietFor(300), "", "no greeting within 300 ms");
  await m.send("EHLO client.test\r\n");
  t.equal(await m.quietFor(100), "");
  t.same(mute.sessions[0]?.commands, ["EHLO client.test"]);
  t.same(mute.sessions[0]?.pipeliningViolations, ["<before greeting>"]);
});

t.test("421 mid-session, garbage, a reply split byte by byte, reset", async (t) => {
  const split = "354 go ahead\r\n";
  const server = await startScriptedServer({
    onCommand: (command) => {
      if (command === "NOOP") return { action: "raw", bytes: "garbage\r\n" };
      if (command === "DATA") return { action: "raw", chunks: [...split], delayMs: 2 };
      if (command === "RCPT TO:<shutdown@y.test>") return "421 4.3.2 Service shutting down";
      if (command === "RCPT TO:<reset@y.test>") return { action: "reset" };
      return undefined;
    },
  });
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  await c.reply();
  await c.send("NOOP\r\n");
  t.same(await c.reply(), ["garbage"]);
  await c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
  t.same(await c.replies(3), [["250 2.1.0 Ok"], ["250 2.1.5 Ok"], ["354 go ahead"]]);
  await c.send("split\r\n.\r\n");
  t.equal(codeOf(await c.reply()), "250", "a split 354 still enters the data phase");
  await c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<shutdown@y.test>\r\n");
  t.same(await c.replies(2), [["250 2.1.0 Ok"], ["421 4.3.2 Service shutting down"]]);
  await c.waitClosed();
  t.equal(server.messages[0]?.data.toString(), "split\r\n");
  t.equal(server.sessions[0]?.closedByClient, false);

  const d = await RawClient.connect(server.port);
  t.teardown(() => d.destroy());
  await d.reply();
  await d.send("EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n");
  await d.replies(2);
  await d.send("RCPT TO:<reset@y.test>\r\n");
  await d.waitClosed();
  t.ok(server.sessions[1]?.transcript.includes("S: [reset]"));
  t.same(server.sessions[1]?.pipeliningViolations, ["EHLO client.test"], "EHLO must end a group");
});

t.test("a delayed reply and a client that hangs up", async (t) => {
  const server = await startScriptedServer({
    greeting: { action: "delay", ms: 150, reply: "220 slow.test ESMTP" },
  });
  const c = await setup(t, server);
  const started = Date.now();
  t.same(await c.reply(), ["220 slow.test ESMTP"]);
  t.ok(Date.now() - started >= 100, "greeting came after the delay");
  c.destroy();
  const [s] = await server.waitForSessions(1, WAIT_MS, { closed: true });
  t.equal(s?.closedByClient, true);
});

t.test("waitForMessages and waitForSessions time out with the transcripts", async (t) => {
  const server = await startScriptedServer();
  const c = await setup(t, server);
  await c.reply();
  await c.send("EHLO client.test\r\n");
  await c.reply();
  const started = Date.now();
  await t.rejects(server.waitForMessages(1, 200), /timed out after 200 ms[\s\S]*C: EHLO client\.test/);
  t.ok(Date.now() - started < 1500, "bounded");
  await t.rejects(server.waitForSessions(2, 100), /waiting for 2 session/);
  await t.resolves(server.waitForSessions(1, 100));
});

t.test("close() destroys open sockets, is idempotent, and fails pending waits", async (t) => {
  const server = await startScriptedServer();
  const c = await RawClient.connect(server.port);
  t.teardown(() => c.destroy());
  await c.reply();
  const pending = t.rejects(server.waitForMessages(1, 5000), /server closed/);
  const first = server.close();
  const second = server.close();
  t.equal(first, second);
  await first;
  await c.waitClosed();
  await pending;
  await t.rejects(server.waitFor(() => false, 100), /server closed/, "waits after close fail at once");
});

t.test("a hook that throws is recorded and ends the connection", async (t) => {
  const server = await startScriptedServer({
    onCommand: (command) => {
      if (command === "BOOM") throw new Error("hook failed");
      return undefined;
    },
  });
  const c = await setup(t, server);
  await c.reply();
  await c.send("BOOM\r\n");
  await c.waitClosed();
  t.match(server.errors[0]?.message, /hook failed/);
  t.ok(server.sessions[0]?.transcript.includes("S: [script error: hook failed]"));
});
