// The direct client never waits for ever: a server that stops reading the body and hangs up,
// or one that answers STARTTLS with 220 and never starts the handshake, ends the call within
// the stage's timeout. The servers are scripted: no real server stalls on request.

import t from "tap";
import { SmtpSession, sendmail } from "../../mail.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { bounded } from "../helpers/daemon.js";

// Far more than the socket buffers hold, so the client must wait for them to drain.
const BIG = "From: a@talker.test\r\nSubject: big\r\n\r\n" + `${"x".repeat(998)}\r\n`.repeat(20_000);

t.test("data(): the server stops reading the body and hangs up; the call ends, it does not wait for a drain that never comes", async (t) => {
  const server = await startScriptedServer({
    onCommand: (c) => (c === "DATA" ? { action: "stop-reading", reply: "354 go ahead", closeAfterMs: 300 } : undefined),
  });
  t.teardown(() => server.close());
  const session = await SmtpSession.open({ host: "127.0.0.1", port: server.port, tls: "none", timeouts: { dataXfer: 30, dataDone: 30 } });
  t.teardown(() => session.close());
  await session.ehlo("talker.test");
  await session.mail("a@talker.test");
  await session.rcpt("b@x.test");
  const outcome = await bounded(session.data(BIG).then((a) => a, (e: Error) => e), 10_000, "data()");
  if (outcome instanceof Error) t.match(outcome.message, /127\.0\.0\.1/, `rejected naming the host: ${outcome.message}`);
  else t.equal(outcome.code, 621, "or answered 621, the connection closed mid-conversation");
  t.ok(session.closed, "the session knows it is closed");
});

t.test("data(): a server that stops reading and stays: the data-xfer timeout ends the call", async (t) => {
  const server = await startScriptedServer({
    onCommand: (c) => (c === "DATA" ? { action: "stop-reading", reply: "354 go ahead" } : undefined),
  });
  t.teardown(() => server.close());
  const session = await SmtpSession.open({ host: "127.0.0.1", port: server.port, tls: "none", timeouts: { dataXfer: 1, dataDone: 30 } });
  t.teardown(() => session.close());
  await session.ehlo("talker.test");
  await session.mail("a@talker.test");
  await session.rcpt("b@x.test");
  const started = Date.now();
  const err = await bounded(session.data(BIG).then(() => null, (e: Error) => e), 10_000, "data()");
  t.match(err, { code: "ETIMEDOUT", message: /timed out while sending message body/ }, `rejects: ${String(err)}`);
  t.match(err, { details: { host: "127.0.0.1", stage: "sending message body", command: "DATA" } }, "the error names the host, the stage and the command");
  t.ok(Date.now() - started < 5000, "after about the data-xfer timeout");
});

t.test("starttls(): 220 and then no handshake; the helo timeout ends it", async (t) => {
  // STARTTLS offered but no TLS behind it: the 220 comes, the handshake never does.
  const server = await startScriptedServer({
    extensions: ["STARTTLS"],
    onCommand: (c) => (c === "STARTTLS" ? { action: "stop-reading", reply: "220 2.0.0 Ready to start TLS" } : undefined),
  });
  t.teardown(() => server.close());
  const started = Date.now();
  const err = await bounded(
    sendmail({ host: "127.0.0.1", port: server.port, tls: "encrypt", timeouts: { helo: 1 }, from: "a@talker.test", to: ["b@x.test"], body: "Subject: s\r\n\r\nhi\r\n" })
      .then((r) => new Error(`resolved: ${JSON.stringify(r)}`), (e: Error) => e),
    10_000, "sendmail()",
  );
  t.match(err, { code: "ETLS", message: /TLS handshake with 127\.0\.0\.1\S* timed out/ }, `rejects: ${String(err)}`);
  t.match(err, { details: { host: "127.0.0.1", stage: "performing the TLS handshake", command: "STARTTLS" } }, "the error names the host, the stage and the command");
  t.ok(Date.now() - started < 5000, "after about the helo timeout");
});
