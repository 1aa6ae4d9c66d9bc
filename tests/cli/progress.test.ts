// --flush on a terminal: one progress line (done, sent, deferred, bounced, msgs/s, left), drawn
// again in place at most once a second, erased before the summary; on a pipe, none. The relay
// is Postfix's smtp-sink answering each DATA after a second (-w 1), so the pass lasts seconds.

import t from "tap";
import { requireTool, startSmtpSink, SMTP_SINK } from "../helpers/postfix.js";
import { PYTHON, runInPty } from "../helpers/pty.js";
import { MAIL_JS, dropQueueFile, makeSpool, queueFile, runCli, tempMaildir, testMessage } from "../helpers/spool-files.js";

async function spoolOf(n: number): Promise<string> {
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000) - 5;
  for (let i = 0; i < n; i++) await dropQueueFile(maildir, `${now}.${i}`, queueFile("a@test.example", [`u${i}@test.example`], testMessage(i)));
  return maildir;
}

t.test("a terminal gets one progress line, redrawn at most once a second", async (t) => {
  if (!requireTool(t, [SMTP_SINK, PYTHON])) return;
  const sink = await startSmtpSink({ extraArgs: ["-w", "1"] });
  t.teardown(() => sink.stop());
  const maildir = await spoolOf(4);
  const started = Date.now();
  const r = await runInPty(process.execPath, [MAIL_JS, "--flush", "--relay", `${sink.host}:${sink.port}`, "--max-connections", "1", "--maildir", maildir, "--log", `${maildir}.log`], { timeoutMs: 60_000 });
  const seconds = (Date.now() - started) / 1000;
  t.equal(r.code, 0, r.screen);
  const draws = [...r.screen.matchAll(/\r\x1b\[Kmudmail: flush: (\d+) done: (\d+) sent, (\d+) deferred, (\d+) bounced; ([\d.]+) msgs\/s; (\d+) left/g)];
  t.ok(draws.length >= 2, `drawn during the ~4 s pass (${draws.length} times)`);
  t.ok(draws.length <= Math.ceil(seconds), `at most once a second (${draws.length} draws in ${seconds.toFixed(1)} s)`);
  for (const d of draws) {
    const [done, sent, deferred, bounced, rate, left] = d.slice(1).map(Number);
    t.equal(done, sent + deferred + bounced, "done adds up");
    t.ok(done + left <= 4 && done + left >= 3, `done ${done} + left ${left}: the four messages (one may be between the two)`);
    t.ok(rate >= 0 && rate < 5, `a rate in msgs/s (${rate})`);
  }
  const last = draws.at(-1)!;
  t.ok(Number(last[1]) >= 2, "the count moves on between draws");
  t.match(r.screen, /\r\x1b\[Kmudmail: flush: 4 messages: 4 sent, 0 deferred, 0 bounced, 0 corrupt; 4 recipients: 4 sent, 0 deferred, 0 bounced \([\d.]+ s\)\r?\n$/,
    "erased before the summary, which stands alone on its line");
  t.notMatch(r.screen.replace(/\r\x1b\[K[^\r\n]*/g, ""), /msgs\/s/, "never a progress line outside its own erased line");
});

t.test("standard error not a terminal: no progress line", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink({ extraArgs: ["-w", "1"] });
  t.teardown(() => sink.stop());
  const maildir = await spoolOf(2);
  const r = await runCli(["--flush", "--relay", `${sink.host}:${sink.port}`, "--max-connections", "1", "--maildir", maildir, "--log", `${maildir}.log`], { timeoutMs: 60_000 });
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr, "", "nothing on standard error");
  t.match(r.stdout, /^mudmail: flush: 2 messages: 2 sent/);
});
