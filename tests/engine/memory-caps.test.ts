// Caps: hostile servers (an endless line, endless lines, a flood of replies; in a child process,
// so that the RSS measured here is the engine's alone) cannot make the engine's memory grow.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import t, { type Test } from "tap";
import { MailEngine, type FlushSummary } from "../../mail.js";
import { OPENSSL } from "../helpers/certs.js";
import { requireTool } from "../helpers/postfix.js";
import { FAST, message, smtpLines, startHostile } from "../helpers/security-rig.js";
import { bounded, newQueueId } from "../helpers/engine-rig.js";

t.test("caps", async (t) => {
  if (!requireTool(t, OPENSSL)) return;

  /* 12 --------------------------------------------------------------------------------- */
  t.test("caps: hostile servers cannot make the engine's memory grow", async (t) => {
    const LIMIT_MB = 64;
    const measure = async (t: Test, mode: "longline" | "manylines" | "flood", limit: number, reason: RegExp): Promise<void> => {
      const hostile = await startHostile(t, mode, limit);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-security-caps-"));
      t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
      const maildir = path.join(dir, "maildir");
      fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
      fs.writeFileSync(path.join(dir, "m"), message(300));
      const id = newQueueId();
      fs.renameSync(path.join(dir, "m"), path.join(maildir, "outgoing", id));
      const lines: string[] = [];
      const engine = new MailEngine({ maildir, relay: `127.0.0.1:${hostile.port}`, log: (l) => lines.push(l), helo: "client.test", fsync: false, tls: "may", ...FAST });
      engine.on("error", () => undefined);
      t.teardown(() => bounded(engine.stop(), 5000, "stop").catch(() => undefined));
      const before = process.memoryUsage.rss();
      let peak = before;
      const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 5);
      let s: FlushSummary;
      try {
        s = await bounded(engine.flush(), 30_000, `flush against the ${mode} server`);
      } finally {
        clearInterval(sampler);
      }
      peak = Math.max(peak, process.memoryUsage.rss());
      const growth = (peak - before) / 2 ** 20;
      t.match(s, { sent: 0, deferred: 1 }, "deferred");
      t.ok(fs.existsSync(path.join(maildir, "deferred", id)), "the message waits in deferred/");
      const deferredLine = smtpLines(lines, "deferred")[0] ?? "";
      t.match(deferredLine, reason, `the log says why the session was dropped: ${deferredLine.replace(/^.*status=deferred /, "")}`);
      await bounded((async () => { while (hostile.closed().length === 0) await new Promise((r) => setTimeout(r, 20)); })(), 10_000, "the client to hang up");
      t.ok(hostile.closed().length >= 1, `the engine hung up (${JSON.stringify(hostile.closed())})`);
      t.ok(growth < LIMIT_MB, `RSS grew ${growth.toFixed(1)} MB (< ${LIMIT_MB} MB) while the server sent ${(hostile.closed()[0]?.written ?? 0) / 2 ** 20} MB`);
    };
    await t.test("a 20 MB EHLO reply line without LF", (t) => measure(t, "longline", 20 * 2 ** 20, /longer than \d+ octets/));
    await t.test("100,000 continuation lines 250-x", (t) => measure(t, "manylines", 100_000, /longer than \d+ lines/));
    await t.test("a flood of replies right after the greeting, faster than we read", (t) => measure(t, "flood", 512 * 2 ** 20, /broke the protocol|unexpected reply|sent a reply before the command/));
  });
});
