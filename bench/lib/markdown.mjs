// bench/lib/markdown.mjs - a results file (bench/results.json) as the README's Performance
// tables, so the README shows exactly what one run measured:
//
//   node bench/run.mjs --markdown bench/results.json

import { fmt, fmtInt, margin } from "./util.mjs";

const row = (cells) => `| ${cells.join(" | ")} |`;
const tableMd = (head, rows) => [row(head), row(head.map(() => "---")), ...rows.map(row)].join("\n");
const cell = (r) => (r ? `${fmtInt(r.msgsPerSec)} (${fmt(r.rssPeakMB, 0)} MB)` : "-");
const ratio = (a, b) => (a?.msgsPerSec && b?.msgsPerSec ? `${fmt(a.msgsPerSec / b.msgsPerSec, 2)}×` : "-");
const loop = (l) => (l ? `${fmt(l.p50, 2)} / ${fmt(l.p99, 2)} / ${fmt(l.max, 2)} ms` : "-");

export function markdown(R) {
  const m = R.machine;
  const out = [];
  const load = R.loadAverage;
  out.push(`Figures of ${R.date.slice(0, 10)} (\`${R.command}\`), ${m.cpus} CPUs (${m.cpuModel}), Node ${m.node}, ` +
    `Nodemailer ${m.nodemailer ?? "-"}, Postfix ${m.postfix ?? "-"}, everything on loopback with \`smtp-sink\` on the same CPUs; ` +
    `load average ${load.start[0]} at the start, ${load.end[0]} at the end` +
    (R.throughputSetup?.repeats > 1 ? `; the fastest of ${R.throughputSetup.repeats} interleaved rounds` : "") + ".");
  out.push("");
  out.push(`${fmtInt(R.throughputSetup.messages)} messages of 1 KB (msgs/s, peak RSS); mudmail with the engine's default options (fsync on), its queue files on disk before the timed flush:`);
  out.push("");
  out.push(tableMd(
    ["slots", "mudmail", `Nodemailer ${m.nodemailer ?? ""} pooled`, "smtp-source (1/session)", "smtp-source -d", "mudmail ÷ Nodemailer", "smtp-source -d ÷ mudmail"],
    R.throughput.map((t) => [t.slots, cell(t.mudmail), cell(t.nodemailer), cell(t.smtpSource), cell(t.smtpSourceD), ratio(t.mudmail, t.nodemailer), ratio(t.smtpSourceD, t.mudmail)]),
  ));
  out.push("");
  const t10 = R.throughput.find((t) => t.slots === 10) ?? {};
  const items = [];
  if (R.postfix) {
    items.push(`Postfix from its own queue (destination concurrency ${R.postfix.concurrency}; filled while held, then \`postsuper -H ALL\`, \`postqueue -f\`): ` +
      `${fmtInt(R.postfix.msgsPerSec)} msgs/s, ${fmtInt(R.postfix.cpuUsPerMsg)} µs of Postfix's CPU a message; mudmail at 10 slots is ${ratio(t10.mudmail, R.postfix)} that.`);
  }
  if (R.sendFlush) {
    items.push(`As a new user runs it: ${fmtInt(R.sendFlush.messages)} × \`send()\` (${fmtInt(R.sendFlush.sendsPerSec)} sends/s, fsync on), then one \`flush()\` at 10 slots: ` +
      `${fmtInt(R.sendFlush.msgsPerSec)} msgs/s, peak RSS ${fmt(R.sendFlush.rssPeakMB, 0)} MB.`);
  }
  if (R.unlinkUs) {
    items.push(`Unlinking a 1 KB queue file on disk costs ${R.unlinkUs.syncedUs} µs here, one never synced ${R.unlinkUs.unsyncedUs} µs, a hard link ${R.unlinkUs.notLastUs} µs` +
      (R.mudmailLinked ? `: the old bench's spools (hard links, fsync off) gave ${fmtInt(R.mudmailLinked.msgsPerSec)} msgs/s at 10 slots, the cheap case, not comparable.` : "."));
  }
  items.push(`Host's event loop while flushing (p50 / p99 / max): ` + R.throughput.map((t) => `${t.slots} slot${t.slots === 1 ? "" : "s"} ${loop(t.mudmail?.loop)}`).join("; ") +
    (t10.nodemailer?.loop ? ` (Nodemailer at 10: ${loop(t10.nodemailer.loop)})` : "") + ".");
  for (const i of items) out.push(`- ${i}`);
  out.push("");
  const L = R.large;
  if (L) {
    const lc = (r) => (r ? `${fmtInt(r.msgsPerSec)} msgs/s, ${fmt(r.mbPerSec)} MB/s` : "-");
    out.push(`${fmtInt(L.messages)} messages of 100 KB, ${L.slots} slots (mudmail: \`send()\` then one timed \`flush()\`; DKIM: RSA-2048, relaxed/relaxed):`);
    out.push("");
    out.push(tableMd(["", "mudmail", "Nodemailer pooled", "mudmail ÷ Nodemailer"], [
      ["unsigned", lc(L.mudmail), lc(L.nodemailer), ratio(L.mudmail, L.nodemailer)],
      ["DKIM-signed", lc(L.mudmailDkim), lc(L.nodemailerDkim), ratio(L.mudmailDkim, L.nodemailerDkim)],
    ]));
    out.push("");
  }
  const rest = [];
  if (R.receiver) {
    rest.push(`Receiver (\`--serve\`), \`smtp-source -d -s ${R.receiver.sessions}\` into one mailbox: ${fmtInt(R.receiver.msgsPerSec)} msgs/s stored ` +
      `(${R.receiver.messagesPerSync ?? "-"} messages per fsync), ${fmtInt(R.receiver.cpuUsPerMsg)} µs of CPU a message.`);
  }
  if (R.scale?.length) {
    rest.push(`Scale (5 slots): ${R.scale.map((s) => fmtInt(s.messages)).join(" / ")} queued: ${R.scale.map((s) => fmt(s.usPerMsg, 0)).join(" / ")} µs a message, ` +
      `peak RSS ${R.scale.map((s) => fmt(s.rssPeakMB, 0)).join(" / ")} MB` + (R.scaleRatio != null ? ` (last vs first: ${fmt(R.scaleRatio, 2)}×).` : "."));
  }
  if (R.big) rest.push(`One ${fmt(R.big.bytes / 1048576, 0)} MB message: RSS growth ${R.big.rssGrowthMB} MB over the idle engine (${fmt(R.big.seconds, 2)} s, ${R.big.mbPerSec} MB/s).`);
  if (R.oneMB?.mudmail) rest.push(`${fmtInt(R.oneMB.messages)} messages of 1 MB, ${R.oneMB.slots} slots: mudmail ${fmtInt(R.oneMB.mudmail.msgsPerSec)} msgs/s, Nodemailer ${fmtInt(R.oneMB.nodemailer?.msgsPerSec)}.`);
  if (R.latency) rest.push(`Latency, \`send()\` to the sink's 250 on an idle started engine (fsync on): p50 ${R.latency.ms.p50} ms, p99 ${R.latency.ms.p99} ms.`);
  for (const i of rest) out.push(`- ${i}`);
  out.push("");
  out.push("Targets; measured ÷ wanted: at least 1 meets a ≥ target, under 1 meets a < (or ≤) one:");
  out.push("");
  out.push(tableMd(["target (issue)", "wanted", "measured", "measured ÷ wanted", ""],
    R.targets.map((t) => [`${t.name} (${t.issue})`, t.target, t.value ?? "not measured", margin(t), t.met == null ? "-" : t.met ? "met" : "**missed**"])));
  return out.join("\n") + "\n";
}
