// Crash safety: kill -9 the flushing process at several moments, restart, and check that
// every message arrives, none is lost or stuck, and duplicates stay within the window
// between a server's 250 after the dot and the unlink of the queue file.

import t from "tap";
import path from "node:path";
import fs from "node:fs/promises";
import { sleep, spawnDaemon } from "../helpers/daemon.js";
import { requirePostfix, startPostfix } from "../helpers/postfix.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { MAIL_JS, dropQueueFile, listFolder, makeSpool, queueFile, runCli, tempMaildir, testMessage, testNumber } from "../helpers/spool-files.js";


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
    const child = spawnDaemon(process.execPath, [MAIL_JS, "--flush", "--relay", relay, "--maildir", maildir, "--log", `${maildir}/../mail.log`], path.dirname(maildir), `flush-${threshold}`);
    const deadline = Date.now() + 60_000;
    // Kill once the server has stored `threshold` messages: deliveries are in flight on every slot.
    while (Date.now() < deadline && (await postfix.readMessages()).length < threshold && !child.exited()) await sleep(20);
    await child.kill("SIGKILL");
    t.pass(`killed at ${(await postfix.readMessages()).length} stored; ${(await listFolder(maildir, "outgoing_active")).length} left in outgoing_active/`);
  }
  const last = await runCli(["--flush", "--relay", relay, "--maildir", maildir, "--log", `${maildir}/../mail.log`], { timeoutMs: 120_000 });
  t.equal(last.code, 0, `the last flush exits 0: ${last.stderr}`);
  t.match(last.stdout, /flush: \d+ messages?: \d+ sent, 0 deferred, 0 bounced, 0 corrupt/);
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

t.test("kill -9 at random moments with deferred and active messages: nothing lost, nothing stuck", async (t) => {
  // The server takes its time (so kills land mid-session) and refuses every third message for
  // now, so deferred/ fills while outgoing/ and outgoing_active/ are busy.
  let refusing = true;
  const server = await startScriptedServer({
    rcpt: (address) => (refusing && /^busy/.test(address) ? "450 4.2.0 mailbox busy" : undefined),
    onData: () => ({ action: "delay", ms: 3, reply: "250 2.0.0 Ok" }),
  });
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const total = 300;
  const now = Math.floor(Date.now() / 1000);
  for (let n = 0; n < total; n++) {
    const rcpt = n % 3 === 0 ? `busy${n}@test.example` : `user${n}@test.example`;
    await dropQueueFile(maildir, `${now}.${n}`, queueFile("<>", [rcpt], testMessage(n)));
  }
  const relay = `127.0.0.1:${server.port}`;
  const logFile = `${maildir}/../mail.log`;
  let seed = 12345;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let k = 0; k < 8; k++) {
    const args = ["--flush", ...(k % 2 ? ["--force"] : []), "--relay", relay, "--maildir", maildir, "--log", logFile, "--min-backoff", "1", "--max-backoff", "2"];
    const child = spawnDaemon(process.execPath, [MAIL_JS, ...args], path.dirname(maildir), `flush-${k}`);
    await sleep(60 + Math.floor(random() * 400));
    await child.kill("SIGKILL");
  }
  const states = await Promise.all(["outgoing", "outgoing_active", "deferred"].map((f) => listFolder(maildir, f)));
  t.comment(`after 8 kills: ${states.map((s) => s.length).join(" / ")} in outgoing / outgoing_active / deferred`);
  refusing = false;
  const last = await runCli(["--flush", "--force", "--relay", relay, "--maildir", maildir, "--log", logFile], { timeoutMs: 60_000 });
  t.equal(last.code, 0, last.stderr);
  const log = await fs.readFile(logFile, "utf8");
  for (const folder of ["outgoing", "outgoing_active", "deferred", "corrupt"]) {
    const left = await listFolder(maildir, folder);
    const history = left.flatMap((id) => log.split("\n").filter((l) => l.includes(`${id}:`) || l.includes(`/${id}`)));
    t.same(left, [], `${folder}/ is empty${left.length ? `; the log of what is left:\n${history.join("\n")}` : ""}`);
  }
  const delivered = new Map<number, number>();
  for (const m of server.messages) {
    const n = testNumber(m.data);
    if (n !== null) delivered.set(n, (delivered.get(n) ?? 0) + 1);
  }
  t.equal(delivered.size, total, "every message was delivered");
  const duplicates = [...delivered.values()].reduce((sum, c) => sum + c - 1, 0);
  t.ok(duplicates <= 8 * 10, `duplicates only from the data-done window: ${duplicates}`);
  t.comment(`duplicates after 8 kills: ${duplicates}`);
});
