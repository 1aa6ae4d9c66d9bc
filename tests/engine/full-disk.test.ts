// A full disk: sending and deleting mail need no new space, so delivery goes on (it is what
// frees the space, as Postfix's queue manager knows); only new mail is refused, with an
// error that names the spool and the cause, and no partial file left in tmp/. The spool
// lives on a small tmpfs mounted for the test (root only; CI runs as root), filled to the
// last byte; the peer is Postfix's smtp-sink.

import t, { type Test } from "tap";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { SpoolError } from "../../queue.js";
import { needRoot, requireAll, run } from "../helpers/daemon.js";
import { requirePostfix, startSmtpSink } from "../helpers/postfix.js";
import { runCli } from "../helpers/spool-files.js";

/** A 4 MiB tmpfs, unmounted at the end. */
async function smallDisk(t: Test): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-full-"));
  const mounted = await run("mount", ["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", dir]);
  if (mounted.code !== 0) throw new Error(`mount: ${mounted.stderr}`);
  t.teardown(async () => {
    await run("umount", ["-l", dir]);
    await fs.rm(dir, { recursive: true, force: true });
  });
  return dir;
}

/** Appends to one file until the file system says ENOSPC; then gives back `spare` bytes. */
async function fill(dir: string, spare = 0): Promise<void> {
  const ballast = path.join(dir, "ballast");
  const handle = await fs.open(ballast, "a");
  const block = Buffer.alloc(64 * 1024, 0x61);
  try {
    for (let i = 0; i < 1000; i++) await handle.write(block);
    throw new Error("the disk did not fill up");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOSPC") throw err;
  } finally {
    await handle.close();
  }
  // The last partial block too: byte by byte until nothing more fits.
  const tail = await fs.open(path.join(dir, "ballast"), "a");
  try {
    for (let i = 0; i < 4096; i++) await tail.write(Buffer.from("a"));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOSPC") throw err;
  } finally {
    await tail.close();
  }
  if (spare > 0) await fs.truncate(ballast, (await fs.stat(ballast)).size - spare);
}

t.test("on a full disk, --flush delivers what is queued; new mail is refused with a clear error and nothing left in tmp/", async (t) => {
  if (!requireAll(t, [needRoot("mounts a small tmpfs to fill it")]) || !requirePostfix(t)) return;
  const disk = await smallDisk(t);
  const maildir = path.join(disk, "maildir");
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const queued = new MailEngine({ maildir, log: () => undefined, helo: "talker.test" });
  for (let n = 0; n < 5; n++) await queued.send({ from: "talker@talker.test", to: `u${n}@x.test`, subject: `m${n}`, text: "hello\n" });
  // Room for a new file's first pieces, not for a whole message: the partial file is real.
  await fill(disk, 16 * 1024);

  const send = new MailEngine({ maildir, log: () => undefined, helo: "talker.test" });
  const refused = await send.send({ from: "talker@talker.test", to: "late@x.test", subject: "late", text: "x".repeat(200_000) }).then(() => null, (e: unknown) => e);
  t.ok(refused instanceof SpoolError, `send() rejects with a SpoolError: ${String(refused)}`);
  t.match(refused, { code: "ENOSPC", message: /cannot queue a message in .*maildir: no space left on device \(ENOSPC\)/ });
  t.same(await fs.readdir(path.join(maildir, "tmp")), [], "the partial file is gone from tmp/ at once");

  const cliSend = await runCli(["--send", "-f", "talker@talker.test", "--maildir", maildir, "late@x.test"], { input: "y".repeat(200_000) });
  t.equal(cliSend.code, 1, "--send exits 1 (not a usage error)");
  t.match(cliSend.stderr, /no space left on device \(ENOSPC\)/);

  await fill(disk);
  const flush = await runCli(["--flush", "--maildir", maildir, "--relay", `127.0.0.1:${sink.port}`, "--tls", "none"]);
  t.equal(flush.code, 0, `--flush runs on a full disk: ${flush.stderr.slice(-500)}`);
  t.match(flush.stdout, /flush: 5 messages: 5 sent, 0 deferred/);
  t.same(await fs.readdir(path.join(maildir, "outgoing")), [], "every queued message left the queue");
  t.same(await fs.readdir(path.join(maildir, "tmp")), []);
});
