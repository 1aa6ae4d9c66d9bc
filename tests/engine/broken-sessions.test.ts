// Sessions that break, against the scripted server (tests/helpers/engine-rig.ts): 421 at every
// stage, a hang-up mid-session, garbage and replies split byte by byte, a stage that never
// answers, connects that fail. Pending mail stays queued (deferred/), nothing is lost.

import * as fs from "node:fs";
import * as path from "node:path";
import net from "node:net";
import { syncBuiltinESMExports } from "node:module";
import t from "tap";
import { type Script } from "../helpers/scripted-server.js";
import { setup, checkLog, mailCommands, simple, PIPELINING_VARIANTS } from "../helpers/engine-rig.js";

t.test("8. 421 at greeting, MAIL, RCPT and after the dot: pending mail stays queued", async (tt) => {
  const cases: Array<{ name: string; script: Script; inReplyTo: RegExp }> = [
    { name: "greeting", script: { greeting: "421 4.3.2 scripted.test Service shutting down" }, inReplyTo: /\(in reply to the initial greeting\)/ },
    { name: "MAIL", script: { mail: () => "421 4.3.2 Service shutting down" }, inReplyTo: /\(in reply to MAIL FROM command\)/ },
    {
      name: "second RCPT",
      script: { rcpt: (_a, s) => (s.rcptTo.length === 1 ? "421 4.3.2 Service shutting down" : undefined) },
      inReplyTo: /\(in reply to RCPT TO command\)/,
    },
    { name: "after the dot", script: { onData: () => "421 4.3.2 Service shutting down" }, inReplyTo: /\(in reply to end of DATA command\)/ },
  ];
  for (const c of cases) {
    await tt.test(c.name, async (tt) => {
      const rig = await setup(tt, { script: c.script });
      const content = simple("a@example.org", ["b@example.net", "c@example.net"]);
      const id = rig.drop(content);
      const summary = await rig.flush();
      tt.match(summary, { sent: 0, deferred: 1, bounced: 0, corrupt: 0 }, "deferred");
      tt.ok(summary.seconds < 5, `flush ended in ${summary.seconds} s`);
      tt.same(rig.where(id), ["deferred"], "still queued, in deferred/ only");
      tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content, "file unchanged");
      tt.same(rig.errors, [], "no error event");
      tt.same(rig.server.errors, [], "no script error");
      tt.equal(rig.server.messages.length, 0, "nothing accepted");
      tt.ok(rig.server.connections <= 2, `at most 2 connections (${rig.server.connections})`);
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 2, "a line for each recipient");
      for (const o of outcomes) {
        tt.equal(o.status, "deferred");
        tt.match(o.text, /421 4\.3\.2 .*Service shutting down/, "the server's words");
        tt.match(o.text, c.inReplyTo);
      }
      for (const e of rig.events.deferred) tt.equal(e.queueId, id);
    });
  }
});

t.test("9. disconnect mid-session", async (tt) => {
  await tt.test("server hangs up at DATA: deferred", async (tt) => {
    const rig = await setup(tt, { script: { onCommand: (c) => (c === "DATA" ? { action: "close" } : undefined) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 1);
    tt.equal(outcomes[0].status, "deferred");
    tt.match(outcomes[0].text, /^lost connection with 127\.0\.0\.1\[127\.0\.0\.1\] while sending DATA command/);
    tt.same(rig.errors, []);
  });

  await tt.test("server resets the connection at RCPT: deferred", async (tt) => {
    const rig = await setup(tt, { script: { pipelining: false, rcpt: () => ({ action: "reset" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net", "c@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 2, "both recipients deferred");
    for (const o of outcomes) {
      tt.equal(o.status, "deferred");
      tt.match(o.text, /^lost connection with \S+ while sending RCPT TO \(Connection reset by peer\)$/);
    }
  });

  await tt.test("server hangs up after the message data, before its reply: deferred", async (tt) => {
    const rig = await setup(tt, { script: { onData: () => ({ action: "close" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    tt.equal(rig.server.sessions[0].unaccepted.length, 1, "the server had the data");
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes[0]?.status, "deferred");
    tt.match(outcomes[0]?.text, /^lost connection with \S+ while sending end of data -- message may be sent more than once/);
  });

  await tt.test("server hangs up after the first of two messages: that one removed, the other deferred", async (tt) => {
    const rig = await setup(tt, {
      engine: { maxConnections: 1 },
      script: { onCommand: (c, s) => (/^MAIL/i.test(c) && s.messages.length >= 1 ? { action: "close" } : undefined) },
    });
    const one = rig.drop(simple("one@example.org", ["a@example.net"]));
    const two = rig.drop(simple("two@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 1, deferred: 1, bounced: 0, messages: 2 });
    tt.equal(rig.server.messages.length, 1);
    const delivered = rig.server.messages[0].from === "one@example.org" ? one : two;
    const other = delivered === one ? two : one;
    tt.same(rig.where(delivered), [], "the finished one is removed");
    tt.same(rig.where(other), ["deferred"], "the unfinished one waits in deferred/");
    const outcomes = checkLog(tt, rig);
    tt.match(outcomes.find((o) => o.id === delivered), { status: "sent" });
    tt.match(outcomes.find((o) => o.id === other), { status: "deferred" });
    tt.match(outcomes.find((o) => o.id === other)?.text ?? "", /^lost connection with \S+ while sending MAIL FROM/);
  });
});

t.test("10. garbage and a reply split byte by byte", async (tt) => {
  await tt.test("garbage to MAIL: deferred with a protocol error", async (tt) => {
    const rig = await setup(tt, { script: { mail: () => ({ action: "raw", bytes: "hello world\r\n" }) } });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
    tt.same(rig.where(id), ["deferred"]);
    const outcomes = checkLog(tt, rig);
    tt.equal(outcomes.length, 1);
    tt.equal(outcomes[0].status, "deferred");
    tt.match(outcomes[0].text, /protocol/i, "a protocol error");
    tt.match(outcomes[0].text, /hello world/, "quoting what the server said");
    tt.same(rig.errors, []);
  });

  for (const variant of PIPELINING_VARIANTS) await tt.test(`greeting, EHLO, MAIL, RCPT and dot replies split byte by byte, ${variant.name}: delivered`, async (tt) => {
    const bytes = (text: string) => ({ action: "raw" as const, chunks: [...text], delayMs: 1 });
    const rig = await setup(tt, {
      script: {
        greeting: bytes("220 split.test ESMTP\r\n"),
        ehlo: bytes(`250-split.test\r\n${variant.pipelining ? "250-PIPELINING\r\n" : ""}250-SIZE 100000\r\n250 8BITMIME\r\n`),
        mail: () => bytes("250 2.1.0 Ok\r\n"),
        rcpt: () => bytes("250 2.1.5 Ok\r\n"),
        onData: () => bytes("250 2.0.0 Ok: queued as SPLIT\r\n"),
      },
    });
    const id = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { sent: 1, deferred: 0, bounced: 0 });
    tt.same(rig.where(id), []);
    tt.equal(rig.server.messages.length, 1);
    const outcomes = checkLog(tt, rig);
    tt.match(outcomes[0], { status: "sent", dsn: "2.0.0", text: "250 2.0.0 Ok: queued as SPLIT" });
    tt.match(mailCommands(rig.server.sessions[0])[0], /SIZE=\d+/, "the split EHLO reply was understood (SIZE)");
    tt.same(rig.server.sessions[0].pipeliningViolations, [], "no pipelining violation");
  });
});

t.test("11. a stage that never answers: timed out, deferred", async (tt) => {
  const silentFrom = (verb: string): Script["onCommand"] => {
    let silent = false;
    return (c) => {
      if (new RegExp(`^${verb}\\b`, "i").test(c)) silent = true;
      return silent ? { action: "silence" } : undefined;
    };
  };
  const cases: Array<{ name: string; script: Script; label: RegExp }> = [
    { name: "greeting", script: { greeting: { action: "silence" } }, label: /timed out while receiving the initial server greeting/ },
    { name: "MAIL", script: { onCommand: silentFrom("MAIL") }, label: /timed out while sending MAIL FROM/ },
    { name: "DATA", script: { onCommand: silentFrom("DATA") }, label: /timed out while sending DATA command/ },
    { name: "dot", script: { onData: () => ({ action: "silence" }) }, label: /timed out while sending end of data -- message may be sent more than once/ },
  ];
  for (const c of cases) {
    await tt.test(c.name, async (tt) => {
      const rig = await setup(tt, { script: c.script });
      const content = simple("a@example.org", ["b@example.net"]);
      const id = rig.drop(content);
      const started = Date.now();
      const summary = await rig.flush();
      const took = (Date.now() - started) / 1000;
      tt.ok(took < 4.5, `flush ended in ${took} s`);
      tt.ok(took >= 0.9, `after the 1 s timeout (${took} s)`);
      tt.match(summary, { sent: 0, deferred: 1, bounced: 0 });
      tt.same(rig.where(id), ["deferred"], "in deferred/ only");
      tt.equal(fs.readFileSync(path.join(rig.maildir, "deferred", id), "utf8"), content);
      const outcomes = checkLog(tt, rig);
      tt.equal(outcomes.length, 1);
      tt.equal(outcomes[0].status, "deferred");
      tt.match(outcomes[0].text, c.label);
      tt.same(rig.errors, []);
    });
  }
});

t.test("14. connect failures: nothing listening", async (tt) => {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const deadPort = (probe.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));

  // Count connection attempts and failures: wrap node:net's connect for the ESM importers too.
  const realConnect = net.connect;
  const seq: Array<"attempt" | "failure"> = [];
  (net as unknown as { connect: typeof net.connect }).connect = ((...args: Parameters<typeof net.connect>) => {
    const socket = realConnect(...args);
    const opts = args[0] as unknown as net.TcpNetConnectOpts;
    if (typeof opts === "object" && opts.port === deadPort) {
      seq.push("attempt");
      socket.once("error", () => seq.push("failure"));
    }
    return socket;
  }) as typeof net.connect;
  syncBuiltinESMExports();
  tt.teardown(() => {
    (net as unknown as { connect: typeof net.connect }).connect = realConnect;
    syncBuiltinESMExports();
  });

  const rig = await setup(tt, { relay: `127.0.0.1:${deadPort}` });
  const ids = Array.from({ length: 10 }, (_, i) => rig.drop(simple(`s${i}@example.org`, [`r${i}@example.net`, `q${i}@example.net`])));
  const started = Date.now();
  const summary = await rig.flush();
  const took = (Date.now() - started) / 1000;
  tt.ok(took < 2, `flush ended quickly (${took} s)`);
  tt.match(summary, { sent: 0, deferred: 10, bounced: 0, corrupt: 0, messages: 10, recipients: 20 });
  for (const id of ids) tt.same(rig.where(id), ["deferred"], `${id} waits in deferred/`);
  const outcomes = checkLog(tt, rig);
  tt.equal(outcomes.length, 20);
  for (const o of outcomes) {
    tt.equal(o.relay, "none", "relay=none");
    tt.equal(o.status, "deferred");
    tt.match(o.line, /status=deferred \(.*Connection refused.*\)$/);
  }
  const attempts = seq.filter((x) => x === "attempt").length;
  tt.comment(`connection attempts to the dead port: ${seq.join(", ")}`);
  tt.ok(attempts >= 2, `the spy saw the attempts (${attempts})`);
  const secondFailure = seq.indexOf("failure", seq.indexOf("failure") + 1);
  tt.ok(secondFailure > 0, "two failures");
  tt.notOk(seq.slice(secondFailure).includes("attempt"), "no connection attempt after the second failure");
  tt.equal(attempts, 2, `two failed connects end the tick (${attempts} attempts for 10 messages)`);
});
