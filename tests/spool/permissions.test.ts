// The spool's permissions: folders and queue files nobody else can read or touch, and what the
// engine and the command line do with a spool whose modes are wrong.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import t, { type Test } from "tap";
import { MailEngine } from "../../mail.js";
import { SpoolError } from "../../queue.js";
import { OPENSSL } from "../helpers/certs.js";
import { requireTool } from "../helpers/postfix.js";
import { MAIL_JS, runCli } from "../helpers/spool-files.js";
import { FAST, FLUSH_MS, rig, message } from "../helpers/security-rig.js";
import { FOLDERS, bounded, newQueueId } from "../helpers/engine-rig.js";

t.test("spool permissions", async (t) => {
  if (!requireTool(t, OPENSSL)) return;

  /* 13 --------------------------------------------------------------------------------- */
  t.test("spool permissions", async (t) => {
    const unsafe = async (t: Test, what: string, spoil: (maildir: string) => void, reason: RegExp): Promise<void> => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-security-spool-"));
      t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
      const maildir = path.join(dir, "maildir");
      for (const f of FOLDERS) fs.mkdirSync(path.join(maildir, f), { recursive: true, mode: 0o700 });
      fs.writeFileSync(path.join(maildir, "outgoing", newQueueId()), message(400), { mode: 0o600 });
      spoil(maildir);
      const engine = new MailEngine({ maildir, relay: "127.0.0.1:9", log: () => undefined, fsync: false, ...FAST });
      engine.on("error", () => undefined);
      const err = await bounded(engine.flush(), 10_000, "flush of an unsafe spool").then(() => null, (e: unknown) => e);
      await bounded(engine.stop(), 5000, "stop").catch(() => undefined);
      t.ok(err instanceof SpoolError, `${what}: flush() rejects with a SpoolError (${String(err)})`);
      t.match((err as Error | null)?.message ?? "", maildir, "the error names the path");
      t.match((err as Error | null)?.message ?? "", reason, "and says what is wrong");
      if (!fs.existsSync(MAIL_JS)) {
        t.fail(`${MAIL_JS} is missing: run node build.mjs first`);
        return;
      }
      const cli = await runCli(["--flush", "--maildir", maildir, "--relay", "127.0.0.1:9"], { timeoutMs: 20_000 });
      t.equal(cli.code, 2, `${what}: the CLI exits 2`);
      const errLines = cli.stderr.split("\n").filter((l) => l.trim() !== "");
      t.equal(errLines.length, 1, `one line (${JSON.stringify(cli.stderr)})`);
      t.match(errLines[0] ?? "", maildir, "naming the path");
    };
    await t.test("a maildir with mode 0777", (t) => unsafe(t, "mode 0777", (m) => fs.chmodSync(m, 0o777), /writable/));
    await t.test("a folder of the maildir writable by others", (t) => unsafe(t, "deferred/ 0757", (m) => fs.chmodSync(path.join(m, "deferred"), 0o757), /writable/));
    await t.test("a maildir owned by another user", async (t) => {
      if (process.getuid?.() !== 0) {
        t.comment("not root: cannot give the maildir to another user");
        return;
      }
      await unsafe(t, "owned by 65534", (m) => fs.chownSync(m, 65534, 65534), /owned by uid 65534/);
    });

    await t.test("files 0600 and folders 0700 even with umask 0", async (t) => {
      const r = await rig(t, { rcpt: (address) => (address.startsWith("later") ? "451 4.3.0 try again later" : undefined) });
      const root = path.join(r.dir, "fresh");
      const maildir = path.join(root, "maildir");
      const logFile = path.join(r.dir, "mudmail.log");
      const old = process.umask(0);
      let engine: MailEngine;
      try {
        engine = new MailEngine({ maildir, relay: `127.0.0.1:${r.server.port}`, log: logFile, helo: "client.test", fsync: false, ...FAST });
        engine.on("error", () => undefined);
        await engine.send({ from: "sender@test.example", to: "user@test.example", subject: "now", text: "sent now" });
        await engine.send({ from: "sender@test.example", to: "later@test.example", subject: "later", text: "deferred" });
        const s = await bounded(engine.flush(), FLUSH_MS, "flush");
        t.match(s, { sent: 1, deferred: 1 }, "one sent, one deferred (with its bookkeeping file)");
        await bounded(engine.stop(), 5000, "stop");
      } finally {
        process.umask(old);
      }
      t.equal(process.umask(), old, "umask restored");
      const bad: string[] = [];
      let dirs = 0;
      let files = 0;
      const walk = (p: string): void => {
        const st = fs.lstatSync(p);
        if (st.isDirectory()) {
          dirs++;
          if ((st.mode & 0o777) !== 0o700) bad.push(`${p} ${(st.mode & 0o777).toString(8)}`);
          for (const name of fs.readdirSync(p)) walk(path.join(p, name));
        } else {
          files++;
          if ((st.mode & 0o777) !== 0o600) bad.push(`${p} ${(st.mode & 0o777).toString(8)}`);
        }
      };
      walk(maildir);
      t.ok(files >= 2, `files were created (${files}, in ${dirs} folders)`);
      t.ok(fs.readdirSync(path.join(maildir, "deferred")).some((n) => n.startsWith(".")), "a bookkeeping file among them");
      t.same(bad, [], "every folder 0700, every file 0600");
      t.equal(fs.statSync(logFile).mode & 0o777, 0o600, "the log file is 0600");
    });
  });
});
