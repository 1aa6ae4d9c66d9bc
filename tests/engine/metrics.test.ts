// mail.metrics(): the numbers --metrics serves, as an object: messages per folder (hold/
// included), recipient outcomes, connections open per destination while a delivery is under
// way, suspensions, the delivery delay histogram and the host loop's delay; and asking for
// them while the engine flushes makes no file system call on the host's loop.

import t from "tap";
import fs from "node:fs";
import path from "node:path";
import { formatMetrics } from "../../metrics.js";
import { setup, simple } from "../helpers/engine-rig.js";
import { watchFs } from "../helpers/fs-calls.js";

t.test("metrics(): folders, outcomes, open connections, delay histogram, loop delay; no fs call on the host loop", async (t) => {
  let inData = 0;
  const rig = await setup(t, {
    script: {
      rcpt: (a) => (a.startsWith("later@") ? "452 4.2.2 Mailbox full, try later" : undefined),
      onData: (m) => (m.to.includes("slow@example.net") ? (inData++, { action: "delay", ms: 800, reply: "250 2.0.0 Ok" }) : undefined),
    },
    engine: { dataDoneTimeout: 10 },
  });
  rig.drop(simple("a@example.org", ["now@example.net"]));
  rig.drop(simple("a@example.org", ["later@example.net"]));
  rig.drop(simple("a@example.org", ["slow@example.net"]));
  fs.mkdirSync(path.join(rig.maildir, "hold"), { recursive: true, mode: 0o700 });
  fs.writeFileSync(path.join(rig.maildir, "hold", "1700000000.0"), simple("a@example.org", ["held@example.net"]));

  const before = await rig.engine.metrics();
  t.match(before.messages, { outgoing: 3, outgoing_active: 0, deferred: 0, hold: 1, corrupt: 0 }, "messages per folder, hold/ included");
  t.same(before.outcomes, { sent: 0, deferred: 0, bounced: 0 });

  const flushing = rig.flush(15_000);
  await rig.server.waitFor(() => inData > 0, 5000, "the slow message's data");
  const probe = watchFs();
  let during;
  try {
    during = await rig.engine.metrics();
  } finally {
    probe.restore();
  }
  t.same(probe.calls, [], "metrics() made no file system call on the host's thread while flushing");
  const key = `relay:127.0.0.1:${rig.server.port}`;
  t.same(Object.keys(during.connections), [key], "connections by destination");
  t.ok(during.connections[key] >= 1 && during.connections[key] <= 3, `the one carrying the slow message among them (${during.connections[key]})`);
  t.ok(during.messages.outgoing_active >= 1, "the slow message is active");
  await flushing;

  const after = await rig.engine.metrics();
  t.same(after.outcomes, { sent: 2, deferred: 1, bounced: 0 }, "recipient outcomes by status");
  t.match(after.messages, { outgoing: 0, outgoing_active: 0, deferred: 1, hold: 1, corrupt: 0 });
  const d = after.deliveryDelay;
  t.equal(d.count, 2, "one delay per sent recipient");
  t.ok(d.sum > 0.7, `the slow one waited ~0.8 s (sum ${d.sum})`);
  t.ok(d.buckets.every((b, i) => i === 0 || b.count >= d.buckets[i - 1].count), "cumulative buckets");
  t.equal(d.buckets.at(-1)!.count, 2);
  t.ok(d.buckets.find((b) => b.le === 0.5)!.count <= 1, "the slow one is above half a second");
  for (const v of Object.values(after.loopDelay)) t.ok(Number.isFinite(v) && v >= 0, "loop delay in seconds");
  t.same(after.suspended, {});

  const text = formatMetrics(after);
  t.match(text, /^# HELP mudmail_messages .*\n# TYPE mudmail_messages gauge\n/m);
  t.match(text, /^mudmail_messages\{folder="hold"\} 1$/m);
  t.match(text, /^mudmail_outcomes_total\{status="deferred"\} 1$/m);
  t.match(text, /^mudmail_delivery_delay_seconds_bucket\{le="\+Inf"\} 2$/m);
  t.match(text, /^mudmail_delivery_delay_seconds_count 2$/m);
  t.match(text, /^mudmail_event_loop_delay_seconds\{stat="p99"\} [\d.e-]+$/m);
  await rig.engine.stop();
  t.same((await rig.engine.metrics()).connections, {}, "no connection open after stop()");
});

t.test("metrics(): a suspended destination, with its end and reason", async (t) => {
  const rig = await setup(t, { script: { mail: () => "421 4.7.0 [TS04] Messages temporarily deferred" } });
  rig.drop(simple("a@example.org", ["u@example.net"]));
  await rig.flush();
  const m = await rig.engine.metrics();
  t.same(Object.keys(m.suspended), ["127.0.0.1"], "the relay's host is suspended");
  t.ok(Date.parse(m.suspended["127.0.0.1"].until) > Date.now() + 7_000_000, "until, ISO 8601, two hours on");
  t.match(m.suspended["127.0.0.1"].reason, /\[TS04\]/);
  t.match(m.messages, { outgoing: 1 }, "its mail waits in outgoing/");
  t.same(m.outcomes, { sent: 0, deferred: 1, bounced: 0 });
  t.match(formatMetrics(m), /^mudmail_suspended\{destination="127\.0\.0\.1"\} 1$/m);
});
