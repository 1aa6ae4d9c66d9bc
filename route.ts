/*
 * NAME
 *   route.ts - where mail for a destination goes: the relay, or a domain's mail exchangers
 *
 * SYNOPSIS
 *   const router = new Router({ relay: null, port: 25, resolver: "127.0.0.1:5353" });
 *   const route = await router.route("example.org");
 *   if (route.ok) for (const hop of route.hops) connect(hop.address, hop.port);
 *   else route.permanent ? bounce(route.reason, route.dsn) : defer(route.reason, route.dsn);
 *
 * DESCRIPTION
 *   The one place that asks DNS. With a relay, every destination is the relay. Without one,
 *   a domain's MX records are looked up (through --resolver when given), sorted by
 *   preference with equal preferences in random order, and each exchanger's A and AAAA
 *   records give the addresses to try in turn; a domain without MX records is its own
 *   exchanger (RFC 5321 section 5.1). The caller connects to each hop in order until one
 *   greets; after a greeting no error moves it to the next hop.
 *
 * DIAGNOSTICS
 *   A route that cannot be had says whether that is for good (the domain does not exist,
 *   or publishes the null MX of RFC 7505: the mail bounces) or for now (a DNS timeout or
 *   SERVFAIL: the mail is deferred), with Postfix's wording and an RFC 3463 status.
 */

import * as dns from "node:dns";
import * as net from "node:net";

export interface Hop {
  /** The name to log: the MX host, the relay's name, or the address itself. */
  host: string;
  address: string;
  port: number;
}

export type Route =
  | { ok: true; hops: Hop[] }
  | { ok: false; permanent: boolean; dsn: string; reason: string };

export interface RouterOptions {
  relay: { host: string; port: number } | null;
  port: number;
  /** IP[:PORT] of the DNS server to ask, or null for the system's. */
  resolver: { host: string; port: number } | null;
  /** Milliseconds per DNS query try. */
  dnsTimeout?: number;
}

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

  /** Where mail for this recipient domain goes. */
  async route(domain: string): Promise<Route> {
    if (this.options.relay) return this.hostRoute(this.options.relay.host, this.options.relay.port);
    if (domain.startsWith("[") && domain.endsWith("]")) {
      const literal = domain.slice(1, -1).replace(/^IPv6:/i, "");
      return { ok: true, hops: [{ host: literal, address: literal, port: this.options.port }] };
    }
    let exchangers: string[];
    try {
      const records = await this.resolver.resolveMx(domain);
      // No MX records (an alias without them answers with an empty list): the domain is its own exchanger.
      if (records.length === 0) return this.exchangerRoute(domain, [domain]);
      if (records.some((r) => r.exchange === "" || r.exchange === ".")) {
        return { ok: false, permanent: true, dsn: "5.1.10", reason: `Domain ${domain} does not accept mail (nullMX)` };
      }
      exchangers = records
        .map((r) => ({ name: r.exchange, key: r.priority + Math.random() / 2 }))
        .sort((a, b) => a.key - b.key)
        .map((r) => r.name.replace(/\.$/, ""));
    } catch (err) {
      const code = errorCode(err);
      if (NO_DATA.has(code)) exchangers = [domain];
      else return dnsFailure(domain, "MX", code);
    }
    return this.exchangerRoute(domain, exchangers);
  }

  private async exchangerRoute(domain: string, exchangers: string[]): Promise<Route> {
    const hops: Hop[] = [];
    let lastFailure: Route | null = null;
    for (const name of exchangers) {
      const found = await this.addresses(name);
      if (Array.isArray(found)) hops.push(...found.map((address) => ({ host: name, address, port: this.options.port })));
      else lastFailure = found;
    }
    if (hops.length > 0) return { ok: true, hops };
    if (lastFailure && !lastFailure.ok && !lastFailure.permanent) return lastFailure;
    const what = exchangers.length === 1 && exchangers[0] === domain ? `Host or domain name not found. Name service error for name=${domain} type=A: Host not found`
      : `no address for any mail exchanger of ${domain} (${exchangers.join(", ")})`;
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
