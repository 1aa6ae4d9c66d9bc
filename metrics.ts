/*
 * NAME
 *   metrics.ts - what an operator watches: the engine's numbers, in Prometheus' text format
 *
 * SYNOPSIS
 *   const m = await mail.metrics();          // Metrics: the same numbers as an object
 *   formatMetrics(m);                        // the text exposition format, version 0.0.4
 *   const server = await serveMetrics({ host: "127.0.0.1", port: 9101 }, () => mail.metrics());
 *   const delay = new DelayHistogram(); delay.observe(seconds); delay.snapshot();
 *   const loop = new LoopDelay(); loop.snapshot(); loop.stop();
 *
 * DESCRIPTION
 *   The numbers of `--metrics HOST:PORT` (GET /metrics) and of MailEngine.metrics(): messages
 *   in each spool folder, recipient outcomes by status since the engine was made, connections
 *   open per destination, suspended destinations with their end, the delivery delay of sent
 *   recipients as a histogram (arrival to the server's 250, Postfix's delay=), and the delay
 *   of the host's event loop (how late a timer fires: what a talker's users would feel).
 *   Every name starts with mudmail_; a counter ends in _total, a duration is in seconds.
 *
 * DIAGNOSTICS
 *   serveMetrics() rejects when it cannot listen (the command line exits 2, naming --metrics).
 *   A scrape that fails answers 500 with the reason; any path but /metrics is 404.
 */

import * as http from "node:http";
import { monitorEventLoopDelay, type IntervalHistogram } from "node:perf_hooks";

/** The engine's numbers, as mail.metrics() returns them. */
export interface Metrics {
  /** Messages in each spool folder now: outgoing, outgoing_active, deferred, hold, corrupt. */
  messages: Record<string, number>;
  /** Recipient outcomes since the engine was made (each attempt's: a deferral and a later delivery are two). */
  outcomes: { sent: number; deferred: number; bounced: number };
  /** Connections open now, per destination (a domain, or "relay:HOST:PORT"). */
  connections: Record<string, number>;
  /** Destinations suspended now (a domain or a provider): the end (ISO 8601) and why. */
  suspended: Record<string, { until: string; reason: string }>;
  /** Seconds from arrival to delivery of each sent recipient: cumulative buckets (le: upper bound), sum, count. */
  deliveryDelay: { buckets: Array<{ le: number; count: number }>; sum: number; count: number };
  /** How late the host's event loop ran a timer, seconds, since metrics were first asked for. */
  loopDelay: { mean: number; p50: number; p99: number; max: number };
}

/** Delivery delay buckets, seconds: from the quick relay to the day-old retry. */
const DELAY_BUCKETS = [0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14_400, 86_400];

/** A Prometheus histogram of seconds: counts per bucket (not cumulative until the snapshot), sum, count. */
export class DelayHistogram {
  readonly #counts = new Array<number>(DELAY_BUCKETS.length).fill(0);
  #sum = 0;
  #count = 0;

  observe(seconds: number): void {
    const i = DELAY_BUCKETS.findIndex((le) => seconds <= le);
    if (i >= 0) this.#counts[i]++;
    this.#sum += seconds;
    this.#count++;
  }

  snapshot(): Metrics["deliveryDelay"] {
    let running = 0;
    const buckets = DELAY_BUCKETS.map((le, i) => ({ le, count: (running += this.#counts[i]) }));
    return { buckets, sum: this.#sum, count: this.#count };
  }
}

/** The event loop's delay, sampled every RESOLUTION_MS once asked for (perf_hooks; it keeps no process alive). */
export class LoopDelay {
  static readonly RESOLUTION_MS = 10;
  #histogram: IntervalHistogram | null = null;

  snapshot(): Metrics["loopDelay"] {
    if (!this.#histogram) {
      this.#histogram = monitorEventLoopDelay({ resolution: LoopDelay.RESOLUTION_MS });
      this.#histogram.enable();
    }
    const h = this.#histogram;
    // The histogram records each interval, resolution included: the delay is what is beyond it.
    const late = (ns: number) => (h.count > 0 && Number.isFinite(ns) ? Math.max(0, ns / 1e9 - LoopDelay.RESOLUTION_MS / 1000) : 0);
    return { mean: late(h.mean), p50: late(h.percentile(50)), p99: late(h.percentile(99)), max: late(h.max) };
  }

  stop(): void {
    this.#histogram?.disable();
    this.#histogram = null;
  }
}

/** A label value as the text format wants it: backslash, quote and newline escaped. */
function label(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

/** Prometheus' text exposition format (version 0.0.4). */
export function formatMetrics(m: Metrics): string {
  const out: string[] = [];
  const family = (name: string, type: string, help: string, samples: string[]) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...samples);
  };
  family("mudmail_messages", "gauge", "Messages in the spool, by folder.",
    Object.entries(m.messages).map(([folder, n]) => `mudmail_messages{folder="${label(folder)}"} ${n}`));
  family("mudmail_outcomes_total", "counter", "Recipient outcomes since the engine started, by status.",
    Object.entries(m.outcomes).map(([status, n]) => `mudmail_outcomes_total{status="${status}"} ${n}`));
  family("mudmail_connections", "gauge", "SMTP connections open now, by destination.",
    Object.entries(m.connections).map(([dest, n]) => `mudmail_connections{destination="${label(dest)}"} ${n}`));
  family("mudmail_suspended", "gauge", "Destinations suspended now (1), by destination or provider.",
    Object.keys(m.suspended).map((dest) => `mudmail_suspended{destination="${label(dest)}"} 1`));
  family("mudmail_suspended_until_seconds", "gauge", "When each suspension ends, Unix time.",
    Object.entries(m.suspended).map(([dest, s]) => `mudmail_suspended_until_seconds{destination="${label(dest)}"} ${Date.parse(s.until) / 1000}`));
  const d = m.deliveryDelay;
  family("mudmail_delivery_delay_seconds", "histogram", "Seconds from arrival to delivery, per sent recipient.", [
    ...d.buckets.map((b) => `mudmail_delivery_delay_seconds_bucket{le="${b.le}"} ${b.count}`),
    `mudmail_delivery_delay_seconds_bucket{le="+Inf"} ${d.count}`,
    `mudmail_delivery_delay_seconds_sum ${d.sum}`,
    `mudmail_delivery_delay_seconds_count ${d.count}`,
  ]);
  family("mudmail_event_loop_delay_seconds", "gauge", "How late the host's event loop runs a timer (mean, p50, p99, max).",
    Object.entries(m.loopDelay).map(([stat, v]) => `mudmail_event_loop_delay_seconds{stat="${stat}"} ${v}`));
  return out.join("\n") + "\n";
}

/** GET /metrics on HOST:PORT, each scrape asking `source` afresh. Resolves once listening. */
export async function serveMetrics(at: { host: string; port: number }, source: () => Promise<Metrics>): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? "").split("?")[0];
    if (url !== "/metrics") {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found: the metrics are at /metrics\n");
      return;
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD" }).end();
      return;
    }
    source().then((m) => {
      res.writeHead(200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" }).end(req.method === "HEAD" ? undefined : formatMetrics(m));
    }, (err: Error) => {
      res.writeHead(500, { "content-type": "text/plain" }).end(`${err.message}\n`);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(at.port, at.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  server.unref();
  return server;
}
