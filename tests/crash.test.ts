// Crash safety: kill -9 the flushing process at several moments, restart, and check that
// every message arrives, none is lost or stuck, and duplicates stay within the window
// between a server's 250 after the dot and the unlink of the queue file.

import t from "tap";
import { spawn } from "node:child_process";
import { requirePostfix, startPostfix } from "./helpers/postfix.js";
import { MAIL_JS, dropQueueFile, listFolder, makeSpool, queueFile, runCli, tempMaildir, testMessage, testNumber } from "./helpers/spool-files.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test("kill -9 mid-flush loses nothing on restart", async (t) => {
  if (!requirePostfix(t)) return;
  const postfix = await startPostfix();
  t.teardown(() => postfix.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const total = 1000;
  const second = Math.floor(Date.now() / 1000) - 10;
  for (let n = 0; n < total; n++) {
    await dropQueueFile(maildir, `${second}.${n}`, queueFile("talker@test.example", [`user${n}@${postfix.domain}`], testMessage(n, { bodyLines: 20 })));
  }
  const relay = `${postfix.host}:${postfix.port}`;
  const kills = [150, 400, 700];
  for (const threshold of kills) {
    const child = spawn(process.execPath, [MAIL_JS, "--flush", "--relay", relay, "--maildir", maildir, "--log", `${maildir}/../mail.log`], { stdio: "ignore" });
    const exited = new Promise((r) => child.on("exit", r));
    const deadline = Date.now() + 60_000;
    // Kill once the server has stored `threshold` messages: deliveries are in flight on every slot.
    while (Date.now() < deadline && (await postfix.readMessages()).length < threshold && child.exitCode === null) await sleep(20);
    child.kill("SIGKILL");
    await exited;
    t.pass(`killed at ${(await postfix.readMessages()).length} stored; ${(await listFolder(maildir, "outgoing_active")).length} left in outgoing_active/`);
  }
  const last = await runCli(["--flush", "--relay", relay, "--maildir", maildir, "--log", `${maildir}/../mail.log`], { timeoutMs: 120_000 });
  t.equal(last.code, 0, `the last flush exits 0: ${last.stderr}`);
  t.match(last.stdout, /flush: \d+ sent, 0 deferred, 0 bounced, 0 corrupt/);
  t.same(await listFolder(maildir, "outgoing"), [], "outgoing/ empty");
  t.same(await listFolder(maildir, "outgoing_active"), [], "outgoing_active/ empty");

  await sleep(500);
  const stored = await postfix.waitForMessages(total, 60_000);
  const counts = new Map<number, number>();
  for (const copy of stored) {
    const n = testNumber(copy);
    if (n !== null) counts.set(n, (counts.get(n) ?? 0) + 1);
  }
  t.equal(counts.size, total, "every message was delivered");
  const duplicates = [...counts.values()].reduce((sum, c) => sum + c - 1, 0);
  // Per kill at most one message per slot can be past its 250 and not yet unlinked, plus one per slot in the dot window.
  t.ok(duplicates <= kills.length * 10, `duplicates only from the data-done window: ${duplicates}`);
  t.comment(`duplicates after ${kills.length} kills: ${duplicates}`);
});
