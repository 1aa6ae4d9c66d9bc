// The command line of SPEC section 3, run as users and scripts run it: node dist/mail.js.

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { sleep, spawnDaemon } from "../helpers/daemon.js";
import { requireTool, startSmtpSink, SMTP_SINK } from "../helpers/postfix.js";
import { MAIL_JS, dropQueueFile, listFolder, makeSpool, queueFile, runCli, tempMaildir, testMessage } from "../helpers/spool-files.js";

t.test("--help and --version", async (t) => {
  const help = await runCli(["--help"]);
  t.equal(help.code, 0);
  for (const flag of ["--maildir", "--relay", "--flush", "--force", "--queue", "--json", "--send", "--max-connections", "--tls", "--log",
    "--port", "--resolver", "--helo", "--auth", "--connect-timeout", "--data-done-timeout", "--max-queue-lifetime", "--fallback-relay",
    "--serve", "--demo", "--notify-classes", "--debug-peer"]) {
    t.ok(help.stdout.includes(flag), `--help mentions ${flag}`);
  }
  const version = await runCli(["--version"]);
  t.equal(version.code, 0);
  t.match(version.stdout, /^mudmail \d+\.\d+\.\d+\n$/);
});

t.test("a bad flag or value exits 2 with a one-line message naming it", async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [["--max-connections", "abc"], /--max-connections/],
    [["--max-connections", "0"], /--max-connections/],
    [["--port", "70000"], /--port/],
    [["--tls", "sometimes"], /--tls/],
    [["--relay", "bad host:25"], /--relay/],
    [["--relay", "host:99999"], /--relay/],
    [["--resolver", "dns.example.org"], /--resolver/],
    [["--connect-timeout", "-1"], /--connect-timeout/],
    [["--min-backoff", "600", "--max-backoff", "300"], /--max-backoff/],
    [["--frobnicate"], /--frobnicate/],
    [["--force"], /--force/],
    [["--json"], /--json/],
    [["--flush", "--queue"], /choose one mode/],
    [["--relay"], /--relay/],
    [["--notify-classes", "bounce,nonsense"], /--notify-classes/],
    [["--max-recipients", "50", "--serve"], /--max-recipients/],
    [["--disable-dns-lookups", "--flush"], /--disable-dns-lookups/],
    [["--send", "a@b.example"], /-f/],
    [["--send", "-f", "a@b.example", "not an address"], /recipient/],
    [["--postmaster", "nobody"], /--postmaster/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runCli([...args, "--maildir", "/nonexistent/never-created"]);
    t.equal(r.code, 2, `${args.join(" ")} exits 2`);
    t.match(r.stderr, pattern, `${args.join(" ")}: ${r.stderr.trim()}`);
    t.equal(r.stderr.trim().split("\n").length, 1, "one line");
  }
});

t.test("--send queues a message from standard input and prints its id; --queue lists it", async (t) => {
  const maildir = await tempMaildir();
  const sent = await runCli(["--send", "--maildir", maildir, "-f", "talker@test.example", "-s", "Your password", "bob@test.example", "carol@test.example"],
    { input: "Your new password is swordfish.\n.\nBye\n" });
  t.equal(sent.code, 0, sent.stderr);
  const id = sent.stdout.trim();
  t.match(id, /^\d{10}\.\d+$/, "prints the queue id");
  const file = await fs.readFile(path.join(maildir, "outgoing", id), "utf8");
  t.match(file, /^talker@test\.example\nbob@test\.example, carol@test\.example\n/, "envelope lines");
  t.match(file, /\nSubject: Your password\n/);
  t.match(file, /\n\nYour new password is swordfish\.\n\.\nBye\n$/, "the body as given");
  const stat = await fs.stat(path.join(maildir, "outgoing", id));
  t.equal(stat.mode & 0o777, 0o600, "queue file mode 0600");
  t.equal((await fs.stat(maildir)).mode & 0o777, 0o700, "maildir mode 0700");

  const listing = await runCli(["--queue", "--maildir", maildir]);
  t.equal(listing.code, 0);
  t.match(listing.stdout, new RegExp(`^-Queue ID-.*\\n${id.replace(".", "\\.")}\\s+\\d+ \\w{3} \\w{3} [ \\d]\\d \\d\\d:\\d\\d:\\d\\d\\s+talker@test\\.example\\n`));
  t.match(listing.stdout, /bob@test\.example\n\s+carol@test\.example\n/);
  t.match(listing.stdout, /-- \d+ Kbytes in 1 Request\.\n$/);

  const json = await runCli(["--queue", "--json", "--maildir", maildir]);
  t.equal(json.code, 0);
  const entries = JSON.parse(json.stdout);
  t.equal(entries.length, 1);
  t.same(Object.keys(entries[0]).sort(), ["attempts", "id", "lastError", "nextAttempt", "queuedAt", "recipients", "sender", "size", "state", "suspendedUntil"].sort(),
    "SPEC section 5 fields, and the suspension that holds it back (issue 14)");
  t.match(entries[0], { id, state: "queued", sender: "talker@test.example", recipients: ["bob@test.example", "carol@test.example"], attempts: 0, nextAttempt: null, lastError: null, suspendedUntil: null });
  t.ok(Number.isInteger(entries[0].size) && entries[0].size > 0, "size");
  t.equal(new Date(entries[0].queuedAt).toISOString(), entries[0].queuedAt, "ISO 8601 time");

  await fs.writeFile(path.join(maildir, "corrupt", "1700000000.5"), "garbage without recipients");
  const withCorrupt = JSON.parse((await runCli(["--queue", "--json", "--maildir", maildir])).stdout);
  t.match(withCorrupt.find((e: { id: string }) => e.id === "1700000000.5"), { state: "corrupt" }, "corrupt files are listed as corrupt");
  const empty = await runCli(["--queue", "--maildir", await tempMaildir()]);
  t.equal(empty.stdout, "Mail queue is empty\n");
});

t.test("--flush sends through --relay, prints a one-line summary, exits 0; a dead relay still exits 0", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  for (let n = 0; n < 20; n++) await dropQueueFile(maildir, `1700000000.${n}`, queueFile("a@test.example", [`u${n}@test.example`], testMessage(n)));
  await dropQueueFile(maildir, "1700000001.0", "a@test.example\nno-at-sign\nSubject: x\n\nbody\n");
  const logFile = path.join(maildir, "..", "mail.log");
  const r = await runCli(["--flush", "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", logFile]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^mudmail: flush: 21 messages: 20 sent, 0 deferred, 0 bounced, 1 corrupt; 20 recipients: 20 sent, 0 deferred, 0 bounced \([\d.]+ s\)\n$/);
  const log = await fs.readFile(logFile, "utf8");
  t.equal(log.split("\n").filter((l) => /status=sent/.test(l)).length, 20, "the log file has the delivery lines");
  t.match(log, /1700000001\.0: corrupt queue file moved to corrupt\/1700000001\.0: bad recipient "no-at-sign": not of the form addr@domain/);
  t.same(await listFolder(maildir, "corrupt"), ["1700000001.0"]);

  // Ids carry the arrival time: these arrive now (ids from 2023 would be past --max-queue-lifetime and bounce).
  const now = Math.floor(Date.now() / 1000);
  for (let n = 0; n < 3; n++) await dropQueueFile(maildir, `${now}.${n}`, queueFile("a@test.example", [`u${n}@test.example`], testMessage(n)));
  await sink.stop();
  const dead = await runCli(["--flush", "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", logFile], { timeoutMs: 20_000 });
  t.equal(dead.code, 0, "deferred mail is a normal outcome");
  t.match(dead.stdout, /flush: 3 messages: 0 sent, 3 deferred, 0 bounced, 0 corrupt; 3 recipients: 0 sent, 3 deferred, 0 bounced/);
  t.equal((await listFolder(maildir, "deferred")).length, 3, "the messages wait in deferred/");
  const json = JSON.parse((await runCli(["--queue", "--json", "--maildir", maildir])).stdout);
  const deferred = json.filter((x: { state: string }) => x.state === "deferred");
  t.equal(deferred.length, 3, "listed as deferred");
  for (const e of deferred) {
    t.equal(e.attempts, 1, "an attempt is counted");
    t.match(e.lastError, /Connection refused/, "the last error is kept");
    const wait = Date.parse(e.nextAttempt) - Date.now();
    t.ok(wait > 250_000 && wait <= 300_000, `next attempt after --min-backoff (${wait} ms)`);
  }
  const text = await runCli(["--queue", "--maildir", maildir]);
  t.match(text.stdout, /\(deferred, age \d+m, attempts 1, next in 4m: delivery temporarily suspended: connect to .*Connection refused\)/, "mailq shows state, age, attempts, next attempt and the last error");
});

t.test("run mode: mail queued while it runs goes out at once; SIGTERM stops it cleanly", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const logFile = path.join(maildir, "..", "mail.log");
  const daemon = spawnDaemon(process.execPath, [MAIL_JS, "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", logFile], path.dirname(maildir), "run-mode");
  t.teardown(() => daemon.kill("SIGKILL"));
  await sleep(500);
  const queued = await runCli(["--send", "--maildir", maildir, "-f", "talker@test.example", "-s", "hi", "dave@test.example"], { input: "hello\n" });
  const id = queued.stdout.trim();
  const deadline = Date.now() + 10_000;
  let log = "";
  while (Date.now() < deadline && !log.includes(`${id}: removed`)) {
    await sleep(100);
    log = await fs.readFile(logFile, "utf8").catch(() => "");
  }
  t.match(log, new RegExp(`${id.replace(".", "\\.")}: to=<dave@test\\.example>, .*status=sent`), "delivered without waiting for the next tick");
  await daemon.kill("SIGTERM", 10_000);
  t.equal((await daemon.done).code, 0, "exits 0 on SIGTERM");
  t.same(await listFolder(maildir, "outgoing_active"), []);
  await t.rejects(fs.lstat(path.join(maildir, ".mudmail.lock")), "the lock is released");
});
