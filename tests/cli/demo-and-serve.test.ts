// The README's first command (npm start = --demo) and the receiver run from the command line.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { sendmail } from "../../mail.js";
import { freePort } from "../helpers/postfix.js";
import { spawnDaemon } from "../helpers/daemon.js";
import { MAIL_JS, runCli, tempMaildir } from "../helpers/spool-files.js";

t.test("--demo shows the whole path: queued, sent through the receiver, and the mailbox it landed in", async (t) => {
  const r = await runCli(["--demo"], { timeoutMs: 30_000 });
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /mudmail demo: a receiver on 127\.0\.0\.1:\d+ with the user demo@localhost/);
  t.match(r.stdout, /mudmail\/smtp\[\d+\]: \d+\.\d+: to=<demo@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*dsn=2\.0\.0, status=sent \(250 /);
  t.match(r.stdout, /mudmail: flush: 1 message: 1 sent, 0 deferred, 0 bounced, 0 corrupt; 1 recipient: 1 sent, 0 deferred, 0 bounced/);
  const landed = /It landed in (\S+\/users\/demo@localhost\/mail):/.exec(r.stdout);
  t.ok(landed, "the mailbox path is printed");
  const mbox = await fs.readFile(landed![1], "utf8");
  t.match(mbox, /^From talker@localhost /, "an mbox From line");
  t.match(mbox, /\nSubject: Welcome to the talker\n[^]*\n\nHello from mudmail!\n\.\nThis line follows a line with a lone dot\.\n/);
  t.ok(r.stdout.includes(mbox.replace(/\n$/, "")), "and its content is printed");
});

t.test("--serve receives for the users in users/ until SIGTERM; bad receiver flags exit 2", async (t) => {
  const maildir = await tempMaildir();
  await fs.mkdir(path.join(maildir, "users", "bob@local.test"), { recursive: true, mode: 0o700 });
  await fs.chmod(path.dirname(maildir), 0o700);
  const port = await freePort();
  const server = spawnDaemon(process.execPath, [MAIL_JS, "--serve", "--listen", `127.0.0.1:${port}`, "--maildir", maildir, "--hostname", "mx.local.test"], path.dirname(maildir), "serve");
  t.teardown(() => server.kill("SIGKILL"));
  await server.waitForOutput(/receiving mail/, 10_000);
  t.match(server.output(), /receiving mail for .*users\/<address>\/ on 127\.0\.0\.1:\d+/);
  const ok = await sendmail({ host: "127.0.0.1", port, from: "a@x.test", to: ["bob@local.test"], body: "Subject: hi\n\nhello bob\n", tls: "none" });
  t.match(ok, { code: 250 });
  const refused = await sendmail({ host: "127.0.0.1", port, from: "a@x.test", to: ["eve@elsewhere.test"], body: "x\n", tls: "none" });
  t.match(refused, { code: 700, losers: [{ rcpt: "eve@elsewhere.test", code: 550 }] }, "never an open relay");
  t.match(await fs.readFile(path.join(maildir, "users", "bob@local.test", "mail"), "utf8"), /\nhello bob\n/);
  const journals = await fs.readdir(path.join(maildir, "journal"));
  t.match(journals[0], /^\d{4}_\d\d_\d\d_\d\d$/, "an hourly journal file");
  await server.kill("SIGTERM");
  t.equal((await server.done).code, 0, "exits 0 on SIGTERM");

  for (const [args, pattern] of [[["--max-recipients", "50"], /--max-recipients/], [["--max-size", "x"], /--max-size/], [["--listen", "nowhere"], /--listen/]] as const) {
    const r = await runCli(["--serve", ...args, "--maildir", maildir]);
    t.equal(r.code, 2, `${args.join(" ")} exits 2`);
    t.match(r.stderr, pattern);
  }
});
