/*
 * NAME
 *   tls-policy.ts - authenticated TLS to MX hosts: MTA-STS (RFC 8461) and DANE (RFC 7672)
 *
 * SYNOPSIS
 *   const policies = new TlsPolicies({ router, store: new PolicyFiles(maildir), ca, mtaSts: true, dane: false, ... });
 *   const { route, tls } = await policies.secure("example.org", route);   // once per destination and tick
 *   const peer = tls?.peerFor(hop);          // what this hop's certificate must prove, or null
 *   checkPeer(tlsSocket, peer);              // after the handshake: { ok } or { ok: false, type, reason }
 *
 * DESCRIPTION
 *   The TLS policy of a destination domain, found before its mail goes out and applied per MX
 *   host. MTA-STS: the `_mta-sts` TXT record names a policy id; a policy not cached under that
 *   id is fetched from https://mta-sts.DOMAIN/.well-known/mta-sts.txt (node:https, the
 *   certificate checked against the system's CAs plus --tls-ca, no redirects, 10 s, 64 KB),
 *   parsed, and cached through a PolicyStore (the spool's .mta-sts/, one file per domain, and
 *   memory in front of it) for its max_age; a cached policy past half its max_age (or a day)
 *   is fetched again in the background. A failed fetch keeps the cached policy; without one
 *   the domain has no policy (RFC 8461 section 5). Under "enforce" only MX hosts matching an
 *   mx: pattern are used, over STARTTLS with a certificate valid (WebPKI) for the MX name;
 *   under "testing" mail goes as before and the outcome is only reported.
 *
 *   DANE (--tls dane): when the MX RRset and the host's address records are DNSSEC-validated
 *   (the resolver's AD bit), the host's TLSA records `_PORT._tcp.HOST` decide: usable records
 *   (usages 3 DANE-EE and 2 DANE-TA, selectors 0 and 1, matching types 0, 1, 2) must match
 *   the certificate (DANE-EE: the leaf's certificate or key, nothing else checked; DANE-TA: a
 *   certificate of the chain the server sent, the chain up to it, the name and the dates), or
 *   the session fails; records that are all unusable mean encryption without authentication
 *   (RFC 7672 section 2.2); a TLSA lookup that fails (SERVFAIL: bogus) makes the host
 *   unusable. Securely absent records fall back to MTA-STS, then to --tls. DANE takes
 *   precedence over MTA-STS for a host that has TLSA records (RFC 8461 section 2).
 *
 *   Every decision carries what TLS-RPT (tls-report.ts) needs: the policy type, its text and
 *   its MX patterns; problems found before any session (a failed fetch, an invalid policy, a
 *   bogus TLSA answer) are handed to `onFailure` with RFC 8460's result types.
 *
 * DIAGNOSTICS
 *   secure() never rejects: a lookup that fails counts as no policy, or, where the RFCs say
 *   the mail must wait, as a route that defers (4.7.5) with the reason. checkPeer() names the
 *   failure as RFC 8460 section 4.3 does (certificate-host-mismatch, certificate-expired,
 *   certificate-not-trusted, validation-failure, tlsa-invalid).
 *
 * BUGS
 *   A TLSA base domain reached through a CNAME is not followed (the MX name is used). A
 *   policy host that keeps failing is asked again at every tick. MX hosts reached through
 *   --fallback-relay are the relay's, not the domain's: enforce leaves them out, DANE skips them.
 */

import { createHash, X509Certificate } from "node:crypto";
import * as fs from "node:fs";
import * as https from "node:https";
import * as net from "node:net";
import * as path from "node:path";
import * as tls from "node:tls";
import type { Hop, Route, Router } from "./route.js";

/* ------------------------------------------------------------------------------------ */
/* Results (RFC 8460 section 4.3)                                                        */

export type ResultType =
  | "starttls-not-supported" | "certificate-host-mismatch" | "certificate-expired" | "certificate-not-trusted" | "validation-failure"
  | "sts-policy-fetch-error" | "sts-policy-invalid" | "sts-webpki-invalid" | "tlsa-invalid" | "dnssec-invalid" | "dane-required";

/** How one session's TLS went against its policy. */
export type TlsResult = { ok: true } | { ok: false; type: ResultType; reason: string };

/** What a report says about the policy a session was under (RFC 8460 section 4.3.1). */
export interface ReportPolicy {
  domain: string;
  type: "sts" | "tlsa" | "no-policy-found";
  /** The policy's text, line by line (MTA-STS), or each TLSA record in presentation form. */
  strings: string[];
  /** MTA-STS's mx: patterns. */
  mxHost: string[];
}

/* ------------------------------------------------------------------------------------ */
/* MTA-STS: the TXT record, the policy, the MX patterns                                  */

export interface StsPolicy {
  mode: "enforce" | "testing" | "none";
  /** Seconds the policy may be cached. */
  maxAge: number;
  mx: string[];
  /** The policy's lines as served (for reports). */
  lines: string[];
}

/**
 * The `_mta-sts` TXT records: the one that starts with v=STSv1 gives the policy id. None, or
 * more than one, is no record (RFC 8461 section 3.1).
 */
export function parseStsRecord(txts: string[]): { id: string } | null {
  const records = txts.filter((t) => /^v=STSv1\s*(;|$)/.test(t));
  if (records.length !== 1) return null;
  const fields = new Map<string, string>();
  for (const part of records[0].split(";")) {
    const m = /^\s*([A-Za-z0-9_.-]+)=([\x21-\x3a\x3c\x3e-\x7e]*)\s*$/.exec(part);
    if (m) fields.set(m[1], m[2]);
    else if (part.trim() !== "") return null;
  }
  const id = fields.get("id");
  return id && /^[A-Za-z0-9]{1,32}$/.test(id) ? { id } : null;
}

/** The policy file (RFC 8461 section 3.2): key: value lines; the problem in words when it is not one. */
export function parseStsPolicy(text: string): StsPolicy | string {
  const lines = text.split(/\r?\n/).filter((l) => l.trim() !== "");
  const fields = new Map<string, string>();
  const mx: string[] = [];
  for (const line of lines) {
    const m = /^([A-Za-z0-9_-]+):[ \t]*(.*?)[ \t]*$/.exec(line);
    if (!m) return `not a "key: value" line: ${JSON.stringify(line.slice(0, 80))}`;
    const key = m[1];
    if (key === "mx") mx.push(m[2].toLowerCase());
    else if (!fields.has(key)) fields.set(key, m[2]);
  }
  if (fields.get("version") !== "STSv1") return `version is ${JSON.stringify(fields.get("version") ?? null)}, not STSv1`;
  const mode = fields.get("mode");
  if (mode !== "enforce" && mode !== "testing" && mode !== "none") return `mode is ${JSON.stringify(mode ?? null)}, not enforce, testing or none`;
  const maxAge = fields.get("max_age") ?? "";
  if (!/^\d{1,10}$/.test(maxAge) || Number(maxAge) > 31_557_600) return `max_age is ${JSON.stringify(maxAge)}, not 0..31557600`;
  if (mode !== "none" && mx.length === 0) return "no mx: line";
  for (const pattern of mx) if (!/^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$/.test(pattern)) return `bad mx: pattern ${JSON.stringify(pattern)}`;
  return { mode, maxAge: Number(maxAge), mx, lines };
}

/** RFC 8461 section 4.1: a pattern is a host name, or "*." and a domain for exactly one more leftmost label. */
export function mxMatches(pattern: string, host: string): boolean {
  const p = pattern.toLowerCase().replace(/\.$/, "");
  const h = host.toLowerCase().replace(/\.$/, "");
  if (!p.startsWith("*.")) return p === h;
  const dot = h.indexOf(".");
  return dot > 0 && h.slice(dot + 1) === p.slice(2);
}

/* ------------------------------------------------------------------------------------ */
/* The policy cache: one file per domain, behind an interface the spool's worker can take */

/** A fetched policy as cached: the id it was published under, when it was fetched, its text. */
export interface CachedPolicy {
  id: string;
  /** Milliseconds since the epoch. */
  fetchedAt: number;
  text: string;
}

/** Where fetched policies are kept between runs; async, so it can move to another thread. */
export interface PolicyStore {
  read(domain: string): Promise<CachedPolicy | null>;
  write(domain: string, policy: CachedPolicy): Promise<void>;
}

/** The spool's `.mta-sts/`: one JSON file per domain (mode 0600), replaced by rename. */
export class PolicyFiles implements PolicyStore {
  readonly dir: string;

  constructor(maildir: string) {
    this.dir = path.join(maildir, ".mta-sts");
  }

  async read(domain: string): Promise<CachedPolicy | null> {
    try {
      const data = JSON.parse(await fs.promises.readFile(this.#file(domain), "utf8")) as CachedPolicy;
      return typeof data.id === "string" && typeof data.fetchedAt === "number" && typeof data.text === "string" ? data : null;
    } catch {
      return null;
    }
  }

  async write(domain: string, policy: CachedPolicy): Promise<void> {
    await fs.promises.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const file = this.#file(domain);
    const tmp = `${file}.${process.pid}.tmp`;
    await fs.promises.writeFile(tmp, JSON.stringify(policy) + "\n", { mode: 0o600 });
    await fs.promises.rename(tmp, file);
  }

  #file(domain: string): string {
    // Only names a policy can be published for reach the file system (no "/", no "..").
    if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$/.test(domain)) throw new Error(`not a domain name: ${JSON.stringify(domain)}`);
    return path.join(this.dir, domain);
  }
}

/* ------------------------------------------------------------------------------------ */
/* The policy fetch                                                                      */

export interface FetchOptions {
  /** Extra trusted CA (PEM), beside the system's. */
  ca: string | null;
  /** The policy host's addresses (through --resolver). */
  addresses: (host: string) => Promise<string[]>;
  timeoutMs?: number;
  maxBytes?: number;
}

export type FetchResult = { ok: true; text: string } | { ok: false; type: ResultType; reason: string };

/** A `lookup` for node:https that asks our resolver (--resolver), not the system's. */
export function lookupThrough(addresses: (host: string) => Promise<string[]>): typeof import("node:dns").lookup {
  return ((hostname: string, options: { all?: boolean }, callback: (...args: unknown[]) => void) => {
    addresses(hostname).then((list) => {
      if (options.all) callback(null, list.map((address) => ({ address, family: net.isIPv6(address) ? 6 : 4 })));
      else callback(null, list[0], net.isIPv6(list[0]) ? 6 : 4);
    }, (err: Error) => callback(err));
  }) as unknown as typeof import("node:dns").lookup;
}

/** Node's names for a certificate the WebPKI does not accept. */
const CERT_ERRORS: Record<string, ResultType> = {
  CERT_HAS_EXPIRED: "certificate-expired", CERT_NOT_YET_VALID: "certificate-expired",
  ERR_TLS_CERT_ALTNAME_INVALID: "certificate-host-mismatch",
  DEPTH_ZERO_SELF_SIGNED_CERT: "certificate-not-trusted", SELF_SIGNED_CERT_IN_CHAIN: "certificate-not-trusted",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "certificate-not-trusted", UNABLE_TO_GET_ISSUER_CERT: "certificate-not-trusted",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "certificate-not-trusted", CERT_UNTRUSTED: "certificate-not-trusted",
  CERT_SIGNATURE_FAILURE: "certificate-not-trusted", CERT_REVOKED: "certificate-not-trusted", INVALID_CA: "certificate-not-trusted",
};

/**
 * GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt: 200 with text/plain only, no redirect
 * followed, the whole exchange within timeoutMs, at most maxBytes of body.
 */
export function fetchStsPolicy(domain: string, o: FetchOptions): Promise<FetchResult> {
  const host = `mta-sts.${domain}`;
  const timeoutMs = o.timeoutMs ?? 10_000;
  const maxBytes = o.maxBytes ?? 65_536;
  return new Promise((resolve) => {
    let settled = false;
    const done = (result: FetchResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      request.destroy();
      resolve(result);
    };
    const fail = (reason: string) => done({ ok: false, type: "sts-policy-fetch-error", reason: `policy fetch from ${host}: ${reason}` });
    const timer = setTimeout(() => fail(`not done within ${timeoutMs / 1000} s`), timeoutMs);
    const request = https.get({
      host, port: 443, path: "/.well-known/mta-sts.txt", servername: host, agent: false,
      ...(o.ca ? { ca: [...tls.rootCertificates, o.ca] } : {}),
      headers: { "user-agent": "mudmail" },
      lookup: lookupThrough(o.addresses),
    }, (response) => {
      const status = response.statusCode ?? 0;
      if (status >= 300 && status < 400) return fail(`HTTP ${status} redirect to ${JSON.stringify(response.headers.location ?? "")} (not followed, RFC 8461 section 3.3)`);
      if (status !== 200) return fail(`HTTP ${status}`);
      const type = String(response.headers["content-type"] ?? "");
      if (!/^text\/plain\s*(;|$)/i.test(type)) return done({ ok: false, type: "sts-policy-invalid", reason: `policy from ${host} has Content-Type ${JSON.stringify(type)}, not text/plain` });
      const chunks: Buffer[] = [];
      let size = 0;
      response.on("data", (chunk: Buffer) => {
        size += chunk.length;
        if (size > maxBytes) return fail(`policy larger than ${maxBytes} bytes`);
        chunks.push(chunk);
      });
      response.on("end", () => done({ ok: true, text: Buffer.concat(chunks).toString("utf8") }));
      response.on("error", (err) => fail(`connection lost in the body: ${err.message}`));
      response.on("aborted", () => fail("connection lost in the body"));
    });
    request.on("error", (err: NodeJS.ErrnoException) => {
      const certificate = err.code ? CERT_ERRORS[err.code] : undefined;
      if (certificate) done({ ok: false, type: "sts-webpki-invalid", reason: `policy host ${host}: certificate not valid: ${err.message}` });
      else fail(err.message);
    });
  });
}

/* ------------------------------------------------------------------------------------ */
/* Checking the certificate of a session                                                 */

/**
 * What a session's TLS must prove: the policy (its tag for the log line), the names to check,
 * whether TLS is required (no plaintext) and whether a failed check ends the session.
 */
export type PeerPolicy = { report: ReportPolicy; requireTls: boolean; enforce: boolean; by: string } & (
  | { kind: "sts"; tag: "sts=enforce" | "sts=testing"; name: string }
  | { kind: "dane"; tag: "dane"; names: string[]; tlsa: Tlsa[] }
  | { kind: "none"; tag: null });

/** After the handshake: does the certificate the server sent satisfy the policy? */
export function checkPeer(socket: tls.TLSSocket, policy: PeerPolicy, now = Date.now()): TlsResult {
  if (policy.kind === "none") return { ok: true };
  if (policy.kind === "dane") return daneCheck(peerChain(socket), policy.tlsa, policy.names, now);
  // MTA-STS: the WebPKI's verdict (chain, dates) and the MX name (RFC 6125 wildcards).
  const code = socket.authorized ? "" : String(socket.authorizationError ?? "CERT_UNTRUSTED");
  if (code && code !== "ERR_TLS_CERT_ALTNAME_INVALID") {
    const type = CERT_ERRORS[code] ?? "validation-failure";
    return { ok: false, type, reason: `certificate of ${policy.name} ${type === "certificate-expired" ? "has expired or is not yet valid" : "is not trusted"} (${code})` };
  }
  const mismatch = tls.checkServerIdentity(policy.name, socket.getPeerCertificate());
  if (mismatch) return { ok: false, type: "certificate-host-mismatch", reason: `certificate not valid for MX host ${policy.name}: ${mismatch.message}` };
  return { ok: true };
}

/** The certificates the server sent, leaf first (the detailed form links each to its issuer). */
function peerChain(socket: tls.TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = [];
  const seen = new Set<string>();
  for (let c: tls.DetailedPeerCertificate | undefined = socket.getPeerCertificate(true); c?.raw && !seen.has(c.fingerprint256); c = c.issuerCertificate) {
    seen.add(c.fingerprint256);
    chain.push(new X509Certificate(c.raw));
  }
  return chain;
}

/* ------------------------------------------------------------------------------------ */
/* DANE: TLSA records and matching                                                       */

export interface Tlsa {
  usage: number;
  selector: number;
  mtype: number;
  data: Buffer;
}

/** A TLSA RDATA (RFC 6698 section 2.1); null when too short. */
export function parseTlsa(rdata: Buffer): Tlsa | null {
  return rdata.length >= 4 ? { usage: rdata[0], selector: rdata[1], mtype: rdata[2], data: Buffer.from(rdata.subarray(3)) } : null;
}

/** RFC 7672 section 3.1: SMTP uses DANE-TA(2) and DANE-EE(3); selectors 0 and 1; matching types 0, 1, 2 (of the right length). */
export function usableTlsa(r: Tlsa): boolean {
  const length = r.mtype === 1 ? 32 : r.mtype === 2 ? 64 : r.mtype === 0 ? -1 : 0;
  return (r.usage === 2 || r.usage === 3) && (r.selector === 0 || r.selector === 1) && length !== 0 && (length < 0 ? r.data.length > 0 : r.data.length === length);
}

export function tlsaText(r: Tlsa): string {
  return `${r.usage} ${r.selector} ${r.mtype} ${r.data.toString("hex").toUpperCase()}`;
}

function tlsaMatches(r: Tlsa, cert: X509Certificate): boolean {
  const selected = r.selector === 0 ? cert.raw : cert.publicKey.export({ type: "spki", format: "der" });
  const data = r.mtype === 0 ? selected : createHash(r.mtype === 1 ? "sha256" : "sha512").update(selected).digest();
  return data.equals(r.data);
}

/**
 * RFC 7672 section 3.1: DANE-EE(3) matches the leaf, and nothing else is checked (names,
 * dates, issuer); DANE-TA(2) matches a certificate of the chain the server sent, which must
 * sign its way down to the leaf, whose dates and name (the MX host or the domain) are checked.
 */
export function daneCheck(chain: X509Certificate[], records: Tlsa[], names: string[], now = Date.now()): TlsResult {
  const usable = records.filter(usableTlsa);
  if (usable.length === 0) return { ok: false, type: "tlsa-invalid", reason: `no usable TLSA record for ${names[0]}` };
  const leaf = chain[0];
  if (!leaf) return { ok: false, type: "validation-failure", reason: `${names[0]} sent no certificate` };
  if (usable.some((r) => r.usage === 3 && tlsaMatches(r, leaf))) return { ok: true };
  for (const r of usable.filter((x) => x.usage === 2)) {
    const anchor = chain.findIndex((c) => tlsaMatches(r, c));
    if (anchor < 0) continue;
    for (let i = 0; i < anchor; i++) {
      if (!chain[i].checkIssued(chain[i + 1]) || !chain[i].verify(chain[i + 1].publicKey)) {
        return { ok: false, type: "certificate-not-trusted", reason: `certificate chain of ${names[0]} does not lead to its DANE-TA trust anchor` };
      }
    }
    if (Date.parse(leaf.validTo) < now || Date.parse(leaf.validFrom) > now) {
      return { ok: false, type: "certificate-expired", reason: `certificate of ${names[0]} is not valid now (${leaf.validFrom} to ${leaf.validTo})` };
    }
    if (!names.some((n) => leaf.checkHost(n) !== undefined)) {
      return { ok: false, type: "certificate-host-mismatch", reason: `certificate of ${names[0]} is not valid for ${names.join(" or ")} (DANE-TA)` };
    }
    return { ok: true };
  }
  return { ok: false, type: "validation-failure", reason: `no TLSA record of ${names[0]} matches its certificate chain` };
}

function noPolicy(report: ReportPolicy): PeerPolicy {
  return { kind: "none", tag: null, requireTls: false, enforce: false, by: "", report };
}

/* ------------------------------------------------------------------------------------ */
/* The decision for a destination                                                        */

/** A destination's TLS policy for this tick: what each hop's certificate must prove. */
export interface DomainTls {
  peerFor(hop: Hop): PeerPolicy;
}

export interface PoliciesOptions {
  router: Pick<Router, "txt" | "query" | "hostAddresses">;
  store: PolicyStore;
  ca: () => string | null;
  mtaSts: boolean;
  dane: boolean;
  /** A warning for the log. */
  warn: (text: string) => void;
  /** A problem found before any session (a failed fetch, a bogus TLSA answer): counted for TLS-RPT. */
  onFailure: (policy: ReportPolicy, type: ResultType, reason: string, hop?: Hop) => void;
  fetch?: typeof fetchStsPolicy;
}

type StsFound = { policy: StsPolicy; report: ReportPolicy } | null;
/** A host's TLSA records, securely; "none" for no DANE (absent or insecure); "error" for a failed lookup. */
type HostTlsa = Tlsa[] | "none" | { error: string };

export class TlsPolicies {
  readonly #o: PoliciesOptions;
  /** Policies read or fetched in this process, in front of the store. */
  readonly #cache = new Map<string, CachedPolicy | null>();
  readonly #refreshing = new Set<string>();

  constructor(options: PoliciesOptions) {
    this.#o = options;
  }

  /**
   * The TLS policy of a domain's route: hops the policy forbids are left out (a route with none
   * left defers, 4.7.5), and each hop that is left knows what its certificate must prove.
   */
  async secure(domain: string, route: Extract<Route, { ok: true }>): Promise<{ route: Route; tls: DomainTls }> {
    const sts = this.#o.mtaSts ? await this.#sts(domain).catch(() => null) : null;
    const dane = this.#o.dane ? await this.#dane(domain, route.hops).catch(() => new Map<string, HostTlsa>()) : new Map<string, HostTlsa>();
    const peers = new Map<Hop, PeerPolicy>();
    const dropped: string[] = [];
    const none: ReportPolicy = sts?.report ?? { domain, type: "no-policy-found", strings: [], mxHost: [] };
    for (const hop of route.hops) {
      const tlsa = hop.via ? "none" : dane.get(hop.host) ?? "none";
      if (Array.isArray(tlsa)) {
        // Records that are all unusable still forbid plaintext, but authenticate nothing (RFC 7672 section 2.2).
        const report: ReportPolicy = { domain, type: "tlsa", strings: tlsa.map(tlsaText), mxHost: [hop.host] };
        peers.set(hop, { kind: "dane", tag: "dane", requireTls: true, enforce: tlsa.some(usableTlsa), by: `the DANE TLSA records of ${hop.host}`, names: [hop.host, domain], tlsa, report });
      } else if (tlsa !== "none") {
        dropped.push(`${hop.host}: ${tlsa.error}`);
      } else if (sts && sts.policy.mode === "enforce") {
        if (!sts.policy.mx.some((p) => mxMatches(p, hop.host))) dropped.push(`${hop.host} matches no mx: of the MTA-STS policy (${sts.policy.mx.join(", ")})`);
        else peers.set(hop, { kind: "sts", tag: "sts=enforce", requireTls: true, enforce: true, by: `the MTA-STS policy of ${domain}`, name: hop.host, report: sts.report });
      } else if (sts && sts.policy.mode === "testing") {
        peers.set(hop, { kind: "sts", tag: "sts=testing", requireTls: false, enforce: false, by: `the MTA-STS policy of ${domain}`, name: hop.host, report: sts.report });
      } else {
        peers.set(hop, noPolicy(none));
      }
    }
    const hops = route.hops.filter((h) => peers.has(h));
    const tls: DomainTls = { peerFor: (hop) => peers.get(hop) ?? noPolicy(none) };
    if (hops.length === 0) {
      const reason = `TLS policy of ${domain} leaves no MX host to deliver to: ${[...new Set(dropped)].join("; ")}`;
      if (sts?.policy.mode === "enforce") this.#o.onFailure(sts.report, "validation-failure", reason);
      return { route: { ok: false, permanent: false, dsn: "4.7.5", reason }, tls };
    }
    return { route: { ok: true, hops }, tls };
  }

  /* MTA-STS */

  async #sts(domain: string): Promise<StsFound> {
    if (domain.startsWith("[")) return null;
    const cached = await this.#cached(domain);
    const now = Date.now();
    const fresh = cached && this.#valid(cached, now) ? cached : null;
    let record: { id: string } | null = null;
    try {
      record = parseStsRecord(await this.#o.router.txt(`_mta-sts.${domain}`));
    } catch {
      // The TXT record cannot be had now: a cached policy still holds (RFC 8461 section 5.1).
    }
    if (!record) return fresh ? this.#found(domain, fresh) : null;
    if (fresh && fresh.id === record.id) {
      const policy = parseStsPolicy(fresh.text) as StsPolicy;
      if (now - fresh.fetchedAt > Math.min(86_400, policy.maxAge / 2) * 1000) this.#refresh(domain, record.id);
      return this.#found(domain, fresh);
    }
    const fetched = await this.#fetch(domain, record.id);
    return fetched ? this.#found(domain, fetched) : fresh ? this.#found(domain, fresh) : null;
  }

  async #cached(domain: string): Promise<CachedPolicy | null> {
    if (!this.#cache.has(domain)) this.#cache.set(domain, await this.#o.store.read(domain).catch(() => null));
    return this.#cache.get(domain) ?? null;
  }

  #valid(cached: CachedPolicy, now: number): boolean {
    const policy = parseStsPolicy(cached.text);
    return typeof policy !== "string" && now < cached.fetchedAt + policy.maxAge * 1000;
  }

  #found(domain: string, cached: CachedPolicy): StsFound {
    const policy = parseStsPolicy(cached.text);
    if (typeof policy === "string" || policy.mode === "none") return null;
    return { policy, report: { domain, type: "sts", strings: policy.lines, mxHost: policy.mx } };
  }

  /** Fetches, checks and caches a policy; null (and the failure counted) when that fails. */
  async #fetch(domain: string, id: string): Promise<CachedPolicy | null> {
    const fetch = this.#o.fetch ?? fetchStsPolicy;
    const result = await fetch(domain, { ca: this.#o.ca(), addresses: (h) => this.#o.router.hostAddresses(h) });
    const report: ReportPolicy = { domain, type: "sts", strings: [], mxHost: [] };
    if (!result.ok) {
      this.#o.warn(`MTA-STS: ${domain}: ${result.reason}`);
      this.#o.onFailure(report, result.type, result.reason);
      return null;
    }
    const policy = parseStsPolicy(result.text);
    if (typeof policy === "string") {
      const reason = `MTA-STS policy of ${domain} is invalid: ${policy}`;
      this.#o.warn(`MTA-STS: ${reason}`);
      this.#o.onFailure(report, "sts-policy-invalid", reason);
      return null;
    }
    const cached: CachedPolicy = { id, fetchedAt: Date.now(), text: result.text };
    this.#cache.set(domain, cached);
    await this.#o.store.write(domain, cached).catch((err: Error) => this.#o.warn(`MTA-STS: cannot cache the policy of ${domain}: ${err.message}`));
    return cached;
  }

  /** A policy past its refresh time is fetched again behind the mail that uses it. */
  #refresh(domain: string, id: string): void {
    if (this.#refreshing.has(domain)) return;
    this.#refreshing.add(domain);
    this.#fetch(domain, id).finally(() => this.#refreshing.delete(domain));
  }

  /* DANE */

  /** Each MX host's TLSA records, when the MX RRset and the host are DNSSEC-validated. */
  async #dane(domain: string, hops: Hop[]): Promise<Map<string, HostTlsa>> {
    const found = new Map<string, HostTlsa>();
    if (domain.startsWith("[")) return found;
    const mx = await this.#o.router.query(domain, "MX");
    const hosts = [...new Set(hops.filter((h) => !h.via).map((h) => h.host))];
    // RFC 7672 section 2.2.1: DANE needs a validated MX RRset (or, without one, the domain itself as the host).
    if (!mx.secure || (mx.rcode !== 0 && mx.rcode !== 3)) return found;
    if (mx.records.length === 0 && hosts.some((h) => h.toLowerCase() !== domain.toLowerCase())) return found;
    const port = hops[0]?.port ?? 25;
    await Promise.all(hosts.map(async (host) => found.set(host, await this.#hostTlsa(host, port, domain))));
    return found;
  }

  async #hostTlsa(host: string, port: number, domain: string): Promise<HostTlsa> {
    const report: ReportPolicy = { domain, type: "tlsa", strings: [], mxHost: [host] };
    try {
      // Section 2.2.2: only a host whose address records are validated has its TLSA records asked for.
      const a = await this.#o.router.query(host, "A");
      const address = a.rcode === 0 && a.records.length === 0 ? await this.#o.router.query(host, "AAAA") : a;
      if (!address.secure) return "none";
      const answer = await this.#o.router.query(`_${port}._tcp.${host}`, "TLSA");
      if (answer.rcode !== 0 && answer.rcode !== 3) {
        const reason = `TLSA lookup error for _${port}._tcp.${host} (rcode ${answer.rcode})`;
        this.#o.onFailure(report, "dnssec-invalid", reason);
        return { error: reason };
      }
      if (!answer.secure || answer.records.length === 0) return "none";
      return answer.records.map(parseTlsa).filter((r): r is Tlsa => r !== null);
    } catch (err) {
      const reason = `TLSA lookup error for _${port}._tcp.${host}: ${(err as Error).message}`;
      this.#o.onFailure(report, "dnssec-invalid", reason);
      return { error: reason };
    }
  }
}
