// send() on an engine that is already running (start()): the message and its bookkeeping
// (RFC 3461 settings) reach the claim together, every message goes out once, and nothing is
// left beside it in outgoing/. The peer is Postfix's smtp-sink, which offers DSN and dumps
// each transaction's MAIL and RCPT arguments.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine, type Outcome } from "../../mail.js";
import { requirePostfix, startPostfix, startSmtpSink } from "../helpers/postfix.js";
import { listFolder, tempMaildir } from "../helpers/spool-files.js";
import { bounded } from "../helpers/daemon.js";

t.test("send() on a running engine: DSN parameters on the wire, each message once, no bookkeeping left behind", async (t) => {
  if (!requirePostfix(t)) return;
  const sink = await startSmtpSink({ dump: true });
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${sink.port}`, log: () => undefined, helo: "talker.test", tls: "none" });
  const sent: Outcome[] = [];
  const allSent = new Promise<void>((resolve) => engine.on("sent", (o: Outcome) => { sent.push(o); if (sent.length >= 20) resolve(); }));
  engine.start();
  t.teardown(() => engine.stop());
  const ids: string[] = [];
  for (let n = 0; n < 20; n++) {
    ids.push(await engine.send({
      from: "talker@talker.test", to: `user${n}@x.test`, subject: `dsn ${n}`, text: "hello\n",
      dsn: { notify: ["success", "failure"], ret: "hdrs", envid: `env-${n}` },
    }));
  }
  await bounded(allSent, 20_000, "20 sent events");
  await new Promise((r) => setTimeout(r, 300)); // a second delivery of any of them would show now
  t.equal(sent.length, 20, "one sent event per message");
  t.same([...new Set(sent.map((o) => o.queueId))].sort(), [...ids].sort(), "each queue id sent once");
  const dumps = await fs.readdir(sink.dumpDir!);
  t.equal(dumps.length, 20, "the server received 20 transactions");
  let withDsn = 0;
  for (const file of dumps) {
    const text = await fs.readFile(path.join(sink.dumpDir!, file), "utf8");
    const n = /X-Mail-Args: .*ENVID=env-(\d+)/.exec(text)?.[1];
    if (n !== undefined && /X-Mail-Args: .*RET=HDRS/.test(text) &&
        new RegExp(`X-Rcpt-Args: <?user${n}@x\\.test>? NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user${n}@x\\.test`).test(text)) withDsn++;
  }
  t.equal(withDsn, 20, "every transaction carried RET, ENVID, NOTIFY and ORCPT");
  await bounded(engine.stop(), 10_000, "stop()");
  const leftovers = (await fs.readdir(path.join(maildir, "outgoing"))).concat(await fs.readdir(path.join(maildir, "outgoing_active")));
  t.same(leftovers, [], "nothing left in outgoing/ or outgoing_active/, no bookkeeping either");
  t.same(await listFolder(maildir, "deferred"), []);
});

t.test("send() on a running engine: NOTIFY=NEVER is honoured when Postfix refuses the recipient", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix();
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir();
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `${postfix.host}:${postfix.port}`, log: (l) => lines.push(l), helo: "talker.test", tls: "none" });
  const bounced: Outcome[] = [];
  const done = new Promise<void>((resolve) => engine.on("bounced", (o: Outcome) => { bounced.push(o); if (bounced.length >= 5) resolve(); }));
  engine.start();
  t.teardown(() => engine.stop());
  const ids: string[] = [];
  // Postfix relays nothing for other domains: 554 5.7.1 at RCPT, a permanent refusal.
  for (let n = 0; n < 5; n++) ids.push(await engine.send({ from: "talker@talker.test", to: `u${n}@elsewhere.test`, subject: "never", text: "x\n", dsn: { notify: ["never"] } }));
  await bounded(done, 20_000, "5 bounced events");
  await bounded(engine.stop(), 10_000, "stop()");
  for (const id of ids) t.match(lines.join("\n"), `${id}: no non-delivery notification: the sender asked for NOTIFY=NEVER`, `${id}: no bounce`);
  t.notMatch(lines.join("\n"), /sender non-delivery notification/, "no report queued for any of them");
  t.same(await fs.readdir(path.join(maildir, "outgoing")), [], "nothing queued, no bookkeeping left");
});
