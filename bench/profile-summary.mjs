// bench/profile-summary.mjs - what a V8 CPU profile (node --cpu-prof) spent its time on:
// self time aggregated by function (name + file:line), and by file, highest first. Where
// run.mjs --cpu-prof left a window.json beside the profile (the timed flush, monotonic µs),
// only the samples inside it count, unless --all.
//
//   node bench/profile-summary.mjs PROFILE.cpuprofile [--top N] [--all]

import * as fs from "node:fs";
import * as path from "node:path";

const argv = process.argv.slice(2);
let top = 25;
let all = false;
const files = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--top") top = Number(argv[++i]);
  else if (argv[i] === "--all") all = true;
  else files.push(argv[i]);
}
if (files.length === 0) {
  console.error("usage: node bench/profile-summary.mjs PROFILE.cpuprofile... [--top N]");
  process.exit(2);
}

for (const file of files) {
  const prof = JSON.parse(fs.readFileSync(file, "utf8"));
  const windowFile = path.join(path.dirname(file), "window.json");
  const window = !all && fs.existsSync(windowFile) ? JSON.parse(fs.readFileSync(windowFile, "utf8")) : null;
  if (window) {
    // Keep the samples inside the window: each sample's time is startTime + the deltas so far.
    const samples = [];
    const timeDeltas = [];
    let t = prof.startTime;
    let last = null;
    for (let i = 0; i < prof.samples.length; i++) {
      t += prof.timeDeltas[i];
      if (t < window.startUs || t > window.endUs) continue;
      timeDeltas.push(last === null ? 0 : t - last);
      samples.push(prof.samples[i]);
      last = t;
    }
    prof.samples = samples;
    prof.timeDeltas = timeDeltas;
  }
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  // Self time per node: each sample is attributed to the node on top of the stack, for the
  // time until the next sample.
  const self = new Map();
  const deltas = prof.timeDeltas;
  for (let i = 0; i < prof.samples.length; i++) {
    const dt = deltas[i + 1] ?? 0;
    self.set(prof.samples[i], (self.get(prof.samples[i]) ?? 0) + dt);
  }
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  const fnTotals = new Map();
  const fileTotals = new Map();
  for (const [id, us] of self) {
    const cf = byId.get(id).callFrame;
    const where = cf.url ? `${path.basename(cf.url.replace(/^file:\/\//, ""))}:${cf.lineNumber + 1}` : "";
    const key = `${cf.functionName || "(anonymous)"}${where ? ` ${where}` : ""}`;
    fnTotals.set(key, (fnTotals.get(key) ?? 0) + us);
    const f = cf.url ? path.basename(cf.url.replace(/^file:\/\//, "")) : `(${cf.functionName || "native"})`;
    fileTotals.set(f, (fileTotals.get(f) ?? 0) + us);
  }
  const show = (map, n) => [...map].sort((a, b) => b[1] - a[1]).slice(0, n)
    .map(([k, us]) => `${(us / 1000).toFixed(1).padStart(9)} ms ${((100 * us) / total).toFixed(1).padStart(5)}%  ${k}`).join("\n");
  console.log(`${file}: ${(total / 1000).toFixed(0)} ms sampled${window ? ` in the timed flush (${((window.endUs - window.startUs) / 1000).toFixed(0)} ms)` : ""}`);
  console.log(`self time by function (top ${top}):\n${show(fnTotals, top)}`);
  console.log(`self time by file:\n${show(fileTotals, 12)}`);

  // The longest stretches without an idle sample: what blocked the event loop longest.
  const stretches = [];
  let cur = null;
  for (let i = 0; i < prof.samples.length; i++) {
    const node = byId.get(prof.samples[i]);
    const dt = deltas[i + 1] ?? 0;
    if (node.callFrame.functionName === "(idle)") { if (cur) stretches.push(cur); cur = null; continue; }
    cur ??= { us: 0, fns: new Map() };
    cur.us += dt;
    const cf = node.callFrame;
    const key = `${cf.functionName || "(anonymous)"}${cf.url ? ` ${path.basename(cf.url.replace(/^file:\/\//, ""))}:${cf.lineNumber + 1}` : ""}`;
    cur.fns.set(key, (cur.fns.get(key) ?? 0) + dt);
  }
  if (cur) stretches.push(cur);
  stretches.sort((a, b) => b.us - a.us);
  console.log("longest busy stretches (no idle sample in between), with their top functions:");
  for (const st of stretches.slice(0, 5)) {
    const fns = [...st.fns].sort((a, b) => b[1] - a[1]).slice(0, 4).map(([k, us]) => `${k} ${(us / 1000).toFixed(1)}`).join(", ");
    console.log(`${(st.us / 1000).toFixed(1).padStart(9)} ms  ${fns}`);
  }
  console.log("");
}
