// The log as Postfix's tools read it: mail queued three ways (send(), --send, a file dropped
// in outgoing/) and flushed through a real Postfix that accepts, defers (DEFER) and refuses
// (REJECT) recipients; the real pflogsumm, told --syslog-name=mudmail, counts what was
// received, delivered, deferred and bounced, and names the senders. --syslog-name changes the name.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { run } from "../helpers/daemon.js";
import { requirePostfix, requireTool, startPostfix } from "../helpers/postfix.js";
import { dropQueueFile, queueFile, runCli, tempMaildir, testMessage } from "../helpers/spool-files.js";

const PFLOGSUMM = "/usr/sbin/pflogsumm";

/** pflogsumm's "Grand Totals" counts by label ("received", "delivered", ...). */
function grandTotals(report: string): Record<string, number> {
  const totals: Record<string, number> = {};
  const block = /Grand Totals\n-+\nmessages\n\n([\s\S]*?)\n\n/.exec(report)?.[1] ?? "";
  for (const m of block.matchAll(/^\s*(\d+)\s+(\w+)/gm)) totals[m[2]] = Number(m[1]);
  return totals;
}

/** The addresses of one "by message count" section of the report. */
function section(report: string, title: string): string[] {
  const block = new RegExp(`${title}\\n-+\\n([\\s\\S]*?)(?:\\n\\n|$)`).exec(report)?.[1] ?? "";
  return block.split("\n").map((l) => /^\s*\d+\s+\S+\s+\S+\s+(\S+)$/.exec(l)?.[1] ?? /^\s*\d+\s+(\S+@\S+)$/.exec(l)?.[1]).filter((a): a is string => !!a).sort();
}

t.test("pflogsumm --syslog-name=mudmail reads a real flush's log", async (t) => {
  if (!requirePostfix(t) || !requireTool(t, PFLOGSUMM)) return;
  const pf = await startPostfix({
    mainCf: { smtpd_recipient_restrictions: "check_recipient_access inline:{later@test.example=DEFER, gone@test.example=REJECT}, permit_mynetworks, reject" },
  });
  t.teardown(() => pf.stop());
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  const relay = `${pf.host}:${pf.port}`;

  // 1. send(), embedded: refused for good (NOTIFY=NEVER: no bounce message to deliver).
  const engine = new MailEngine({ maildir, relay, log, tls: "none" });
  await engine.send({ from: "carol@talker.test", to: "gone@test.example", subject: "one", text: "hi\n", dsn: { notify: ["never"] } });
  await engine.stop();
  // 2. --send: delivered.
  const sent = await runCli(["--send", "--maildir", maildir, "--log", log, "-f", "alice@talker.test", "-s", "two", "u1@test.example"], { input: "hello\n" });
  t.equal(sent.code, 0, sent.stderr);
  // 3. a file dropped into outgoing/ by another program: one recipient delivered, one deferred.
  await dropQueueFile(maildir, `${Math.floor(Date.now() / 1000) - 5}.0`, queueFile("bob@talker.test", ["u2@test.example", "later@test.example"], testMessage(3)));

  const flush = await runCli(["--flush", "--relay", relay, "--tls", "none", "--maildir", maildir, "--log", log]);
  t.equal(flush.code, 0, flush.stderr);
  t.match(flush.stdout, /flush: 3 messages: 1 sent, 1 deferred, 1 bounced, 0 corrupt; 4 recipients: 2 sent, 1 deferred, 1 bounced/);
  const lines = await fs.readFile(log, "utf8");
  t.equal(lines.match(/ mudmail\/pickup\[\d+\]: \S+: uid=\d+ from=<[^>]*>$/gm)?.length, 3, "one pickup line per message");
  t.match(lines, /mudmail\/cleanup\[\d+\]: \S+: message-id=<test\.3@test\.example>$/m, "the dropped file's own Message-ID");
  t.equal(lines.match(/ mudmail\/cleanup\[\d+\]: \S+: message-id=<[^>]+>$/gm)?.length, 3, "one cleanup line per message");
  for (const sender of ["alice", "bob", "carol"]) {
    const pickup = lines.indexOf(`from=<${sender}@talker.test>`);
    const active = lines.search(new RegExp(`from=<${sender}@talker\\.test>, size=`));
    t.ok(pickup >= 0 && pickup < active, `${sender}: the pickup line comes before qmgr's`);
  }

  const r = await run(PFLOGSUMM, ["--syslog-name=mudmail", "--problems-first", log], { timeoutMs: 30_000 });
  t.equal(r.code, 0, r.stderr);
  const totals = grandTotals(r.stdout);
  t.match(totals, { received: 3, delivered: 2, deferred: 1, bounced: 1 }, `pflogsumm's grand totals:\n${r.stdout.slice(0, 800)}`);
  t.same(section(r.stdout, "Senders by message count"), ["alice@talker.test", "bob@talker.test", "carol@talker.test"], "the senders");
  t.same(section(r.stdout, "Recipients by message count"), ["u1@test.example", "u2@test.example"], "the recipients delivered to");

  const unnamed = await run(PFLOGSUMM, [log], { timeoutMs: 30_000 });
  t.match(grandTotals(unnamed.stdout), { received: 0, delivered: 0 }, "without --syslog-name pflogsumm sees none of it (why the README names it)");
});

t.test("--syslog-name NAME names the log lines", async (t) => {
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  const r = await runCli(["--send", "--syslog-name", "talker-mail", "--maildir", maildir, "--log", log, "-f", "a@talker.test", "u@test.example"], { input: "x\n" });
  t.equal(r.code, 0, r.stderr);
  const q = await runCli(["--hold", "ALL", "--syslog-name", "talker-mail", "--maildir", maildir, "--log", log]);
  t.equal(q.code, 0, q.stderr);
  t.match(await fs.readFile(log, "utf8"), /^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ talker-mail\/postsuper\[\d+\]: \S+: placed on hold$/m);
  const bad = await runCli(["--flush", "--syslog-name", "bad name", "--maildir", maildir]);
  t.equal(bad.code, 2);
  t.match(bad.stderr, /^mudmail: --syslog-name: expected a name/);
});
