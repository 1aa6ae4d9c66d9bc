/**
 * dns-server: a small authoritative DNS server for tests of MX routing.
 *
 * It answers over UDP (node:dgram) and over TCP (node:net) on the same loopback port,
 * from a plain `Zone` object that tests may change at any time (it is read afresh for
 * every query). Point Node's resolver at it with
 *   const r = new dns.promises.Resolver({ timeout: 200, tries: 1 });
 *   r.setServers([server.address]);                 // "127.0.0.1:PORT"
 * or give `server.address` to mudmail's --resolver.
 *
 * What it answers (all records have TTL 0, so c-ares's query cache never keeps them):
 * - QR and AA set, ID / opcode / RD copied, RA clear, the question echoed byte for byte
 *   (case kept), names written without compression. TC is never set, whatever the size.
 * - The exact name (case-insensitive) and type: MX, A, AAAA, TXT, PTR, CNAME; ANY gives
 *   every record of the name. TXT: a string is one record, split into
 *   character-strings of at most 255 bytes (UTF-8); a string[] is one record with one
 *   character-string per element (each also split if longer than 255 bytes).
 * - CNAME: for any other asked type the CNAME is answered, then followed through the
 *   zone (chains too), adding the target's records of the asked type. The zone plays the
 *   whole DNS, so the answer is what a recursive resolver would give: a target not in
 *   the zone is NXDOMAIN (the CNAMEs still in the answer), a target with an `rcode` /
 *   `rcodeFor` override gets that RCODE, a loop (or a chain longer than 8) is SERVFAIL.
 *   A target that exists without records of the type: NOERROR with the CNAMEs alone.
 * - A name in the zone without a record of the asked type: NOERROR, empty answer,
 *   SOA in the authority section (NODATA). `{}` is a name that exists with no records.
 * - A name not in the zone: NXDOMAIN with an SOA. A name only exists if it is a key
 *   of the zone: empty non-terminals (e.g. "example.test" when only
 *   "mx1.example.test" is listed) are NXDOMAIN too.
 * - TLSA (RFC 6698): `{ usage, selector, mtype, data }` with `data` in hex, for DANE lookups
 *   (`_25._tcp.mx.example.test`).
 * - The AD bit (RFC 4035 section 3.2.3), as a validating resolver sets it: `secure: true` marks a
 *   name's records as DNSSEC-validated. An answer carries AD when the query asked for it (AD or
 *   the DO bit of EDNS0) and every owner it names is secure (the asked name and each CNAME
 *   target); a denial (NXDOMAIN or NODATA) when the closest name of the zone at or above the
 *   asked one is secure (a signed zone proves the name or type absent). Bogus data is what a
 *   validator answers with SERVFAIL: `rcodeFor: { TLSA: "SERVFAIL" }`.
 * - `rcodeFor[type]` wins over `rcode`; "TIMEOUT" means the query is recorded but never
 *   answered. A class other than IN (or ANY) is REFUSED. Opcodes other than QUERY get
 *   NOTIMP.
 * - Every parsed query is appended to `queries` ({ name lower-case without trailing
 *   dot, type mnemonic such as "MX" or "TYPE65" }), including unanswered ones.
 *   Malformed packets (responses, truncated, no question) are dropped silently.
 * - A zone entry that cannot be encoded (bad IP, label > 63 bytes) gives SERVFAIL and
 *   a process warning, never an exception.
 *
 * What Node 20's `dns.promises.Resolver` (c-ares) makes of the answers (proved in
 * tests/harness/dns-server.test.ts):
 * - null MX (RFC 7505, `{ preference: 0, exchange: "." }` or `exchange: ""`):
 *   resolveMx resolves to `[{ exchange: "", priority: 0 }]` -- the root name comes
 *   back as the empty string, it is not an error.
 * - NXDOMAIN  -> rejects with err.code "ENOTFOUND"  (dns.NOTFOUND)
 * - NODATA    -> rejects with err.code "ENODATA"    (dns.NODATA)
 * - SERVFAIL  -> rejects with err.code "ESERVFAIL"  (dns.SERVFAIL)
 * - REFUSED   -> rejects with err.code "EREFUSED"   (dns.REFUSED)
 * - TIMEOUT   -> rejects with err.code "ETIMEOUT"   (dns.TIMEOUT); measured with
 *   Node 20 / c-ares 1.34: { timeout: 200, tries: 1 } gives up after ~400 ms with one
 *   query, { timeout: 200, tries: 2 } after ~800 ms with two.
 *   Each error also has err.syscall ("queryMx", "queryA", "getHostByAddr", ...) and
 *   err.hostname.
 * - A CNAME whose target has no record of the type (NOERROR, only CNAMEs in the
 *   answer): resolveMx / resolve4 / resolveTxt resolve to [] -- not ENODATA.
 * - With one server, SERVFAIL and REFUSED are reported at once after a single query
 *   whatever `tries` is; only a timeout makes c-ares re-send (`tries` copies in
 *   `queries`).
 * - A UDP answer of a few KB is accepted whole (no TC needed); c-ares only uses TCP
 *   after a TC answer, which this server never sends, so TCP is for raw clients.
 */
import dgram from "node:dgram";
import net from "node:net";

export interface Zone {
  [name: string]: RecordSet;
}

export type Rcode = "NXDOMAIN" | "SERVFAIL" | "REFUSED" | "TIMEOUT";

export interface RecordSet {
  /** exchange "" or "." is the null MX (RFC 7505). */
  MX?: Array<{ preference: number; exchange: string }>;
  A?: string[];
  AAAA?: string[];
  /** A string is one TXT record; a string[] is one record made of several strings. */
  TXT?: string[][] | string[];
  PTR?: string[];
  /** DANE: usage, selector, matching type and the association data in hex. */
  TLSA?: Array<{ usage: number; selector: number; mtype: number; data: string }>;
  CNAME?: string;
  /** This name's records (and its absence proofs) are DNSSEC-validated: answers carry the AD bit. */
  secure?: boolean;
  /** Answer this name with this RCODE instead: "NXDOMAIN" | "SERVFAIL" | "REFUSED"; or "TIMEOUT": never answer. */
  rcode?: Rcode;
  /** Per query type override, e.g. { MX: "SERVFAIL" } or { MX: "TIMEOUT" } while A works. */
  rcodeFor?: Partial<Record<"MX" | "A" | "AAAA" | "TXT" | "PTR" | "TLSA", Rcode>>;
}

export interface DnsServer {
  host: string;
  port: number;
  /** "127.0.0.1:PORT" for --resolver and Resolver.setServers ("[::1]:PORT" for IPv6). */
  address: string;
  /** The live zone: changes are seen by the next query. */
  zone: Zone;
  /** Every query received, in order (UDP and TCP). */
  queries: Array<{ name: string; type: string }>;
  close(): Promise<void>;
}

const TYPES: Record<string, number> = {
  A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, MX: 15, TXT: 16, AAAA: 28, SRV: 33, OPT: 41, TLSA: 52, CAA: 257, ANY: 255,
};
const TYPE_NAMES = new Map(Object.entries(TYPES).map(([k, v]) => [v, k]));
const RCODES = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;
const CLASS_IN = 1;
const CLASS_ANY = 255;
const MAX_CNAME_CHAIN = 8;

interface Question {
  id: number;
  flags: number;
  /** The question section exactly as received (name, type, class). */
  raw: Buffer;
  /** The name as received (case kept), without trailing dot. */
  name: string;
  qtype: number;
  qclass: number;
  /** EDNS0's DO bit was set (an OPT record in the additional section). */
  dnssecOk: boolean;
}

/** ASCII-only lower-casing, as DNS compares names. */
function lower(s: string): string {
  return s.replace(/[A-Z]+/g, (m) => m.toLowerCase());
}

function normalize(name: string): string {
  return lower(name).replace(/\.$/, "");
}

function typeName(qtype: number): string {
  return TYPE_NAMES.get(qtype) ?? `TYPE${qtype}`;
}

/** Parses a query; undefined for anything malformed or not a query. */
function parseQuery(msg: Buffer): Question | undefined {
  if (msg.length < 12) return undefined;
  const id = msg.readUInt16BE(0);
  const flags = msg.readUInt16BE(2);
  if (flags & 0x8000) return undefined; // a response, not a query
  if (msg.readUInt16BE(4) < 1) return undefined;
  const labels: string[] = [];
  let pos = 12;
  let end = -1; // where the question continues after a compression pointer
  let jumps = 0;
  let total = 0;
  for (;;) {
    if (pos >= msg.length) return undefined;
    const len = msg[pos]!;
    if (len === 0) {
      pos += 1;
      break;
    }
    if ((len & 0xc0) === 0xc0) {
      if (pos + 1 >= msg.length || ++jumps > 16) return undefined;
      if (end < 0) end = pos + 2;
      pos = ((len & 0x3f) << 8) | msg[pos + 1]!;
      continue;
    }
    if (len & 0xc0) return undefined; // reserved label types
    if (pos + 1 + len > msg.length) return undefined;
    total += len + 1;
    if (total > 255) return undefined;
    labels.push(msg.toString("utf8", pos + 1, pos + 1 + len));
    pos += 1 + len;
  }
  if (end >= 0) pos = end;
  if (pos + 4 > msg.length) return undefined;
  const qtype = msg.readUInt16BE(pos);
  const qclass = msg.readUInt16BE(pos + 2);
  const name = labels.join(".");
  // Echo the question without compression (a pointer would point into our header).
  const raw = Buffer.concat([encodeName(name), u16(qtype), u16(qclass)]);
  return { id, flags, raw, name, qtype, qclass, dnssecOk: ednsDo(msg, pos + 4) };
}

/** The DO bit of an OPT record (RFC 6891: root owner, type 41, TTL's bit 15) right after the question, if any. */
function ednsDo(msg: Buffer, pos: number): boolean {
  if (msg.readUInt16BE(6) !== 0 || msg.readUInt16BE(8) !== 0 || msg.readUInt16BE(10) < 1) return false;
  if (pos + 11 > msg.length || msg[pos] !== 0 || msg.readUInt16BE(pos + 1) !== TYPES.OPT) return false;
  return (msg.readUInt16BE(pos + 7) & 0x8000) !== 0;
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n & 0xffff);
  return b;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Uncompressed wire form of a name; "" and "." are the root. */
function encodeName(name: string): Buffer {
  const trimmed = name.replace(/\.$/, "");
  const parts: Buffer[] = [];
  let total = 1;
  if (trimmed !== "") {
    for (const label of trimmed.split(".")) {
      const bytes = Buffer.from(label, "utf8");
      if (bytes.length === 0 || bytes.length > 63) throw new Error(`bad DNS label in ${JSON.stringify(name)}`);
      total += bytes.length + 1;
      parts.push(Buffer.from([bytes.length]), bytes);
    }
  }
  if (total > 255) throw new Error(`DNS name too long: ${JSON.stringify(name)}`);
  parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}

function ipv4Bytes(ip: string): Buffer {
  if (!net.isIPv4(ip)) throw new Error(`bad IPv4 address ${JSON.stringify(ip)}`);
  return Buffer.from(ip.split(".").map(Number));
}

function ipv6Bytes(ip: string): Buffer {
  const addr = ip.replace(/%.*$/, "");
  if (!net.isIPv6(addr)) throw new Error(`bad IPv6 address ${JSON.stringify(ip)}`);
  const groups = (s: string): number[] => {
    if (s === "") return [];
    const out: number[] = [];
    for (const part of s.split(":")) {
      if (part.includes(".")) {
        const v4 = ipv4Bytes(part);
        out.push((v4[0]! << 8) | v4[1]!, (v4[2]! << 8) | v4[3]!);
      } else {
        out.push(parseInt(part, 16));
      }
    }
    return out;
  };
  const [head, tail] = addr.split("::") as [string, string | undefined];
  const h = groups(head);
  const t = tail === undefined ? [] : groups(tail);
  const all = tail === undefined ? h : [...h, ...new Array<number>(8 - h.length - t.length).fill(0), ...t];
  const b = Buffer.alloc(16);
  all.forEach((g, i) => b.writeUInt16BE(g, i * 2));
  return b;
}

/** Splits a string into character-strings of at most 255 bytes (never inside a UTF-8 sequence). */
function characterStrings(s: string): Buffer[] {
  const bytes = Buffer.from(s, "utf8");
  if (bytes.length === 0) return [Buffer.from([0])];
  const out: Buffer[] = [];
  let pos = 0;
  while (pos < bytes.length) {
    let end = Math.min(pos + 255, bytes.length);
    if (end < bytes.length) {
      // Back up to a character boundary (continuation bytes are 10xxxxxx).
      let e = end;
      while (e > pos && (bytes[e]! & 0xc0) === 0x80) e--;
      if (e > pos) end = e;
    }
    out.push(Buffer.from([end - pos]), bytes.subarray(pos, end));
    pos = end;
  }
  return out;
}

function rr(owner: string, type: number, rdata: Buffer): Buffer {
  return Buffer.concat([encodeName(owner), u16(type), u16(CLASS_IN), u32(0), u16(rdata.length), rdata]);
}

/** The records of one type (or all for ANY) of a record set, as wire RRs. */
function records(owner: string, set: RecordSet, qtype: number): Buffer[] {
  const out: Buffer[] = [];
  const want = (t: number) => qtype === t || qtype === TYPES.ANY;
  if (want(TYPES.CNAME!) && set.CNAME !== undefined) out.push(rr(owner, TYPES.CNAME!, encodeName(set.CNAME)));
  if (want(TYPES.A!)) for (const ip of set.A ?? []) out.push(rr(owner, TYPES.A!, ipv4Bytes(ip)));
  if (want(TYPES.AAAA!)) for (const ip of set.AAAA ?? []) out.push(rr(owner, TYPES.AAAA!, ipv6Bytes(ip)));
  if (want(TYPES.MX!)) {
    for (const mx of set.MX ?? []) {
      out.push(rr(owner, TYPES.MX!, Buffer.concat([u16(mx.preference), encodeName(mx.exchange)])));
    }
  }
  if (want(TYPES.TXT!)) {
    for (const txt of set.TXT ?? []) {
      const strings = typeof txt === "string" ? [txt] : txt;
      out.push(rr(owner, TYPES.TXT!, Buffer.concat(strings.flatMap(characterStrings))));
    }
  }
  if (want(TYPES.PTR!)) for (const p of set.PTR ?? []) out.push(rr(owner, TYPES.PTR!, encodeName(p)));
  if (want(TYPES.TLSA!)) {
    for (const r of set.TLSA ?? []) {
      if (!/^(?:[0-9a-f]{2})*$/i.test(r.data)) throw new Error(`bad TLSA data ${JSON.stringify(r.data)}`);
      out.push(rr(owner, TYPES.TLSA!, Buffer.concat([Buffer.from([r.usage, r.selector, r.mtype]), Buffer.from(r.data, "hex")])));
    }
  }
  return out;
}

function lookup(zone: Zone, name: string): RecordSet | undefined {
  const key = normalize(name);
  if (Object.prototype.hasOwnProperty.call(zone, key)) return zone[key];
  for (const k of Object.keys(zone)) if (normalize(k) === key) return zone[k];
  return undefined;
}

/** A denial is proven secure when the closest name of the zone at or above the asked one is secure. */
function secureDenial(zone: Zone, name: string): boolean {
  const labels = normalize(name).split(".").filter((l) => l !== "");
  for (let i = 0; i < labels.length; i++) {
    const set = lookup(zone, labels.slice(i).join("."));
    if (set) return set.secure === true;
  }
  return false;
}

/** The query asked for DNSSEC answers: the AD bit (RFC 6840 section 5.7) or EDNS0's DO bit. */
function wantsDnssec(q: Question): boolean {
  return (q.flags & 0x0020) !== 0 || q.dnssecOk;
}

/** The override that applies to this record set and query type, if any. */
function override(set: RecordSet, qtype: number): Rcode | undefined {
  const t = typeName(qtype) as keyof NonNullable<RecordSet["rcodeFor"]>;
  return set.rcodeFor?.[t] ?? set.rcode;
}

/** SOA for the authority section: the shortest zone name above (or at) qname, else its last two labels. */
function soa(zone: Zone, qname: string): Buffer {
  const labels = normalize(qname).split(".").filter((l) => l !== "");
  let apex = labels.slice(-2).join(".");
  for (let i = labels.length - 1; i >= 0; i--) {
    const candidate = labels.slice(i).join(".");
    if (lookup(zone, candidate)) {
      apex = candidate;
      break;
    }
  }
  const prefix = apex === "" ? "" : `.${apex}`;
  const rdata = Buffer.concat([
    encodeName(`ns${prefix}`),
    encodeName(`hostmaster${prefix}`),
    u32(1), u32(3600), u32(600), u32(86400), u32(0),
  ]);
  return rr(apex, TYPES.SOA!, rdata);
}

function message(q: Question, rcode: number, answers: Buffer[], authority: Buffer[], secure = false): Buffer {
  const opcode = q.flags & 0x7800;
  const rd = q.flags & 0x0100;
  const ad = secure && wantsDnssec(q) ? 0x0020 : 0;
  const flags = 0x8000 | opcode | 0x0400 | rd | ad | (rcode & 0xf);
  const header = Buffer.concat([u16(q.id), u16(flags), u16(1), u16(answers.length), u16(authority.length), u16(0)]);
  return Buffer.concat([header, q.raw, ...answers, ...authority]);
}

/** The answer to a query, or undefined to stay silent. */
function answer(zone: Zone, q: Question): Buffer | undefined {
  if ((q.flags & 0x7800) !== 0) return message(q, RCODES.NOTIMP, [], []);
  if (q.qclass !== CLASS_IN && q.qclass !== CLASS_ANY) return message(q, RCODES.REFUSED, [], []);
  const answers: Buffer[] = [];
  let owner = q.name;
  let set = lookup(zone, owner);
  const seen = new Set<string>();
  // AD: every owner named in the answer is secure (and a denial is proven).
  let secure = true;
  for (;;) {
    // Not in the zone (the asked name, or the end of a CNAME chain): NXDOMAIN, with the
    // CNAMEs followed so far, as a recursive resolver reports a dangling CNAME.
    if (!set) return message(q, RCODES.NXDOMAIN, answers, [soa(zone, owner)], secure && secureDenial(zone, owner));
    secure &&= set.secure === true;
    const rc = override(set, q.qtype);
    if (rc === "TIMEOUT") return undefined;
    if (rc !== undefined) return message(q, RCODES[rc], answers, rc === "NXDOMAIN" ? [soa(zone, owner)] : []);
    const follow = set.CNAME !== undefined && q.qtype !== TYPES.CNAME && q.qtype !== TYPES.ANY;
    if (!follow) break;
    answers.push(rr(owner, TYPES.CNAME!, encodeName(set.CNAME!)));
    seen.add(normalize(owner));
    owner = set.CNAME!.replace(/\.$/, "");
    if (seen.has(normalize(owner)) || seen.size >= MAX_CNAME_CHAIN) return message(q, RCODES.SERVFAIL, [], []);
    set = lookup(zone, owner);
  }
  answers.push(...records(owner, set, q.qtype));
  return message(q, RCODES.NOERROR, answers, answers.length === 0 ? [soa(zone, owner)] : [], secure);
}

export async function startDnsServer(zone: Zone, opts: { host?: string; port?: number } = {}): Promise<DnsServer> {
  const host = opts.host ?? "127.0.0.1";
  const queries: DnsServer["queries"] = [];
  const sockets = new Set<net.Socket>();
  let closed = false;
  let current: Zone = zone;

  /** Query bytes in, answer bytes out (or undefined); never throws. */
  const handle = (msg: Buffer): Buffer | undefined => {
    if (closed) return undefined;
    let q: Question | undefined;
    try {
      q = parseQuery(msg);
    } catch {
      return undefined;
    }
    if (!q) return undefined;
    queries.push({ name: normalize(q.name), type: typeName(q.qtype) });
    try {
      return answer(current, q);
    } catch (err) {
      process.emitWarning(`dns-server: SERVFAIL for ${q.name} ${typeName(q.qtype)}: ${(err as Error).message}`);
      try {
        return message(q, RCODES.SERVFAIL, [], []);
      } catch {
        return undefined;
      }
    }
  };

  const listenUdp = (port: number) =>
    new Promise<dgram.Socket>((resolve, reject) => {
      const udp = dgram.createSocket(net.isIPv6(host) ? "udp6" : "udp4");
      udp.once("error", reject);
      udp.bind(port, host, () => {
        udp.off("error", reject);
        udp.on("error", () => undefined);
        resolve(udp);
      });
    });
  const listenTcp = (port: number) =>
    new Promise<net.Server>((resolve, reject) => {
      const tcp = net.createServer();
      tcp.once("error", reject);
      tcp.listen(port, host, () => {
        tcp.off("error", reject);
        tcp.on("error", () => undefined);
        resolve(tcp);
      });
    });
  const closeUdp = (udp: dgram.Socket) => new Promise<void>((resolve) => udp.close(() => resolve()));
  const closeTcp = (tcp: net.Server) => new Promise<void>((resolve) => tcp.close(() => resolve()));

  // Bind UDP, then TCP on the same port; with an ephemeral port, retry if TCP's is taken.
  let udp: dgram.Socket | undefined;
  let tcp: net.Server | undefined;
  for (let attempt = 0; ; attempt++) {
    udp = await listenUdp(opts.port ?? 0);
    try {
      tcp = await listenTcp(udp.address().port);
      break;
    } catch (err) {
      await closeUdp(udp);
      if (opts.port !== undefined || attempt >= 20) throw err;
    }
  }
  const port = udp.address().port;

  udp.on("message", (msg, rinfo) => {
    const out = handle(msg);
    if (out) udp!.send(out, rinfo.port, rinfo.address, () => undefined);
  });

  tcp.on("connection", (sock) => {
    sockets.add(sock);
    sock.on("close", () => sockets.delete(sock));
    sock.on("error", () => undefined);
    let buf = Buffer.alloc(0);
    sock.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2) {
        const len = buf.readUInt16BE(0);
        if (buf.length < 2 + len) break;
        const msg = buf.subarray(2, 2 + len);
        buf = buf.subarray(2 + len);
        const out = handle(msg);
        if (out && !sock.destroyed) sock.write(Buffer.concat([u16(out.length), out]));
      }
    });
  });

  const server: DnsServer = {
    host,
    port,
    address: net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`,
    get zone() {
      return current;
    },
    set zone(z: Zone) {
      current = z;
    },
    queries,
    async close() {
      if (closed) return;
      closed = true;
      for (const s of sockets) s.destroy();
      await Promise.all([closeUdp(udp!), closeTcp(tcp!)]);
    },
  };
  return server;
}
