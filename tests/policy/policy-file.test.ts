// The policy file (policy.ts): what it accepts, the key it names when it refuses, how limits
// are resolved (default, provider by MX names, domain), pacing and throttle arithmetic; and
// --policy on the command line (a bad file exits 2 naming the key).

import t from "tap";
import fs from "node:fs/promises";
import path from "node:path";
import { PolicyError, Shaper, checkPolicy, rateInterval } from "../../policy.js";
import { MailEngine, UsageError, type Policy } from "../../mail.js";
import { runCli, tempMaildir } from "../helpers/spool-files.js";

t.test("the issue's example is a valid policy", async (t) => {
  const policy: Policy = {
    default: { connections: 20, messagesPerConnection: 100, rate: null },
    domains: { "example.com": { connections: 2, messagesPerConnection: 10, rate: "5/s" } },
    providers: { google: { mx: [".google.com", ".googlemail.com"], connections: 5, messagesPerConnection: 50 } },
    replies: [{ match: "\\[TS04\\]", action: "suspend", seconds: 7200 }, { match: "^421|4\\.7\\.(0|28)", action: "throttle" }],
  };
  t.same(checkPolicy(policy), policy);
  t.doesNotThrow(() => new MailEngine({ maildir: "/nonexistent/never", policy }), "the engine takes it as the policy option");
});

t.test("a bad policy names the key at fault", async (t) => {
  const cases: Array<[unknown, string]> = [
    [[], "(top)"],
    [{ defaults: {} }, "defaults"],
    [{ default: { connections: 0 } }, "default.connections"],
    [{ default: { connections: 2.5 } }, "default.connections"],
    [{ default: { messagesPerConnection: -1 } }, "default.messagesPerConnection"],
    [{ default: { rate: "5/x" } }, "default.rate"],
    [{ default: { rate: "0/s" } }, "default.rate"],
    [{ default: { speed: 1 } }, "default.speed"],
    [{ domains: { "example.com": { rate: 5 } } }, 'domains["example.com"].rate'],
    [{ domains: { "not a domain": {} } }, 'domains["not a domain"]'],
    [{ providers: { acme: { connections: 3 } } }, "providers.acme.mx"],
    [{ providers: { acme: { mx: [] } } }, "providers.acme.mx"],
    [{ providers: { acme: { mx: ["bad name!"] } } }, "providers.acme.mx[0]"],
    [{ replies: [{ match: "(", action: "throttle" }] }, "replies[0].match"],
    [{ replies: [{ match: "x", action: "throttle" }, { match: "y", action: "pause" }] }, "replies[1].action"],
    [{ replies: [{ match: "x", action: "suspend" }] }, "replies[0].seconds"],
    [{ replies: [{ match: "x", action: "throttle", seconds: 5 }] }, "replies[0].seconds"],
  ];
  for (const [input, key] of cases) {
    const err = (() => {
      try {
        checkPolicy(input);
        return null;
      } catch (e) {
        return e as PolicyError;
      }
    })();
    t.ok(err instanceof PolicyError, `${JSON.stringify(input)} is refused`);
    t.equal(err?.key, key, `it names ${key}: ${err?.message}`);
    t.throws(() => new MailEngine({ maildir: "/nonexistent/never", policy: input as never }), UsageError, "the engine refuses it as a usage error");
  }
});

t.test("limits: built-in default, the file's default, the provider by MX names, the domain", async (t) => {
  const shaper = new Shaper({
    default: { rate: "100/min" },
    domains: { "gmail.com": { rate: "1/s" }, "small.test": { connections: 1 } },
    providers: { yahoo: { messagesPerConnection: 10 }, acme: { mx: ["mx.acme.test"], connections: 3 } },
  }, { connections: 20 });
  const plain = shaper.groupFor("plain.test", ["mx.plain.test"]);
  t.match(plain, { key: "plain.test", provider: null, limits: { connections: 20, messagesPerConnection: null, rate: "100/min", interval: 600 } });
  const workspace = shaper.groupFor("company.test", ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]);
  t.match(workspace, { key: "google", provider: "google", limits: { connections: 5, messagesPerConnection: 50 } }, "a domain hosted by Google is in Google's group");
  t.equal(shaper.groupFor("other.test", ["ALT2.ASPMX.L.GOOGLE.COM."]), workspace, "every domain hosted by Google shares it");
  t.match(shaper.groupFor("gmail.com", ["gmail-smtp-in.l.google.com"]), { key: "gmail.com", provider: "google", limits: { connections: 5, messagesPerConnection: 50, interval: 1000 } },
    "a domain of the file's has its own group, with its provider's limits under its own");
  t.match(shaper.groupFor("aol.com", ["mx-aol.mail.gm0.yahoodns.net"]), { key: "yahoo", limits: { messagesPerConnection: 10, connections: 20 } }, "a file's provider overrides a built-in one key by key");
  t.match(shaper.groupFor("hotmail.com", ["hotmail-com.olc.protection.outlook.com"]), { key: "microsoft", limits: { connections: 5, messagesPerConnection: 50 } });
  t.match(shaper.groupFor("x.acme.test", ["mx.acme.test"]), { key: "acme", limits: { connections: 3 } }, "a name without a leading dot matches itself");
  t.match(shaper.groupFor("y.acme.test", ["a.mx.acme.test"]), { key: "acme" }, "... and the names below it");
  t.match(shaper.groupFor("small.test", []), { key: "small.test", limits: { connections: 1 } });
  t.same(shaper.providerNames.sort(), ["acme", "google", "microsoft", "yahoo"]);
});

t.test("rates, pacing and throttle arithmetic", async (t) => {
  t.equal(rateInterval("5/s", "rate"), 200);
  t.equal(rateInterval("30/min", "rate"), 2000);
  t.equal(rateInterval("2/h", "rate"), 1_800_000);
  t.equal(rateInterval(" 0.5 / s ", "rate"), 2000);
  const shaper = new Shaper({ default: { rate: "10/s", connections: 4 } }, { connections: 20 });
  const g = shaper.groupFor("d.test", []);
  shaper.started(g, 1000);
  t.equal(g.nextStart, 1100, "the next start is one interval on");
  shaper.started(g, 1100);
  shaper.started(g, 1100);
  t.equal(g.nextStart, 1300, "starts queue up evenly, never in a burst");
  shaper.started(g, 5000);
  t.equal(g.nextStart, 5100, "after a quiet spell, one interval from now, not a burst to catch up");
  t.equal(shaper.throttle(g, 3), 2, "throttle: one below what was open");
  t.equal(shaper.throttle(g, 1), 1, "never below 1");
  shaper.delivered(g);
  t.equal(shaper.connections(g), 2, "climbs back one after as many deliveries as the limit is");
  shaper.delivered(g);
  t.equal(shaper.connections(g), 2);
  shaper.delivered(g);
  t.equal(shaper.connections(g), 3);
  for (let i = 0; i < 3; i++) shaper.delivered(g);
  t.equal(g.cap, null, "back at the policy's limit");
  t.equal(shaper.connections(g), 4);
  t.match(shaper.ruleFor("421 4.7.0 [TS04] Messages from 192.0.2.1 temporarily deferred"), { action: "suspend", seconds: 7200 }, "Yahoo's [TS04] is built in");
  t.match(shaper.ruleFor("421 4.7.28 [192.0.2.1] Our system has detected an unusual rate"), { action: "throttle" }, "Gmail's 4.7.28 is built in");
  t.equal(shaper.ruleFor("450 4.2.0 mailbox busy"), null);
});

t.test("--policy FILE: a bad file exits 2 naming the key; a good one is taken", async (t) => {
  const maildir = await tempMaildir();
  const dir = path.dirname(maildir);
  const bad = path.join(dir, "bad.json");
  await fs.writeFile(bad, JSON.stringify({ domains: { "example.com": { rate: "fast" } } }));
  const r = await runCli(["--flush", "--maildir", maildir, "--relay", "127.0.0.1:9", "--policy", bad]);
  t.equal(r.code, 2);
  t.match(r.stderr, /^mudmail: --policy .*bad\.json: domains\["example\.com"\]\.rate: expected N\/s, N\/min or N\/h/);
  t.equal(r.stderr.trim().split("\n").length, 1, "one line");
  const notJson = path.join(dir, "not.json");
  await fs.writeFile(notJson, "{ default: ");
  const r2 = await runCli(["--flush", "--maildir", maildir, "--relay", "127.0.0.1:9", "--policy", notJson]);
  t.equal(r2.code, 2);
  t.match(r2.stderr, /--policy .*not\.json: not JSON/);
  const missing = await runCli(["--flush", "--maildir", maildir, "--policy", path.join(dir, "none.json")]);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /--policy .*none\.json: cannot read/);
  const good = path.join(dir, "good.json");
  await fs.writeFile(good, JSON.stringify({ default: { rate: "5/s" } }));
  const ok = await runCli(["--flush", "--maildir", maildir, "--relay", "127.0.0.1:9", "--policy", good]);
  t.equal(ok.code, 0, ok.stderr);
});
