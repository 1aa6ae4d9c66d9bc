// Tests of the DNS server helper (tests/helpers/dns-server.ts) with Node's own resolver
// (node:dns promises.Resolver, i.e. c-ares) pointed at it, plus a raw UDP / TCP client
// for what the resolver does not show (flags, authority section, malformed input).
import dgram from "node:dgram";
import { promises as dnsp } from "node:dns";
import net from "node:net";
import t from "tap";
import { startDnsServer, type DnsServer, type Zone } from "../helpers/dns-server.js";

const WAIT_MS = 1000;

/** A resolver aimed at the server, quick to give up (every wait bounded). */
function resolver(server: DnsServer, timeout = WAIT_MS): dnsp.Resolver {
  const r = new dnsp.Resolver({ timeout, tries: 1 });
  r.setServers([server.address]);
  return r;
}

/** The rejection of a promise that must reject (fails the test if it resolves). */
async function rejection(p: Promise<unknown>): Promise<NodeJS.ErrnoException & { hostname?: string }> {
  let value: unknown;
  try {
    value = await p;
  } catch (err) {
    return err as NodeJS.ErrnoException;
  }
  throw new Error(`expected a rejection, got ${JSON.stringify(value)}`);
}

function zone(): Zone {
  return {
    "example.test": {
      MX: [
        { preference: 20, exchange: "mx2.example.test" },
        { preference: 10, exchange: "mx1.example.test" },
      ],
      A: ["192.0.2.10"],
      TXT: ["v=spf1 -all", "y".repeat(600)],
    },
    "multi.example.test": { TXT: [["part one", "part two"], ["alone"]] },
    "mx1.example.test": { A: ["192.0.2.1", "192.0.2.2"], AAAA: ["2001:db8::1", "::1", "::ffff:192.0.2.1"] },
    "mx2.example.test": { A: ["127.0.0.1"] },
    "nomx.test": { A: ["192.0.2.3"] },
    "empty.test": {},
    "null.test": { MX: [{ preference: 0, exchange: "." }] },
    "null2.test": { MX: [{ preference: 0, exchange: "" }] },
    "alias.test": { CNAME: "mx1.example.test" },
    "alias2.test": { CNAME: "alias.test" },
    "outside.test": { CNAME: "elsewhere.invalid" },
    "loop1.test": { CNAME: "loop2.test" },
    "loop2.test": { CNAME: "loop1.test" },
    "4.3.2.1.in-addr.arpa": { PTR: ["host.example.test"] },
    "servfail.test": { rcode: "SERVFAIL" },
    "refused.test": { rcode: "REFUSED" },
    "nxdomain.test": { rcode: "NXDOMAIN", A: ["192.0.2.99"] },
    "timeout.test": { rcode: "TIMEOUT" },
    "mxfail.test": { rcodeFor: { MX: "SERVFAIL" }, A: ["192.0.2.4"] },
    "mxslow.test": { rcodeFor: { MX: "TIMEOUT" }, A: ["192.0.2.5"] },
    "override.test": { rcode: "SERVFAIL", rcodeFor: { A: "REFUSED" } },
    "badip.test": { A: ["999.1.1.1"] },
  };
}

// ---- a raw DNS client ------------------------------------------------------------

const TYPE = { A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, MX: 15, TXT: 16, AAAA: 28 } as const;

function buildQuery(id: number, name: string, qtype: number, flags = 0x0100, qclass = 1): Buffer {
  const labels = name === "" ? [] : name.split(".");
  const parts = labels.flatMap((l) => [Buffer.from([Buffer.byteLength(l)]), Buffer.from(l)]);
  const header = Buffer.alloc(12);
  header.writeUInt16BE(id, 0);
  header.writeUInt16BE(flags, 2);
  header.writeUInt16BE(1, 4);
  const tail = Buffer.alloc(4);
  tail.writeUInt16BE(qtype, 0);
  tail.writeUInt16BE(qclass, 2);
  return Buffer.concat([header, ...parts, Buffer.from([0]), tail]);
}

interface RR {
  name: string;
  type: number;
  ttl: number;
  rdata: Buffer;
}
interface Parsed {
  id: number;
  flags: number;
  rcode: number;
  qdcount: number;
  question: Buffer;
  answers: RR[];
  authority: RR[];
  additional: RR[];
}

function readName(msg: Buffer, pos: number): [string, number] {
  const labels: string[] = [];
  for (;;) {
    const len = msg[pos]!;
    if (len === 0) return [labels.join("."), pos + 1];
    if ((len & 0xc0) !== 0) throw new Error("compressed name in answer");
    labels.push(msg.toString("utf8", pos + 1, pos + 1 + len));
    pos += 1 + len;
  }
}

function parse(msg: Buffer): Parsed {
  const counts = [4, 6, 8, 10].map((o) => msg.readUInt16BE(o));
  let pos = 12;
  const qstart = pos;
  for (let i = 0; i < counts[0]!; i++) pos = readName(msg, pos)[1] + 4;
  const question = msg.subarray(qstart, pos);
  const section = (n: number): RR[] => {
    const out: RR[] = [];
    for (let i = 0; i < n; i++) {
      const [name, p] = readName(msg, pos);
      const type = msg.readUInt16BE(p);
      const ttl = msg.readUInt32BE(p + 4);
      const len = msg.readUInt16BE(p + 8);
      out.push({ name, type, ttl, rdata: msg.subarray(p + 10, p + 10 + len) });
      pos = p + 10 + len;
    }
    return out;
  };
  const answers = section(counts[1]!);
  const authority = section(counts[2]!);
  const additional = section(counts[3]!);
  if (pos !== msg.length) throw new Error(`trailing bytes: ${msg.length - pos}`);
  const flags = msg.readUInt16BE(2);
  return { id: msg.readUInt16BE(0), flags, rcode: flags & 0xf, qdcount: counts[0]!, question, answers, authority, additional };
}

/** Sends datagrams from one socket; resolves with the first reply, or undefined after ms. */
function udpExchange(server: DnsServer, packets: Buffer[], ms = 300): Promise<Buffer | undefined> {
  return new Promise((resolve) => {
    const sock = dgram.createSocket("udp4");
    const done = (v: Buffer | undefined) => {
      clearTimeout(timer);
      sock.close();
      resolve(v);
    };
    const timer = setTimeout(() => done(undefined), ms);
    sock.on("message", (m) => done(m));
    sock.on("error", () => done(undefined));
    for (const p of packets) sock.send(p, server.port, server.host);
  });
}

/** Writes bytes on one TCP connection and collects `count` length-prefixed replies (bounded). */
function tcpExchange(server: DnsServer, bytes: Buffer, count: number, ms = 1000): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const replies: Buffer[] = [];
    let buf = Buffer.alloc(0);
    const sock = net.connect(server.port, server.host);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`TCP: ${replies.length}/${count} replies after ${ms} ms`));
    }, ms);
    sock.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    sock.on("connect", () => sock.write(bytes));
    sock.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
        replies.push(buf.subarray(2, 2 + buf.readUInt16BE(0)));
        buf = buf.subarray(2 + buf.readUInt16BE(0));
      }
      if (replies.length >= count) {
        clearTimeout(timer);
        sock.destroy();
        resolve(replies);
      }
    });
  });
}

function framed(msg: Buffer): Buffer {
  const len = Buffer.alloc(2);
  len.writeUInt16BE(msg.length);
  return Buffer.concat([len, msg]);
}

// ---- tests -----------------------------------------------------------------------

t.test("starts on an ephemeral loopback port and closes cleanly", async (t) => {
  const server = await startDnsServer({});
  t.equal(server.host, "127.0.0.1");
  t.ok(server.port > 0);
  t.equal(server.address, `127.0.0.1:${server.port}`);
  t.same(server.queries, []);
  await server.close();
  await server.close(); // twice is harmless
  // The port is free again, for UDP and TCP.
  const again = await startDnsServer({}, { port: server.port });
  t.equal(again.port, server.port);
  await again.close();
});

t.test("Node's resolver accepts the answers", async (t) => {
  const server = await startDnsServer(zone());
  t.teardown(() => server.close());
  const r = resolver(server);

  t.test("resolveMx", async (t) => {
    const mx = await r.resolveMx("example.test");
    t.same(
      [...mx].sort((a, b) => a.priority - b.priority),
      [
        { exchange: "mx1.example.test", priority: 10 },
        { exchange: "mx2.example.test", priority: 20 },
      ],
    );
  });

  t.test("names are matched case-insensitively, queries recorded lower-case", async (t) => {
    const before = server.queries.length;
    const mx = await r.resolveMx("EXAMPLE.Test");
    t.equal(mx.length, 2);
    t.same(await r.resolve4("Mx2.Example.TEST"), ["127.0.0.1"]);
    t.same(server.queries.slice(before), [
      { name: "example.test", type: "MX" },
      { name: "mx2.example.test", type: "A" },
    ]);
  });

  t.test("resolve4 and resolve6, with TTLs of 0", async (t) => {
    t.same(await r.resolve4("mx1.example.test"), ["192.0.2.1", "192.0.2.2"]);
    t.same(await r.resolve6("mx1.example.test"), ["2001:db8::1", "::1", "::ffff:192.0.2.1"]);
    t.same(await r.resolve4("mx1.example.test", { ttl: true }), [
      { address: "192.0.2.1", ttl: 0 },
      { address: "192.0.2.2", ttl: 0 },
    ]);
  });

  t.test("resolveTxt: strings, multi-string records, strings split at 255 bytes", async (t) => {
    const txt = await r.resolveTxt("example.test");
    t.equal(txt.length, 2);
    t.same(txt[0], ["v=spf1 -all"]);
    t.same(
      txt[1]!.map((s) => s.length),
      [255, 255, 90],
    );
    t.equal(txt[1]!.join(""), "y".repeat(600));
    t.same(await r.resolveTxt("multi.example.test"), [["part one", "part two"], ["alone"]]);
  });

  t.test("reverse and resolvePtr", async (t) => {
    t.same(await r.reverse("1.2.3.4"), ["host.example.test"]);
    t.same(await r.resolvePtr("4.3.2.1.in-addr.arpa"), ["host.example.test"]);
    t.same(server.queries.at(-2), { name: "4.3.2.1.in-addr.arpa", type: "PTR" });
  });

  t.test("CNAME: followed through the zone like a recursive resolver would", async (t) => {
    t.same(await r.resolveCname("alias.test"), ["mx1.example.test"]);
    t.same(await r.resolve4("alias.test"), ["192.0.2.1", "192.0.2.2"]);
    t.same(await r.resolve4("alias2.test"), ["192.0.2.1", "192.0.2.2"]); // chain of two
    // The target has no MX: the answer holds the CNAME alone, NOERROR, and c-ares
    // then resolves to an empty array, not ENODATA.
    t.same(await r.resolveMx("alias.test"), []);
    t.same(await r.resolveCname("outside.test"), ["elsewhere.invalid"]);
    t.equal((await rejection(r.resolve4("outside.test"))).code, "ENOTFOUND"); // dangling
    t.equal((await rejection(r.resolve4("loop1.test"))).code, "ESERVFAIL");
  });

  t.test("null MX: resolveMx gives exchange \"\" with priority 0", async (t) => {
    t.same(await r.resolveMx("null.test"), [{ exchange: "", priority: 0 }]);
    t.same(await r.resolveMx("null2.test"), [{ exchange: "", priority: 0 }]);
  });

  t.test("resolveAny: every record of the name", async (t) => {
    const any = await r.resolveAny("mx1.example.test");
    t.same(
      any.map((rec) => rec.type).sort(),
      ["A", "A", "AAAA", "AAAA", "AAAA"],
    );
    t.same(server.queries.at(-1), { name: "mx1.example.test", type: "ANY" });
  });

  t.test("a large UDP answer is taken whole (no TC, no TCP retry needed)", async (t) => {
    server.zone["big.test"] = { TXT: Array.from({ length: 10 }, (_, i) => `${i}`.repeat(250)) };
    const before = server.queries.length;
    const txt = await r.resolveTxt("big.test");
    t.equal(txt.length, 10);
    t.equal(server.queries.length - before, 1);
  });
});

t.test("error codes as Node's resolver reports them", async (t) => {
  const server = await startDnsServer(zone());
  t.teardown(() => server.close());
  const r = resolver(server);

  t.test("NXDOMAIN -> ENOTFOUND", async (t) => {
    const err = await rejection(r.resolveMx("nowhere.test"));
    t.equal(err.code, "ENOTFOUND");
    t.equal(err.code, dnsp.NOTFOUND);
    t.equal(err.syscall, "queryMx");
    t.equal(err.hostname, "nowhere.test");
    // A name under a zone name is not in the zone either.
    t.equal((await rejection(r.resolve4("sub.example.test"))).code, "ENOTFOUND");
    // rcode NXDOMAIN wins over the records.
    t.equal((await rejection(r.resolve4("nxdomain.test"))).code, "ENOTFOUND");
    t.equal((await rejection(r.reverse("9.9.9.9"))).code, "ENOTFOUND");
  });

  t.test("NODATA -> ENODATA", async (t) => {
    const err = await rejection(r.resolveMx("nomx.test"));
    t.equal(err.code, "ENODATA");
    t.equal(err.code, dnsp.NODATA);
    t.equal((await rejection(r.resolve4("empty.test"))).code, "ENODATA");
    t.equal((await rejection(r.resolve6("mx2.example.test"))).code, "ENODATA");
  });

  t.test("SERVFAIL -> ESERVFAIL, once with tries: 1", async (t) => {
    const before = server.queries.length;
    const err = await rejection(r.resolveMx("servfail.test"));
    t.equal(err.code, "ESERVFAIL");
    t.equal(err.code, dnsp.SERVFAIL);
    t.same(server.queries.slice(before), [{ name: "servfail.test", type: "MX" }]);
  });

  t.test("one server: SERVFAIL and REFUSED are not retried, a timeout is", async (t) => {
    const r4 = new dnsp.Resolver({ timeout: 200, tries: 4 });
    r4.setServers([server.address]);
    let before = server.queries.length;
    t.equal((await rejection(r4.resolve4("servfail.test"))).code, "ESERVFAIL");
    t.equal((await rejection(r4.resolve4("refused.test"))).code, "EREFUSED");
    t.equal(server.queries.length - before, 2);
    const r2 = new dnsp.Resolver({ timeout: 200, tries: 2 });
    r2.setServers([server.address]);
    before = server.queries.length;
    t.equal((await rejection(r2.resolve4("timeout.test"))).code, "ETIMEOUT");
    t.equal(server.queries.length - before, 2);
  });

  t.test("REFUSED -> EREFUSED", async (t) => {
    const err = await rejection(r.resolve4("refused.test"));
    t.equal(err.code, "EREFUSED");
    t.equal(err.code, dnsp.REFUSED);
  });

  t.test("TIMEOUT -> ETIMEOUT, query recorded, never answered", async (t) => {
    const quick = resolver(server, 200);
    const before = server.queries.length;
    const start = Date.now();
    const err = await rejection(quick.resolveMx("timeout.test"));
    t.equal(err.code, "ETIMEOUT");
    t.equal(err.code, dnsp.TIMEOUT);
    t.ok(Date.now() - start < 1500, `gave up in ${Date.now() - start} ms`);
    t.same(server.queries.slice(before), [{ name: "timeout.test", type: "MX" }]);
  });

  t.test("rcodeFor overrides one type while the others work", async (t) => {
    t.equal((await rejection(r.resolveMx("mxfail.test"))).code, "ESERVFAIL");
    t.same(await r.resolve4("mxfail.test"), ["192.0.2.4"]);
    const quick = resolver(server, 200);
    t.equal((await rejection(quick.resolveMx("mxslow.test"))).code, "ETIMEOUT");
    t.same(await quick.resolve4("mxslow.test"), ["192.0.2.5"]);
    // rcodeFor wins over rcode.
    t.equal((await rejection(r.resolve4("override.test"))).code, "EREFUSED");
    t.equal((await rejection(r.resolveMx("override.test"))).code, "ESERVFAIL");
  });

  t.test("a zone entry that cannot be encoded gives SERVFAIL, not a crash", async (t) => {
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on("warning", onWarning);
    t.teardown(() => void process.off("warning", onWarning));
    t.equal((await rejection(r.resolve4("badip.test"))).code, "ESERVFAIL");
    t.same(await r.resolve4("nomx.test"), ["192.0.2.3"]); // still serving
    await new Promise((res) => setImmediate(res)); // warnings are emitted on next tick
    t.match(warnings.join("\n"), /badip\.test A: bad IPv4 address/);
  });
});

t.test("the zone is live", async (t) => {
  const server = await startDnsServer({ "live.test": { A: ["192.0.2.1"] } });
  t.teardown(() => server.close());
  const r = resolver(server);
  t.same(await r.resolve4("live.test"), ["192.0.2.1"]);
  server.zone["live.test"]!.A = ["192.0.2.2"];
  t.same(await r.resolve4("live.test"), ["192.0.2.2"]); // TTL 0: no cache in the way
  t.equal((await rejection(r.resolveMx("live.test"))).code, "ENODATA");
  server.zone["live.test"]!.MX = [{ preference: 5, exchange: "live.test" }];
  t.same(await r.resolveMx("live.test"), [{ exchange: "live.test", priority: 5 }]);
  server.zone["live.test"]!.rcodeFor = { MX: "SERVFAIL" };
  t.equal((await rejection(r.resolveMx("live.test"))).code, "ESERVFAIL");
  delete server.zone["live.test"];
  t.equal((await rejection(r.resolve4("live.test"))).code, "ENOTFOUND");
  server.zone = { "other.test": { A: ["192.0.2.9"] } }; // replacing the whole zone works too
  t.same(await r.resolve4("other.test"), ["192.0.2.9"]);
  t.same(
    server.queries.map((q) => q.type),
    ["A", "A", "MX", "MX", "MX", "A", "A"],
  );
});

t.test("wire format, seen with a raw client", async (t) => {
  const server = await startDnsServer(zone());
  t.teardown(() => server.close());

  t.test("header: ID and RD copied, QR and AA set, TC and RA clear; question echoed", async (t) => {
    for (const flags of [0x0100, 0x0000]) {
      const q = buildQuery(0xbeef, "Example.TEST", TYPE.MX, flags);
      const reply = await udpExchange(server, [q]);
      t.ok(reply, "answered");
      const p = parse(reply!);
      t.equal(p.id, 0xbeef);
      t.equal(p.flags & 0x8000, 0x8000, "QR");
      t.equal(p.flags & 0x0400, 0x0400, "AA");
      t.equal(p.flags & 0x0200, 0, "TC clear");
      t.equal(p.flags & 0x0100, flags & 0x0100, "RD copied");
      t.equal(p.flags & 0x0080, 0, "RA clear");
      t.equal(p.rcode, 0);
      t.equal(p.qdcount, 1);
      t.same(p.question, q.subarray(12), "question echoed with its case");
      t.equal(p.answers.length, 2);
      t.equal(p.answers[0]!.name, "Example.TEST");
      t.equal(p.answers[0]!.type, TYPE.MX);
      t.equal(p.answers[0]!.ttl, 0);
      t.equal(p.answers[0]!.rdata.readUInt16BE(0), 20);
      t.same(readName(p.answers[0]!.rdata, 2), ["mx2.example.test", p.answers[0]!.rdata.length]);
      t.same(p.authority, []);
    }
  });

  t.test("null MX on the wire: preference 0, root name", async (t) => {
    const p = parse((await udpExchange(server, [buildQuery(1, "null.test", TYPE.MX)]))!);
    t.same(p.answers[0]!.rdata, Buffer.from([0, 0, 0]));
  });

  t.test("NODATA and NXDOMAIN carry an SOA in the authority section", async (t) => {
    const nodata = parse((await udpExchange(server, [buildQuery(2, "nomx.test", TYPE.MX)]))!);
    t.equal(nodata.rcode, 0);
    t.same(nodata.answers, []);
    t.equal(nodata.authority.length, 1);
    t.equal(nodata.authority[0]!.type, TYPE.SOA);
    t.equal(nodata.authority[0]!.name, "nomx.test");

    const nx = parse((await udpExchange(server, [buildQuery(3, "a.b.example.test", TYPE.A)]))!);
    t.equal(nx.rcode, 3);
    t.same(nx.answers, []);
    t.equal(nx.authority[0]!.type, TYPE.SOA);
    t.equal(nx.authority[0]!.name, "example.test", "the closest zone name above");
  });

  t.test("CNAME answer: the CNAME first, then the target's records", async (t) => {
    const p = parse((await udpExchange(server, [buildQuery(4, "alias.test", TYPE.A)]))!);
    t.same(
      p.answers.map((a) => [a.name, a.type]),
      [
        ["alias.test", TYPE.CNAME],
        ["mx1.example.test", TYPE.A],
        ["mx1.example.test", TYPE.A],
      ],
    );
    const c = parse((await udpExchange(server, [buildQuery(5, "alias.test", TYPE.CNAME)]))!);
    t.same(c.answers.map((a) => a.type), [TYPE.CNAME]);
  });

  t.test("other types on an existing name: NODATA; other classes: REFUSED", async (t) => {
    const ns = parse((await udpExchange(server, [buildQuery(6, "example.test", TYPE.NS)]))!);
    t.equal(ns.rcode, 0);
    t.same(ns.answers, []);
    t.same(server.queries.at(-1), { name: "example.test", type: "NS" });
    const chaos = parse((await udpExchange(server, [buildQuery(7, "example.test", TYPE.A, 0x0100, 3)]))!);
    t.equal(chaos.rcode, 5);
  });

  t.test("malformed packets are ignored and the server keeps serving", async (t) => {
    const before = server.queries.length;
    const good = buildQuery(9, "nomx.test", TYPE.A);
    const response = Buffer.from(good);
    response.writeUInt16BE(0x8100, 2); // QR set: a response, not a query
    const noQuestion = Buffer.from(good.subarray(0, 12));
    noQuestion.writeUInt16BE(0, 4);
    const badLabel = Buffer.concat([good.subarray(0, 12), Buffer.from([40, 0x61, 0x62])]); // label runs past the end
    const pointerLoop = Buffer.concat([good.subarray(0, 12), Buffer.from([0xc0, 12, 0, 1, 0, 1])]);
    const reservedLabel = Buffer.concat([good.subarray(0, 12), Buffer.from([0x80, 0, 0, 1, 0, 1])]);
    const bad = [
      Buffer.alloc(0),
      Buffer.from([1, 2, 3]),
      Buffer.from("hello, this is not DNS at all"),
      good.subarray(0, good.length - 2), // QTYPE/QCLASS cut short
      response,
      noQuestion,
      badLabel,
      pointerLoop,
      reservedLabel,
    ];
    t.equal(await udpExchange(server, bad, 200), undefined, "no reply to any of them");
    t.equal(server.queries.length, before, "none recorded");
    const p = parse((await udpExchange(server, [good]))!);
    t.same(p.answers.map((a) => [...a.rdata]), [[192, 0, 2, 3]]);
  });

  t.test("a compressed question name is understood", async (t) => {
    // QNAME = "x." + pointer to the name "nomx.test" placed... in the question itself.
    const q = buildQuery(10, "nomx.test", TYPE.A);
    const withPointer = Buffer.concat([q.subarray(0, 12), Buffer.from([0xc0, 18]), q.subarray(q.length - 4), q.subarray(12, q.length - 4)]);
    // Offsets: header 12, pointer 2, type/class 4 -> the name starts at 18.
    const p = parse((await udpExchange(server, [withPointer]))!);
    t.equal(p.rcode, 0);
    t.same(server.queries.at(-1), { name: "nomx.test", type: "A" });
    t.same(p.answers.map((a) => [...a.rdata]), [[192, 0, 2, 3]]);
  });

  t.test("TIMEOUT names get no reply at all", async (t) => {
    t.equal(await udpExchange(server, [buildQuery(11, "timeout.test", TYPE.A)], 200), undefined);
  });

  t.test("TCP on the same port: length-prefixed, several queries per connection", async (t) => {
    const a = buildQuery(21, "mx1.example.test", TYPE.A);
    const b = buildQuery(22, "example.test", TYPE.MX);
    const both = Buffer.concat([framed(a), framed(b)]);
    // Both queries in one write...
    const replies = await tcpExchange(server, both, 2);
    t.same(replies.map((m) => parse(m).id), [21, 22]);
    t.equal(parse(replies[0]!).answers.length, 2);
    t.equal(parse(replies[1]!).answers.length, 2);
    t.equal(parse(replies[0]!).flags & 0x0200, 0, "TC clear");
    // ...and one query one byte at a time.
    const pieces = await new Promise<Buffer[]>((resolve, reject) => {
      const got: Buffer[] = [];
      let buf = Buffer.alloc(0);
      const sock = net.connect(server.port, server.host);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error("TCP fragmented: no reply"));
      }, 2000);
      sock.on("error", reject);
      sock.on("connect", async () => {
        for (const byte of framed(a)) {
          sock.write(Buffer.from([byte]));
          await new Promise((res) => setImmediate(res));
        }
      });
      sock.on("data", (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          got.push(buf.subarray(2, 2 + buf.readUInt16BE(0)));
          clearTimeout(timer);
          sock.destroy();
          resolve(got);
        }
      });
    });
    t.equal(parse(pieces[0]!).id, 21);
  });
});

t.test("close() ends open TCP connections and stops answering", async (t) => {
  const server = await startDnsServer({ "x.test": { A: ["192.0.2.1"] } });
  const sock = net.connect(server.port, server.host);
  await new Promise<void>((resolve, reject) => {
    sock.once("connect", () => resolve());
    sock.once("error", reject);
  });
  const closed = new Promise<void>((resolve) => sock.once("close", () => resolve()));
  sock.on("error", () => undefined);
  await server.close();
  const timeout = new Promise<string>((resolve) => setTimeout(() => resolve("still open"), 1000).unref());
  t.equal(await Promise.race([closed.then(() => "closed"), timeout]), "closed");
  t.equal(await udpExchange(server, [buildQuery(1, "x.test", TYPE.A)], 200), undefined);
});
