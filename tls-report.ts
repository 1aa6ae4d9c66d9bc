/*
 * NAME
 *   tls-report.ts - SMTP TLS reporting (RFC 8460): counting sessions, composing and sending the daily report
 *
 * SYNOPSIS
 *   const reports = new TlsReports({ org, contact, submitter, interval: 86400, router, ca, state });
 *   await reports.load();
 *   reports.count(policy, hop, result, localAddress);   // once per session under a policy (tls-policy.ts)
 *   const mails = await reports.due(Date.now());         // the period is over: mailto: reports to queue
 *   await reports.save();
 *
 * DESCRIPTION
 *   Per recipient domain and per policy (MTA-STS, DANE's TLSA records, or none found), the
 *   sessions whose TLS succeeded and those that failed, with the failures grouped by RFC
 *   8460's result type, MX host and address. The period is aligned to the interval (a UTC
 *   day by default: the embedding option tlsRptInterval shortens it). When it is over, each
 *   domain that publishes a `_smtp._tls` TXT record (`v=TLSRPTv1; rua=...`) gets the JSON
 *   report of section 4.4, gzipped: for a mailto: address as a message (section 5.3: the
 *   subject, TLS-Report-Domain and TLS-Report-Submitter, multipart/report with report-type
 *   tlsrpt and an application/tlsrpt+gzip part) that the engine queues like its other
 *   reports, from the null sender; for an https: address as a POST (certificate checked
 *   against the system's CAs plus --tls-ca, 10 s). Domains without the record are forgotten.
 *   The counts live in memory and in the spool's state (saved at each tick that changed
 *   them and at stop()), so a --flush run from cron reports too.
 *
 * DIAGNOSTICS
 *   due() never rejects for one domain's sake: a TXT lookup that fails keeps that domain's
 *   counts for the next period; a POST that fails is logged through `log`.
 *
 * BUGS
 *   Counts of the sessions since the last save are lost in a crash. A report is not split
 *   when it is large; rua's size limits ("!10m") are not read.
 */

import { randomBytes } from "node:crypto";
import * as https from "node:https";
import * as net from "node:net";
import * as tls from "node:tls";
import { gzipSync } from "node:zlib";
import type { Hop, Router } from "./route.js";
import { lookupThrough, type ReportPolicy, type ResultType, type TlsResult } from "./tls-policy.js";
import { rfc5322Date } from "./compose.js";
import { addressProblem } from "./queue.js";

interface FailureDetail {
  resultType: ResultType;
  sendingIp: string | null;
  mxHost: string | null;
  receivingIp: string | null;
  reason: string;
  count: number;
}

interface PolicyCounts {
  policy: ReportPolicy;
  success: number;
  failure: number;
  failures: FailureDetail[];
}

/** What is saved in the spool between runs. */
interface SavedState {
  periodStart: number;
  domains: Record<string, PolicyCounts[]>;
}

export interface ReportOptions {
  /** organization-name, and who the report mail is from (contact-info). */
  org: string;
  contact: string;
  /** Our host name: the report's submitter. */
  submitter: string;
  /** Seconds a report covers. */
  interval: number;
  router: Pick<Router, "txt" | "hostAddresses">;
  ca: () => string | null;
  state: { read(): Promise<unknown>; write(value: unknown): Promise<void> };
  log: (text: string) => void;
}

/** A report mail for the engine to queue: a queue file (sender line, recipient line, message). */
export interface ReportMail {
  content: Buffer;
  what: string;
}

/** The `_smtp._tls` TXT records: the one that starts with v=TLSRPTv1 gives the rua URIs (RFC 8460 section 3). */
export function parseTlsRptRecord(txts: string[]): string[] | null {
  const records = txts.filter((t) => /^v=TLSRPTv1\s*(;|$)/.test(t));
  if (records.length !== 1) return null;
  for (const part of records[0].split(";").slice(1)) {
    const m = /^\s*rua=(.*?)\s*$/.exec(part);
    if (m) return m[1].split(",").map((u) => u.trim()).filter((u) => /^(mailto:|https:\/\/)/i.test(u));
  }
  return null;
}

/** RFC 3339 without fractions: 2026-12-03T00:00:00Z. */
function dateTime(ms: number): string {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}

export class TlsReports {
  readonly #o: ReportOptions;
  #periodStart: number;
  #domains = new Map<string, PolicyCounts[]>();
  #dirty = false;

  constructor(options: ReportOptions) {
    this.#o = options;
    this.#periodStart = this.#alignedStart(Date.now());
  }

  #alignedStart(now: number): number {
    const ms = this.#o.interval * 1000;
    return Math.floor(now / ms) * ms;
  }

  /** The counts a previous run saved. */
  async load(): Promise<void> {
    const saved = (await this.#o.state.read().catch(() => null)) as SavedState | null;
    if (!saved || typeof saved.periodStart !== "number" || typeof saved.domains !== "object" || saved.domains === null) return;
    this.#periodStart = Math.min(this.#periodStart, saved.periodStart);
    for (const [domain, list] of Object.entries(saved.domains)) {
      if (Array.isArray(list)) this.#domains.set(domain, [...(this.#domains.get(domain) ?? []), ...list]);
    }
  }

  async save(): Promise<void> {
    if (!this.#dirty) return;
    this.#dirty = false;
    const state: SavedState = { periodStart: this.#periodStart, domains: Object.fromEntries(this.#domains) };
    await this.#o.state.write(state);
  }

  /** One session's TLS outcome under its policy, or (without a hop) a policy that could not be had. */
  count(policy: ReportPolicy, hop: Hop | null, result: TlsResult, sendingIp: string | null = null): void {
    const domain = policy.domain.toLowerCase();
    let list = this.#domains.get(domain);
    if (!list) this.#domains.set(domain, (list = []));
    const key = JSON.stringify([policy.type, policy.strings, policy.mxHost]);
    let counts = list.find((c) => JSON.stringify([c.policy.type, c.policy.strings, c.policy.mxHost]) === key);
    if (!counts) list.push((counts = { policy, success: 0, failure: 0, failures: [] }));
    this.#dirty = true;
    if (result.ok) {
      counts.success++;
      return;
    }
    counts.failure++;
    const detail = { resultType: result.type, sendingIp, mxHost: hop?.host ?? null, receivingIp: hop?.address ?? null };
    const same = counts.failures.find((f) => f.resultType === detail.resultType && f.sendingIp === detail.sendingIp && f.mxHost === detail.mxHost && f.receivingIp === detail.receivingIp);
    if (same) same.count++;
    else counts.failures.push({ ...detail, reason: result.reason.slice(0, 300), count: 1 });
  }

  /** The JSON report of RFC 8460 section 4.4 for one domain's counts over [start, end). */
  compose(domain: string, list: PolicyCounts[], start: number, end: number, reportId: string): object {
    return {
      "organization-name": this.#o.org,
      "date-range": { "start-datetime": dateTime(start), "end-datetime": dateTime(Math.max(start, end - 1000)) },
      "contact-info": this.#o.contact,
      "report-id": reportId,
      policies: list.map((c) => ({
        policy: {
          "policy-type": c.policy.type,
          ...(c.policy.strings.length > 0 ? { "policy-string": c.policy.strings } : {}),
          "policy-domain": domain,
          ...(c.policy.mxHost.length > 0 ? { "mx-host": c.policy.mxHost } : {}),
        },
        summary: { "total-successful-session-count": c.success, "total-failure-session-count": c.failure },
        ...(c.failures.length > 0 ? {
          "failure-details": c.failures.map((f) => ({
            "result-type": f.resultType,
            ...(f.sendingIp && net.isIP(f.sendingIp) ? { "sending-mta-ip": f.sendingIp } : {}),
            ...(f.mxHost ? { "receiving-mx-hostname": f.mxHost } : {}),
            ...(f.receivingIp && net.isIP(f.receivingIp) ? { "receiving-ip": f.receivingIp } : {}),
            "failed-session-count": f.count,
            "failure-reason-code": f.reason,
          })),
        } : {}),
      })),
    };
  }

  /**
   * When the period is over: each domain's report, for those that publish a TLSRPT record.
   * mailto: reports come back as queue files for the engine; https: ones are posted now.
   */
  async due(now: number): Promise<ReportMail[]> {
    const end = this.#alignedStart(now);
    if (end <= this.#periodStart) return [];
    const start = this.#periodStart;
    const domains = this.#domains;
    this.#periodStart = end;
    this.#domains = new Map();
    this.#dirty = true;
    const mails: ReportMail[] = [];
    for (const [domain, list] of domains) {
      let rua: string[] | null;
      try {
        rua = parseTlsRptRecord(await this.#o.router.txt(`_smtp._tls.${domain}`));
      } catch {
        // Cannot tell now: the counts wait for the next period.
        this.#domains.set(domain, [...(this.#domains.get(domain) ?? []), ...list]);
        continue;
      }
      if (!rua || rua.length === 0) continue;
      const reportId = `${Math.floor(start / 1000)}.${randomBytes(6).toString("hex")}@${this.#o.submitter}`;
      const json = JSON.stringify(this.compose(domain, list, start, end, reportId));
      const gz = gzipSync(json);
      const file = `${this.#o.submitter}!${domain}!${Math.floor(start / 1000)}!${Math.floor(end / 1000) - 1}.json.gz`;
      for (const uri of rua) {
        if (/^mailto:/i.test(uri)) {
          const to = decodeURIComponent(uri.slice(7).split("?")[0]);
          if (addressProblem(to)) {
            this.#o.log(`TLS report for ${domain}: bad rua address ${JSON.stringify(uri)}`);
            continue;
          }
          mails.push({ content: this.#mail(domain, to, reportId, file, gz, new Date(now)), what: `TLS report for ${domain} to <${to}>` });
        } else {
          this.#post(domain, uri, gz);
        }
      }
    }
    return mails;
  }

  /** RFC 8460 section 5.3: the report as a message from the null sender. */
  #mail(domain: string, to: string, reportId: string, file: string, gz: Buffer, now: Date): Buffer {
    const boundary = `tlsrpt-${randomBytes(12).toString("hex")}`;
    const from = addressProblem(this.#o.contact.replace(/^mailto:/i, "")) ? `postmaster@${this.#o.submitter}` : this.#o.contact.replace(/^mailto:/i, "");
    const base64 = gz.toString("base64").replace(/.{1,76}/g, "$&\n");
    const message = [
      `From: ${this.#o.org.replace(/[^\x20-\x7e]|["\\]/g, "")} TLS reporting <${from}>`,
      `To: <${to}>`,
      `Subject: Report Domain: ${domain} Submitter: ${this.#o.submitter} Report-ID: <${reportId}>`,
      `Date: ${rfc5322Date(now)}`,
      `Message-ID: <${reportId.replace("@", `.${randomBytes(4).toString("hex")}@`)}>`,
      `TLS-Report-Domain: ${domain}`,
      `TLS-Report-Submitter: ${this.#o.submitter}`,
      "Auto-Submitted: auto-generated",
      "MIME-Version: 1.0",
      `Content-Type: multipart/report; report-type="tlsrpt"; boundary="${boundary}"`,
      "",
      `--${boundary}`,
      "Content-Type: text/plain; charset=us-ascii",
      "",
      `This is an aggregate TLS report (RFC 8460) from ${this.#o.submitter} for ${domain}.`,
      "",
      `--${boundary}`,
      `Content-Type: application/tlsrpt+gzip; name="${file}"`,
      "Content-Transfer-Encoding: base64",
      `Content-Disposition: attachment; filename="${file}"`,
      "",
      base64 + `--${boundary}--`,
      "",
    ].join("\n");
    return Buffer.from(`<>\n${to}\n${message}`, "utf8");
  }

  /** RFC 8460 section 5.2: POST the gzipped report; the outcome goes to the log. */
  #post(domain: string, uri: string, gz: Buffer): void {
    let url: URL;
    try {
      url = new URL(uri);
    } catch {
      return this.#o.log(`TLS report for ${domain}: bad rua URI ${JSON.stringify(uri)}`);
    }
    const extra = this.#o.ca();
    const request = https.request({
      method: "POST", host: url.hostname, port: url.port || 443, path: `${url.pathname}${url.search}`, servername: url.hostname, agent: false,
      ...(extra ? { ca: [...tls.rootCertificates, extra] } : {}),
      headers: { "content-type": "application/tlsrpt+gzip", "content-length": String(gz.length), "user-agent": "mudmail" },
      lookup: lookupThrough((h) => this.#o.router.hostAddresses(h)),
    }, (response) => {
      response.resume();
      this.#o.log(`TLS report for ${domain} posted to ${uri}: HTTP ${response.statusCode}`);
    });
    request.setTimeout(10_000, () => request.destroy(new Error("not done within 10 s")));
    request.on("error", (err) => this.#o.log(`TLS report for ${domain}: POST to ${uri} failed: ${err.message}`));
    request.end(gz);
  }
}
