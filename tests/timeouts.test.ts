// Every stage has its timer (Postfix's smtp_*_timeout): a server that stops answering at any
// stage ends the session within that stage's time, and what was pending is deferred.

import t, { type Test } from "tap";
import net from "node:net";
import { MailEngine } from "../mail.js";
import { startScriptedServer, type Script } from "./helpers/scripted-server.js";
import { startDnsServer } from "./helpers/dns-server.js";
import { dropQueueFile, listFolder, makeSpool, queueFile, tempMaildir } from "./helpers/spool-files.js";

const MESSAGE = "From: a@talker.test\nSubject: s\nDate: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <t@talker.test>\n\nbody\n";
const SHORT = { connectTimeout: 1, heloTimeout: 1, mailTimeout: 1, rcptTimeout: 1, dataInitTimeout: 1, dataXferTimeout: 1, dataDoneTimeout: 1, quitTimeout: 1 };

async function attempt(t: Test, relay: string, message = MESSAGE, extra: Record<string, unknown> = {}) {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const id = `${Math.floor(Date.now() / 1000)}.1`;
  await dropQueueFile(maildir, id, queueFile("<>", ["bob@x.test"], message));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay, log: (l) => lines.push(l), fsync: false, ...SHORT, ...extra });
  t.teardown(() => engine.stop());
  const started = Date.now();
  const summary = await engine.flush();
  return { summary, seconds: (Date.now() - started) / 1000, lines, maildir, id };
}


const silent: Array<[string, Script, RegExp]> = [
  ["greeting", { greeting: { action: "silence" } }, /timed out while receiving the initial server greeting/],
  ["EHLO", { ehlo: { action: "silence" } }, /timed out while performing the EHLO handshake/],
  ["MAIL", { mail: () => ({ action: "silence" }) }, /timed out while sending MAIL FROM/],
  ["RCPT", { rcpt: () => ({ action: "silence" }) }, /timed out while sending RCPT TO/],
  ["DATA", { onCommand: (c) => (c === "DATA" ? { action: "silence" } : undefined) }, /timed out while sending DATA command/],
  ["end of data", { onData: () => ({ action: "silence" }) }, /timed out while sending end of data -- message may be sent more than once/],
];

for (const [stage, script, reason] of silent) {
  t.test(`a server silent at ${stage}: deferred within the stage's timeout`, async (t) => {
    const server = await startScriptedServer({ pipelining: false, ...script });
    t.teardown(() => server.close());
    const r = await attempt(t, `127.0.0.1:${server.port}`);
    t.match(r.summary, { deferred: 1, sent: 0 });
    t.ok(r.seconds < 4, `ended in ${r.seconds} s`);
    t.match(r.lines.join("\n"), reason);
    t.same(await listFolder(r.maildir, "deferred"), [r.id]);
  });
}

t.test("a server that stops reading the body: the data-xfer timeout ends it", async (t) => {
  // Accepts the envelope, answers 354, then reads nothing more: the body fills the socket
  // buffers, the engine waits for drain, and --data-xfer-timeout ends the wait.
  const server = net.createServer((c) => {
    c.write("220 stall.test ESMTP\r\n");
    let buffered = "";
    const onData = (d: Buffer) => {
      buffered += d.toString("latin1");
      let i: number;
      while ((i = buffered.indexOf("\r\n")) >= 0) {
        const line = buffered.slice(0, i).toUpperCase();
        buffered = buffered.slice(i + 2);
        if (line.startsWith("EHLO")) c.write("250-stall.test\r\n250 8BITMIME\r\n");
        else if (line === "DATA") { c.write("354 go on\r\n"); c.off("data", onData); c.pause(); return; }
        else c.write("250 ok\r\n");
      }
    };
    c.on("data", onData);
    c.on("error", () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.teardown(() => { server.close(); });
  const port = (server.address() as net.AddressInfo).port;
  const big = MESSAGE + "x".repeat(998) .concat("\n").repeat(30_000); // ~30 MB streamed from the file
  const r = await attempt(t, `127.0.0.1:${port}`, big);
  t.match(r.summary, { deferred: 1 });
  t.ok(r.seconds < 10, `ended in ${r.seconds} s`);
  t.match(r.lines.join("\n"), /timed out while sending message body/);
});

t.test("--no-skip-quit-response waits for 221 up to --quit-timeout; the default does not wait", async (t) => {
  const server = await startScriptedServer({ onCommand: (c) => (c === "QUIT" ? { action: "silence" } : undefined) });
  t.teardown(() => server.close());
  const waiting = await attempt(t, `127.0.0.1:${server.port}`, MESSAGE, { skipQuitResponse: false, quitTimeout: 2 });
  t.match(waiting.summary, { sent: 1 });
  t.ok(waiting.seconds >= 1.8 && waiting.seconds < 4, `waited for the reply to QUIT (${waiting.seconds} s)`);
  t.notMatch(waiting.lines.join("\n"), /status=deferred/, "a missing 221 changes no outcome");
  const quick = await attempt(t, `127.0.0.1:${server.port}`, MESSAGE, { quitTimeout: 2 });
  t.match(quick.summary, { sent: 1 });
  t.ok(quick.seconds < 1, `did not wait (${quick.seconds} s)`);
});

t.test("a DNS server that never answers defers (it may answer later)", async (t) => {
  const dns = await startDnsServer({ "slow.test": { rcode: "TIMEOUT" } });
  t.teardown(() => dns.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  await dropQueueFile(maildir, `${Math.floor(Date.now() / 1000)}.1`, queueFile("<>", ["bob@slow.test"], MESSAGE));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, resolver: dns.address, dnsTimeout: 0.3, log: (l) => lines.push(l), fsync: false });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { deferred: 1 });
  t.match(lines.join("\n"), /dsn=4\.4\.3, status=deferred \(Host or domain name not found\. Name service error for name=slow\.test type=MX: Host not found, try again/);
});
