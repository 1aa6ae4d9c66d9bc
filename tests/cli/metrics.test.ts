// --metrics HOST:PORT: a daemon sending through Postfix's smtp-sink serves /metrics in
// Prometheus' text format (messages per folder with hold/, outcomes, the delay histogram,
// suspended destinations, the loop's delay); bad values exit 2 naming the flag.

import t from "tap";
import fs from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { spawnDaemon, waitForText } from "../helpers/daemon.js";
import { freePort, requireTool, startSmtpSink, SMTP_SINK } from "../helpers/postfix.js";
import { MAIL_JS, dropQueueFile, makeSpool, queueFile, runCli, tempMaildir, testMessage } from "../helpers/spool-files.js";

function get(port: number, urlPath: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path: urlPath, timeout: 5000 }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => { body += c; });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, type: String(res.headers["content-type"]), body }));
    });
    req.on("timeout", () => req.destroy(new Error(`GET ${urlPath}: no answer in 5 s`)));
    req.on("error", reject);
  });
}

/** Scrapes until `re` matches, bounded. */
function scrapeUntil(port: number, re: RegExp): Promise<string> {
  return waitForText(() => get(port, "/metrics").then((r) => r.body), re, "/metrics");
}

t.test("a daemon with --metrics: Prometheus text at /metrics", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const maildir = await tempMaildir();
  const log = path.join(maildir, "..", "mail.log");
  await makeSpool(maildir);
  const held = `${Math.floor(Date.now() / 1000) - 10}.0`;
  await dropQueueFile(maildir, held, queueFile("a@test.example", ["h@test.example"], testMessage(0)));
  t.equal((await runCli(["--hold", held, "--maildir", maildir, "--log", log])).code, 0);

  const port = await freePort();
  const daemon = spawnDaemon(process.execPath, [MAIL_JS, "--relay", `${sink.host}:${sink.port}`, "--maildir", maildir, "--log", log, "--metrics", `127.0.0.1:${port}`],
    path.dirname(maildir), "daemon");
  t.teardown(() => daemon.stop());
  for (const n of [1, 2]) {
    const r = await runCli(["--send", "--maildir", maildir, "-f", "talker@test.example", "-s", `m${n}`, `u${n}@test.example`], { input: "hi\n" });
    t.equal(r.code, 0, r.stderr);
  }
  await scrapeUntil(port, /^mudmail_outcomes_total\{status="sent"\} 2$/m);
  // Sent, then removed from outgoing_active/ a moment later.
  const body = await scrapeUntil(port, /^mudmail_messages\{folder="outgoing_active"\} 0$/m);
  t.match(body, /^# TYPE mudmail_messages gauge$/m);
  for (const [folder, n] of [["outgoing", 0], ["outgoing_active", 0], ["deferred", 0], ["hold", 1], ["corrupt", 0]] as const) {
    t.match(body, new RegExp(`^mudmail_messages\\{folder="${folder}"\\} ${n}$`, "m"), `${folder}: ${n}`);
  }
  t.match(body, /^mudmail_outcomes_total\{status="deferred"\} 0$/m);
  t.match(body, /^# TYPE mudmail_delivery_delay_seconds histogram$/m);
  t.match(body, /^mudmail_delivery_delay_seconds_bucket\{le="\+Inf"\} 2$/m);
  t.match(body, /^mudmail_delivery_delay_seconds_count 2$/m);
  t.match(body, /^mudmail_event_loop_delay_seconds\{stat="max"\} [\d.e-]+$/m);
  t.match(body, /^# TYPE mudmail_connections gauge$/m);

  const suspended = await runCli(["--suspend", "example.net", "--seconds", "600", "--maildir", maildir]);
  t.equal(suspended.code, 0, suspended.stderr);
  const after = await scrapeUntil(port, /^mudmail_suspended\{destination="example\.net"\} 1$/m);
  const until = Number(/^mudmail_suspended_until_seconds\{destination="example\.net"\} ([\d.]+)$/m.exec(after)?.[1]);
  t.ok(until > Date.now() / 1000 + 590 && until < Date.now() / 1000 + 610, "its end, Unix time");

  const page = await get(port, "/metrics");
  t.equal(page.status, 200);
  t.match(page.type, /^text\/plain; version=0\.0\.4/);
  t.equal((await get(port, "/")).status, 404, "only /metrics");
  await daemon.kill("SIGTERM", 10_000);
  t.equal((await daemon.done).code, 0);
});

t.test("--metrics: bad values and a taken port exit 2 naming the flag", async (t) => {
  const maildir = await tempMaildir();
  for (const [args, re] of [
    [["--metrics", "localhost"], /^mudmail: --metrics: expected HOST:PORT, got "localhost"\n$/],
    [["--metrics", "127.0.0.1:99999"], /^mudmail: --metrics: port out of range/],
    [["--queue", "--metrics", "127.0.0.1:9100"], /^mudmail: --metrics goes with the run mode or --flush, not --queue\n$/],
  ] as const) {
    const r = await runCli([...args, "--maildir", maildir]);
    t.equal(r.code, 2, args.join(" "));
    t.match(r.stderr, re);
  }
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
  t.teardown(() => new Promise<void>((resolve) => taken.close(() => resolve())));
  const port = (taken.address() as net.AddressInfo).port;
  const r = await runCli(["--flush", "--metrics", `127.0.0.1:${port}`, "--maildir", maildir]);
  t.equal(r.code, 2);
  t.match(r.stderr, new RegExp(`^mudmail: --metrics: cannot listen on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
  await fs.rm(path.dirname(maildir), { recursive: true, force: true });
});
