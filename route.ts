/*
 * NAME
 *   route.ts - where mail for a destination goes: the relay, or a domain's mail exchangers
 *
 * SYNOPSIS
 *   const router = new Router({ relay: null, port: 25, resolver: "127.0.0.1:5353" });
 *   const route = await router.route("example.org");
 *   if (route.ok) for (const hop of route.hops) connect(hop.address, hop.port);
 *   else route.permanent ? bounce(route.reason, route.dsn) : defer(route.reason, route.dsn);
 *   const tlsa = await router.query("_25._tcp.mx.example.org", "TLSA");  // { rcode, secure, records }
 *   await router.txt("_mta-sts.example.org"); await router.hostAddresses("mta-sts.example.org");
 *
 * DESCRIPTION
 *   The one place that asks DNS. With a relay, every destination is the relay. Without one,
 *   a domain's MX records are looked up (through --resolver when given), sorted by
 *   preference with equal preferences in random order, and each exchanger's A and AAAA
 *   records give the addresses to try in turn; a domain without MX records is its own
 *   exchanger (RFC 5321 section 5.1). The caller connects to each hop in order until one
 *   greets; after a greeting no error moves it to the next hop.
 *
 *   Postfix's controls, with its meaning: a fallback relay (fallback_relay) is tried after
 *   every exchanger of a domain, and takes mail for domains that do not exist; an exchanger
 *   that is this machine (inet_interfaces) ends the list there, and when it is the best one
 *   the mail loops back to myself and bounces, unless a best-MX relay (best_mx_transport)
 *   takes it; with ignore_mx_lookup_error a failed MX lookup falls back to A records.
 *
 *   For the TLS policies of tls-policy.ts: TXT records, a host's addresses, and raw queries
 *   whose answer keeps what Node's resolver throws away: the RCODE and the AD bit of a
 *   validating resolver (RFC 4035 section 3.2.3; the query sets AD and EDNS0's DO bit), with
 *   the RDATA of each record of the asked type (TLSA has no resolver call in Node). Over UDP
 *   to --resolver (else the system's first name server), again over TCP when truncated.
 *
 * DIAGNOSTICS
 *   A route that cannot be had says whether that is for good (the domain does not exist,
 *   or publishes the null MX of RFC 7505: the mail bounces) or for now (a DNS timeout or
 *   SERVFAIL: the mail is deferred), with Postfix's wording and an RFC 3463 status.
 */

import { randomBytes } from "node:crypto";
import * as dgram from "node:dgram";
import * as dns from "node:dns";
import * as net from "node:net";

export interface Hop {
  /** The name to log: the MX host, the relay's name, or the address itself. */
  host: string;
  address: string;
  port: number;
  /** Reached through --fallback-relay or --best-mx-relay, not the destination's own hosts. */
  via?: "fallback relay" | "best-MX relay";
}

export type Route =
  | { ok: true; hops: Hop[] }
  | { ok: false; permanent: boolean; dsn: string; reason: string };

export interface RouterOptions {
  relay: { host: string; port: number } | null;
  fallbackRelay?: { host: string; port: number } | null;
  bestMxRelay?: { host: string; port: number } | null;
  /** This machine's addresses (inet_interfaces), for mail-loop detection. */
  ownAddresses?: ReadonlySet<string>;
  ignoreMxLookupError?: boolean;
  port: number;
  /** IP[:PORT] of the DNS server to ask, or null for the system's. */
  resolver: { host: string; port: number } | null;
  /** Milliseconds per DNS query try. */
  dnsTimeout?: number;
}

/** A raw answer: RCODE (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, ...), the AD bit, each record's RDATA of the asked type. */
export interface SecureAnswer {
  rcode: number;
  /** The resolver validated the answer (or the denial) with DNSSEC. */
  secure: boolean;
  records: Buffer[];
}

export const DNS_TYPES = { A: 1, MX: 15, TXT: 16, AAAA: 28, TLSA: 52 } as const;

/** DNS errors that mean the name does not exist, as opposed to "cannot tell now". */
const NOT_FOUND = new Set(["ENOTFOUND", "NXDOMAIN"]);
const NO_DATA = new Set(["ENODATA"]);

export class Router {
  private readonly resolver: dns.promises.Resolver;

  constructor(private readonly options: RouterOptions) {
    this.resolver = new dns.promises.Resolver({ timeout: options.dnsTimeout ?? 5000, tries: 2 });
    if (options.resolver) {
      const { host, port } = options.resolver;
      this.resolver.setServers([net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`]);
    }
  }

  /** The TXT records of a name, each joined from its strings; [] when there are none (NXDOMAIN, NODATA). */
  async txt(name: string): Promise<string[]> {
    try {
      return (await this.resolver.resolveTxt(name)).map((parts) => parts.join(""));
    } catch (err) {
      if (NOT_FOUND.has(errorCode(err)) || NO_DATA.has(errorCode(err))) return [];
      throw err;
    }
  }

  /** A host's addresses (IPv4 first), through --resolver when given; rejects when there are none. */
  async hostAddresses(host: string): Promise<string[]> {
    const found = await this.addresses(host);
    if (Array.isArray(found)) return found;
    throw new Error(found.ok ? `no address for ${host}` : found.reason);
  }

  /** One raw query with the AD bit asked for; rejects on a timeout or an unreadable answer. */
  async query(name: string, type: keyof typeof DNS_TYPES): Promise<SecureAnswer> {
    const server = this.options.resolver ?? systemServer();
    const packet = dnsQuery(name, DNS_TYPES[type]);
    const timeout = this.options.dnsTimeout ?? 5000;
    let lastError: Error = new Error(`DNS query ${name} ${type}: no answer`);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const answer = await udpExchange(server, packet, timeout);
        // TC: the answer did not fit a datagram; ask again over TCP (RFC 7766).
        const reply = answer.readUInt16BE(2) & 0x0200 ? await tcpExchange(server, packet, timeout) : answer;
        return parseAnswer(reply, packet, DNS_TYPES[type]);
      } catch (err) {
        lastError = err as Error;
      }
    }
    throw new Error(`DNS query ${name} ${type}: ${lastError.message}`);
  }

  /** Where mail for this recipient domain goes. */
  async route(domain: string): Promise<Route> {
    if (this.options.relay) return this.hostRoute(this.options.relay.host, this.options.relay.port);
    const route = await this.domainRoute(domain);
    const fallback = this.options.fallbackRelay;
    if (!fallback) return route;
    // The fallback relay comes after every exchanger, and stands in for a domain not found.
    if (!route.ok && !(route.permanent && route.dsn === "5.4.4")) return route;
    const relay = await this.hostRoute(fallback.host, fallback.port);
    if (!relay.ok) return route;
    const hops = relay.hops.map((h) => ({ ...h, via: "fallback relay" as const }));
    return { ok: true, hops: route.ok ? [...route.hops, ...hops] : hops };
  }

  private async domainRoute(domain: string): Promise<Route> {
    if (domain.startsWith("[") && domain.endsWith("]")) {
      const literal = domain.slice(1, -1).replace(/^IPv6:/i, "");
      return { ok: true, hops: [{ host: literal, address: literal, port: this.options.port }] };
    }
    let exchangers: Array<{ name: string; preference: number }>;
    try {
      const records = await this.resolver.resolveMx(domain);
      // No MX records (an alias without them answers with an empty list): the domain is its own exchanger.
      if (records.length === 0) return this.exchangerRoute(domain, [{ name: domain, preference: 0 }]);
      if (records.some((r) => r.exchange === "" || r.exchange === ".")) {
        return { ok: false, permanent: true, dsn: "5.1.10", reason: `Domain ${domain} does not accept mail (nullMX)` };
      }
      exchangers = records
        .map((r) => ({ name: r.exchange.replace(/\.$/, ""), preference: r.priority, key: r.priority + Math.random() / 2 }))
        .sort((a, b) => a.key - b.key);
    } catch (err) {
      const code = errorCode(err);
      if (NO_DATA.has(code)) exchangers = [{ name: domain, preference: 0 }];
      else if (!NOT_FOUND.has(code) && this.options.ignoreMxLookupError) exchangers = [{ name: domain, preference: 0 }];
      else return dnsFailure(domain, "MX", code);
    }
    return this.exchangerRoute(domain, exchangers);
  }

  private async exchangerRoute(domain: string, exchangers: Array<{ name: string; preference: number }>): Promise<Route> {
    const found: Array<{ name: string; preference: number; addresses: string[] }> = [];
    let lastFailure: Route | null = null;
    for (const mx of exchangers) {
      const addresses = await this.addresses(mx.name);
      if (Array.isArray(addresses)) found.push({ ...mx, addresses });
      else lastFailure = addresses;
    }
    // inet_interfaces: an exchanger that is this machine ends the list, with every one of
    // its preference or worse; if that leaves none, the mail would loop back to us.
    const own = this.options.ownAddresses;
    const self = own ? found.find((mx) => mx.addresses.some((a) => own.has(a))) : undefined;
    const usable = self ? found.filter((mx) => mx.preference < self.preference) : found;
    if (self && usable.length === 0) {
      const best = this.options.bestMxRelay;
      if (best) {
        const relay = await this.hostRoute(best.host, best.port);
        if (relay.ok) return { ok: true, hops: relay.hops.map((h) => ({ ...h, via: "best-MX relay" as const })) };
        return relay;
      }
      return { ok: false, permanent: true, dsn: "5.4.6", reason: `mail for ${domain} loops back to myself` };
    }
    const hops = usable.flatMap((mx) => mx.addresses.map((address) => ({ host: mx.name, address, port: this.options.port })));
    if (hops.length > 0) return { ok: true, hops };
    if (lastFailure && !lastFailure.ok && !lastFailure.permanent) return lastFailure;
    const what = exchangers.length === 1 && exchangers[0].name === domain ? `Host or domain name not found. Name service error for name=${domain} type=A: Host not found`
      : `no address for any mail exchanger of ${domain} (${exchangers.map((x) => x.name).join(", ")})`;
    return { ok: false, permanent: true, dsn: "5.4.4", reason: what };
  }

  /** A relay by name or address: its addresses in the order DNS gives them. */
  private async hostRoute(host: string, port: number): Promise<Route> {
    const found = await this.addresses(host);
    if (!Array.isArray(found)) {
      // A relay that cannot be found is a configuration problem, not the recipient's: defer.
      return found.ok ? found : { ...found, permanent: false, dsn: "4.4.3" };
    }
    return { ok: true, hops: found.map((address) => ({ host, address, port })) };
  }

  /** A and AAAA records of a host (IPv4 first), or why there are none. */
  private async addresses(host: string): Promise<string[] | Route> {
    if (net.isIP(host)) return [host];
    if (!this.options.resolver) {
      // The system's resolver, /etc/hosts included ("localhost" works as it does everywhere).
      try {
        const all = await dns.promises.lookup(host, { all: true, order: "ipv4first" });
        return all.map((a) => a.address);
      } catch (err) {
        return dnsFailure(host, "A", errorCode(err));
      }
    }
    const [v4, v6] = await Promise.allSettled([this.resolver.resolve4(host), this.resolver.resolve6(host)]);
    const found = [...(v4.status === "fulfilled" ? v4.value : []), ...(v6.status === "fulfilled" ? v6.value : [])];
    if (found.length > 0) return found;
    const codes = [v4, v6].map((r) => (r.status === "rejected" ? errorCode(r.reason) : "ENODATA"));
    const temporary = codes.find((c) => !NOT_FOUND.has(c) && !NO_DATA.has(c));
    return dnsFailure(host, "A", temporary ?? (codes.some((c) => NOT_FOUND.has(c)) ? "ENOTFOUND" : "ENODATA"));
  }
}

function errorCode(err: unknown): string {
  return String((err as NodeJS.ErrnoException | null)?.code ?? "EUNKNOWN");
}

/** Postfix's words for a failed lookup: "Host not found" is final, anything else is "try again". */
function dnsFailure(name: string, type: string, code: string): Route {
  if (NOT_FOUND.has(code) || NO_DATA.has(code)) {
    return { ok: false, permanent: true, dsn: "5.4.4", reason: `Host or domain name not found. Name service error for name=${name} type=${type}: Host not found` };
  }
  return { ok: false, permanent: false, dsn: "4.4.3", reason: `Host or domain name not found. Name service error for name=${name} type=${type}: Host not found, try again (${code})` };
}

/* ------------------------------------------------------------------------------------ */
/* Raw queries: what Node's resolver does not show                                       */

function systemServer(): { host: string; port: number } {
  const first = dns.getServers()[0] ?? "127.0.0.1";
  const m = /^\[(.+)\]:(\d+)$/.exec(first) ?? /^([^:]+):(\d+)$/.exec(first);
  return m ? { host: m[1], port: Number(m[2]) } : { host: first, port: 53 };
}

function encodeName(name: string): Buffer {
  const labels = name.replace(/\.$/, "").split(".").filter((l) => l !== "");
  const parts = labels.map((l) => Buffer.from(l, "ascii"));
  if (parts.some((p) => p.length === 0 || p.length > 63)) throw new Error(`not a DNS name: ${JSON.stringify(name)}`);
  return Buffer.concat([...parts.flatMap((p) => [Buffer.from([p.length]), p]), Buffer.from([0])]);
}

/** A query with RD and AD set and an EDNS0 OPT record asking for DNSSEC (DO), 1232-byte answers. */
function dnsQuery(name: string, type: number): Buffer {
  const header = Buffer.alloc(12);
  randomBytes(2).copy(header, 0);
  header.writeUInt16BE(0x0120, 2);
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(1, 10);
  const question = Buffer.alloc(4);
  question.writeUInt16BE(type, 0);
  question.writeUInt16BE(1, 2);
  const opt = Buffer.from([0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
  return Buffer.concat([header, encodeName(name), question, opt]);
}

/** Skips a (possibly compressed) name; returns the offset after it. */
function skipName(msg: Buffer, pos: number): number {
  for (let guard = 0; guard < 128; guard++) {
    if (pos >= msg.length) throw new Error("truncated name");
    const len = msg[pos];
    if (len === 0) return pos + 1;
    if ((len & 0xc0) === 0xc0) return pos + 2;
    pos += 1 + len;
  }
  throw new Error("name too long");
}

function parseAnswer(msg: Buffer, query: Buffer, type: number): SecureAnswer {
  if (msg.length < 12 || msg.readUInt16BE(0) !== query.readUInt16BE(0) || !(msg.readUInt16BE(2) & 0x8000)) throw new Error("not an answer to our query");
  const flags = msg.readUInt16BE(2);
  let pos = 12;
  for (let i = msg.readUInt16BE(4); i > 0; i--) pos = skipName(msg, pos) + 4;
  const records: Buffer[] = [];
  for (let i = msg.readUInt16BE(6); i > 0; i--) {
    pos = skipName(msg, pos);
    if (pos + 10 > msg.length) throw new Error("truncated record");
    const rtype = msg.readUInt16BE(pos);
    const length = msg.readUInt16BE(pos + 8);
    if (pos + 10 + length > msg.length) throw new Error("truncated record");
    if (rtype === type) records.push(Buffer.from(msg.subarray(pos + 10, pos + 10 + length)));
    pos += 10 + length;
  }
  return { rcode: flags & 0x0f, secure: (flags & 0x0020) !== 0, records };
}

function udpExchange(server: { host: string; port: number }, packet: Buffer, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket(net.isIPv6(server.host) ? "udp6" : "udp4");
    const timer = setTimeout(() => done(new Error("timed out")), timeoutMs);
    const done = (err: Error | null, answer?: Buffer) => {
      clearTimeout(timer);
      socket.close();
      if (err) reject(err);
      else resolve(answer!);
    };
    socket.on("error", (err) => done(err));
    socket.on("message", (msg) => {
      // Only the answer to this query (same id) counts; anything else is ignored.
      if (msg.length >= 2 && msg.readUInt16BE(0) === packet.readUInt16BE(0)) done(null, msg);
    });
    socket.send(packet, server.port, server.host);
  });
}

function tcpExchange(server: { host: string; port: number }, packet: Buffer, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: server.host, port: server.port });
    let got = Buffer.alloc(0);
    const timer = setTimeout(() => done(new Error("timed out (TCP)")), timeoutMs);
    const done = (err: Error | null, answer?: Buffer) => {
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(answer!);
    };
    socket.on("error", (err) => done(err));
    socket.on("connect", () => socket.write(Buffer.concat([Buffer.from([packet.length >> 8, packet.length & 0xff]), packet])));
    socket.on("data", (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length >= 2 && got.length >= 2 + got.readUInt16BE(0)) done(null, got.subarray(2, 2 + got.readUInt16BE(0)));
    });
    socket.on("end", () => done(new Error("connection closed before the answer (TCP)")));
  });
}
