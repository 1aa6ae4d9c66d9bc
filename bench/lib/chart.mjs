// bench/lib/chart.mjs - the throughput table as an SVG line chart (msgs/s by slots, one
// line per sender), written as text: no dependencies. run.mjs draws it after every run,
// and `node bench/run.mjs --chart results.json` redraws it from saved figures.

const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
const num = (x) => Math.round(x).toLocaleString("en-US");

/** A round step for about `count` grid lines up to `max`. */
function niceStep(max, count) {
  const raw = max / count;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw);
}

/**
 * series: [{ name, color, points: [[slots, msgsPerSec], ...], dash?, width? }]; a series of one
 * point is drawn as a marker with its value. lines: [{ value, label }] dotted horizontal
 * lines (targets). Returns the SVG text.
 */
export function lineChart({ title, subtitle, xs, series, lines = [], xLabel, yLabel }) {
  const W = 760;
  const H = 440;
  const m = { left: 72, right: 230, top: 58, bottom: 52 };
  const pw = W - m.left - m.right;
  const ph = H - m.top - m.bottom;
  const values = [...series.flatMap((s) => s.points.map((p) => p[1])), ...lines.map((l) => l.value)].filter(Number.isFinite);
  const step = niceStep(Math.max(1, ...values) * 1.08, 6);
  const top = Math.ceil((Math.max(1, ...values) * 1.08) / step) * step;
  // Slots are categories, evenly spaced: 1, 5, 10, 20.
  const x = (slots) => m.left + (pw * (xs.indexOf(slots) + 0.5)) / xs.length;
  const y = (v) => m.top + ph - (ph * v) / top;
  const out = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${m.left}" y="22" font-size="15" font-weight="bold">${esc(title)}</text>`);
  if (subtitle) out.push(`<text x="${m.left}" y="40" fill="#555555">${esc(subtitle)}</text>`);
  for (let v = 0; v <= top + 1e-9; v += step) {
    out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${m.left - 8}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end" fill="#444444">${num(v)}</text>`);
  }
  out.push(`<line x1="${m.left}" x2="${m.left}" y1="${m.top}" y2="${m.top + ph}" stroke="#888888"/>`);
  out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${m.top + ph}" y2="${m.top + ph}" stroke="#888888"/>`);
  for (const s of xs) out.push(`<text x="${x(s).toFixed(1)}" y="${m.top + ph + 18}" text-anchor="middle" fill="#444444">${esc(s)}</text>`);
  out.push(`<text x="${m.left + pw / 2}" y="${H - 12}" text-anchor="middle" fill="#444444">${esc(xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${m.top + ph / 2}) rotate(-90)" text-anchor="middle" fill="#444444">${esc(yLabel)}</text>`);
  for (const l of lines) {
    out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${y(l.value).toFixed(1)}" y2="${y(l.value).toFixed(1)}" stroke="#999999" stroke-dasharray="2 4"/>`);
    out.push(`<text x="${m.left + 4}" y="${(y(l.value) - 5).toFixed(1)}" fill="#777777" font-size="11">${esc(l.label)}</text>`);
  }
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]) && xs.includes(p[0]));
    if (pts.length === 0) continue;
    if (pts.length > 1) {
      out.push(`<polyline fill="none" stroke="${s.color}" stroke-width="${s.width ?? 2}"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""} ` +
        `points="${pts.map(([sx, v]) => `${x(sx).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}"/>`);
    }
    for (const [sx, v] of pts) {
      out.push(`<circle cx="${x(sx).toFixed(1)}" cy="${y(v).toFixed(1)}" r="${pts.length > 1 ? 3.5 : 5}" fill="${s.color}"><title>${esc(`${s.name}, ${sx} slots: ${num(v)} msgs/s`)}</title></circle>`);
      if (pts.length === 1) out.push(`<text x="${(x(sx) + 9).toFixed(1)}" y="${(y(v) + 4).toFixed(1)}" fill="${s.color}" font-size="11">${num(v)}</text>`);
    }
  }
  // The legend, in the order given.
  let ly = m.top + 6;
  for (const s of series) {
    const lx = m.left + pw + 20;
    if (s.points.filter((p) => Number.isFinite(p[1])).length > 1) {
      out.push(`<line x1="${lx}" x2="${lx + 22}" y1="${ly}" y2="${ly}" stroke="${s.color}" stroke-width="${s.width ?? 2}"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""}/>`);
    } else {
      out.push(`<circle cx="${lx + 11}" cy="${ly}" r="5" fill="${s.color}"/>`);
    }
    const words = String(s.name).split(" ");
    let line = "";
    let ty = ly + 4;
    for (const w of words) {
      if ((line + " " + w).trim().length > 26) {
        out.push(`<text x="${lx + 30}" y="${ty}">${esc(line.trim())}</text>`);
        line = "";
        ty += 14;
      }
      line += ` ${w}`;
    }
    out.push(`<text x="${lx + 30}" y="${ty}">${esc(line.trim())}</text>`);
    ly = ty + 20;
  }
  out.push("</svg>");
  return out.join("\n") + "\n";
}

/** The chart of run.mjs's throughput figures (its results object). */
export function throughputChart(R) {
  const xs = R.throughput.map((row) => row.slots);
  const line = (key) => R.throughput.map((row) => [row.slots, row[key]?.msgsPerSec ?? NaN]);
  const at = (slots, r) => (r?.msgsPerSec ? [[slots, r.msgsPerSec]] : []);
  const m = R.machine;
  const load = R.loadAverage?.start?.[0];
  const series = [
    { name: "mudmail (engine defaults: fsync on, queue files on disk)", color: "#d62728", points: line("mudmail"), width: 3 },
    { name: `Nodemailer ${m.nodemailer ?? ""} pooled`.replace(/\s+/g, " "), color: "#1f77b4", points: line("nodemailer") },
    { name: "smtp-source -d (C, no disk)", color: "#2ca02c", points: line("smtpSourceD"), dash: "6 4" },
    { name: "smtp-source, one message a session", color: "#8c8c8c", points: line("smtpSource"), dash: "6 4" },
    { name: "Postfix from its own queue (destination concurrency 10)", color: "#9467bd", points: at(R.postfix?.concurrency ?? 10, R.postfix) },
    { name: "mudmail, old method: fsync off, hard-linked spool (not comparable)", color: "#f2a09a", points: at(10, R.mudmailLinked) },
  ];
  return lineChart({
    title: `${num(R.throughputSetup?.messages ?? 20000)} messages of 1 KB into smtp-sink: msgs/s by connection slots`,
    subtitle: `${R.date.slice(0, 10)}, ${m.cpus} CPUs, Node ${m.node}, Postfix ${m.postfix ?? "-"}; load average ${load ?? "?"} at start` +
      (R.throughputSetup?.repeats > 1 ? `; fastest of ${R.throughputSetup.repeats} rounds` : ""),
    xs, series, xLabel: "connection slots (smtp-source: sessions)", yLabel: "messages per second",
    lines: [{ value: 10000, label: "target: 10,000 msgs/s" }],
  });
}
