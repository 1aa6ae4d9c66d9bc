// Relays and MX lookup controls with Postfix's meaning: --fallback-relay, inet_interfaces (an
// MX that is this machine: mail loops), --best-mx-relay, --ignore-mx-lookup-error.

import t from "tap";
import { MailEngine } from "../../mail.js";
import { world, line } from "../helpers/mx-world.js";

const MX2 = {
  "dest.test": { MX: [{ preference: 10, exchange: "mx1.dest.test" }, { preference: 20, exchange: "mx2.dest.test" }] },
  "mx1.dest.test": { A: ["127.0.0.2"] },
  "mx2.dest.test": { A: ["127.0.0.3"] },
  "relay.test": { A: ["127.0.0.9"] },
};

t.test("--fallback-relay takes mail when every MX is down, and for a domain that does not exist", async (t) => {
  const w = await world(t, MX2, { "127.0.0.9": {} }, { fallbackRelay: "relay.test" });
  // fallbackRelay has no port: the world's port is where the scripted relay listens.
  await w.engine.stop();
  const engine = new MailEngine({ maildir: w.maildir, resolver: w.dns.address, port: w.port, fallbackRelay: `relay.test:${w.port}`, log: (l) => w.lines.push(l), fsync: false, connectTimeout: 1, dnsTimeout: 1 });
  t.teardown(() => engine.stop());
  const down = await w.drop(["bob@dest.test"]);
  const missing = await w.drop(["carol@nowhere.test"]);
  t.match(await engine.flush(), { sent: 2, deferred: 0, bounced: 0 });
  t.equal(w.servers.get("127.0.0.9")!.messages.length, 2, "the fallback relay took both");
  t.match(line(w, down, "bob@dest.test"), /relay=relay\.test\[127\.0\.0\.9\]:\d+, .*status=sent/);
  t.match(line(w, missing, "carol@nowhere.test"), /relay=relay\.test\[127\.0\.0\.9\]:\d+, .*status=sent/);
  t.match(w.lines.join("\n"), /dest\.test: delivering through the fallback relay relay\.test\[127\.0\.0\.9\]/, "which relay took it is logged");
});

t.test("inet_interfaces: an MX that is this machine cuts the list; as the best MX the mail loops back and bounces", async (t) => {
  const zone = {
    ...MX2,
    "half.test": { MX: [{ preference: 10, exchange: "mx1.dest.test" }, { preference: 20, exchange: "me.test" }, { preference: 30, exchange: "mx2.dest.test" }] },
    "loop.test": { MX: [{ preference: 5, exchange: "me.test" }, { preference: 10, exchange: "mx1.dest.test" }] },
    "me.test": { A: ["127.0.0.8"] },
    "talker.test": { A: ["127.0.0.4"] },
  };
  const w = await world(t, zone, { "127.0.0.2": { rcpt: () => "451 4.3.0 try later" }, "127.0.0.3": {}, "127.0.0.4": {} },
    { inetInterfaces: ["127.0.0.8"] });
  const half = await w.drop(["a@half.test"]);
  const loop = await w.drop(["b@loop.test"]);
  await w.flush();
  t.match(line(w, half, "a@half.test"), /relay=mx1\.dest\.test\[127\.0\.0\.2\].*status=deferred/, "mx1 is tried");
  t.equal(w.servers.get("127.0.0.3")!.connections, 0, "mx2, worse than this machine, is never tried");
  t.match(line(w, loop, "b@loop.test"), /relay=none, .*dsn=5\.4\.6, status=bounced \(mail for loop\.test loops back to myself\)/);
});

t.test("--best-mx-relay takes mail for which this machine is the best MX", async (t) => {
  const zone = { ...MX2, "loop.test": { MX: [{ preference: 5, exchange: "me.test" }] }, "me.test": { A: ["127.0.0.8"] } };
  const w = await world(t, zone, { "127.0.0.9": {} }, { inetInterfaces: ["127.0.0.8"] });
  await w.engine.stop();
  const engine = new MailEngine({ maildir: w.maildir, resolver: w.dns.address, port: w.port, inetInterfaces: ["127.0.0.8"], bestMxRelay: `127.0.0.9:${w.port}`, log: (l) => w.lines.push(l), fsync: false, dnsTimeout: 1 });
  t.teardown(() => engine.stop());
  const id = await w.drop(["b@loop.test"]);
  t.match(await engine.flush(), { sent: 1 });
  t.match(line(w, id, "b@loop.test"), /relay=127\.0\.0\.9\[127\.0\.0\.9\]:\d+, .*status=sent/);
});

t.test("SERVFAIL on MX defers; with --ignore-mx-lookup-error the A record is used", async (t) => {
  const zone = { "flaky.test": { A: ["127.0.0.2"], rcodeFor: { MX: "SERVFAIL" as const } } };
  const plain = await world(t, zone, { "127.0.0.2": {} });
  const a = await plain.drop(["x@flaky.test"]);
  t.match(await plain.flush(), { deferred: 1, sent: 0 });
  t.match(line(plain, a, "x@flaky.test"), /dsn=4\.4\.3, status=deferred/);
  const ignoring = await world(t, zone, { "127.0.0.2": {} }, { ignoreMxLookupError: true });
  const b = await ignoring.drop(["x@flaky.test"]);
  t.match(await ignoring.flush(), { sent: 1 });
  t.match(line(ignoring, b, "x@flaky.test"), /relay=flaky\.test\[127\.0\.0\.2\]/);
});
