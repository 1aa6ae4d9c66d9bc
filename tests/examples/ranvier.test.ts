// examples/ranvier/ as a game's operator and players meet it: the example's own `npm ci`
// (RanvierMUD 3.0.6 and its telnet and file data source from the registry, mudmail by path),
// the game on a loopback port with a data directory of its own, relaying to mudmail's own
// receiver (startServer), where the mail lands. A player logs in over telnet (a plain TCP
// client), verifies an address with the code the mail brought, mails, and hears what became
// of each mail; a SIGKILL while the game is flushing and a restart lose nothing.

import t, { type Test } from "tap";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { startServer, type StoredMessage } from "../../receiver.js";
import { run, spawnDaemon, sleep, type Daemon } from "../helpers/daemon.js";
import { RawClient } from "../helpers/smtp-raw.js";
import { listFolder } from "../helpers/spool-files.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const EXAMPLE = path.join(ROOT, "examples", "ranvier");
const PASSWORD = "correct horse";
/** The burst of mail in flight when the game is killed (with the 4 mails before it: the player's limit of 10). */
const BURST = 6;

/** Starts the game on a free loopback port; resolves once its telnet server and mail engine are up. */
async function startGame(dir: string, data: string, name: string, relayPort: number): Promise<{ game: Daemon; port: number }> {
  const game = spawnDaemon(process.execPath, [path.join(EXAMPLE, "main.js"), "--port", "0", "--data", data], dir, name,
    { ...process.env, MUDMAIL_RELAY: `127.0.0.1:${relayPort}` });
  await game.waitForOutput(/telnet: listening on 127\.0\.0\.1:\d+/, 15_000);
  await game.waitForOutput(/mail: engine started/, 15_000);
  const port = Number(/telnet: listening on 127\.0\.0\.1:(\d+)/.exec(game.output())![1]);
  return { game, port };
}

/** Logs Alice in (making her account the first time); resolves at her first prompt. */
async function login(t: Test, port: number, first: boolean): Promise<RawClient> {
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  await c.waitForText(/What is your name\? $/, 5_000, "the name prompt");
  c.write("alice\r\n");
  if (first) {
    await c.waitForText(/Choose a password.*: /, 5_000, "the new password prompt");
    c.write(`${PASSWORD}\r\n`);
    await c.waitForText(/The same again, to be sure: /, 5_000, "the second password prompt");
  } else {
    await c.waitForText(/Password: /, 5_000, "the password prompt");
  }
  c.write(`${PASSWORD}\r\n`);
  await c.waitForText(/Welcome, Alice\.[\s\S]*> /, 5_000, "the welcome and the prompt");
  return c;
}

/** What the player sees: without the colour resets Ranvier's Broadcast puts around its lines. */
const screen = (text: string) => text.replace(/\x1b\[[0-9;]*m/g, "");

/** Sends one command line and waits until what comes back after it matches re; resolves with that screen. */
async function command(c: RawClient, line: string, re: RegExp, what: string, ms = 10_000): Promise<string> {
  const from = c.received.length;
  c.write(`${line}\r\n`);
  const deadline = Date.now() + ms;
  for (;;) {
    const answer = screen(c.received.slice(from));
    if (re.test(answer)) return answer;
    if (Date.now() > deadline) throw new Error(`'${line}': no ${what} within ${ms} ms; the game said: ${JSON.stringify(answer)}`);
    await sleep(20);
  }
}

/** Polls until ready() is true, at most ms. */
async function until(ready: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await ready())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(25);
  }
}

t.test("a RanvierMUD game with mudmail inside: verify, mail, outcomes in game, SIGKILL mid-flush and restart", async (t) => {
  if (!existsSync(path.join(ROOT, "dist", "index.js"))) {
    t.fail("dist/index.js is missing: the example imports mudmail's built entry (node build.mjs; npm test's pretest does it)");
    return;
  }
  // The example's own install, as its README says: npm ci in examples/ranvier. --ignore-scripts:
  // mudmail is linked by path (file:../..) and must not be rebuilt under the running suite.
  const npm = await run("npm", ["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"], { cwd: EXAMPLE, timeoutMs: 90_000 });
  t.equal(npm.code, 0, `npm ci in examples/ranvier${npm.code === 0 ? "" : `: ${npm.stderr.slice(-2000)}`}`);
  if (npm.code !== 0) return;

  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-ranvier-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const data = path.join(dir, "game-data");
  const spool = path.join(data, "mail", "spool");

  // Where the mail lands: mudmail's receiver. dave@'s mailbox is a directory: 451, so his mail waits.
  const inbox = path.join(dir, "receiver");
  for (const user of ["alice", "bob", "carol"]) await fs.mkdir(path.join(inbox, "users", `${user}@test.example`), { recursive: true });
  await fs.mkdir(path.join(inbox, "users", "dave@test.example", "mail"), { recursive: true });
  const receiver = await startServer({ maildir: inbox, listen: "127.0.0.1:0", hostname: "mx.test.example", log: () => undefined });
  t.teardown(() => receiver.close());
  const mbox = (user: string) => fs.readFile(path.join(inbox, "users", `${user}@test.example`, "mail"), "utf8").catch(() => "");

  // --- The first run: a new player verifies her address and mails a friend ------------------
  let { game, port } = await startGame(dir, data, "game1", receiver.address.port);
  t.teardown(() => game.kill("SIGKILL"));
  let alice = await login(t, port, true);
  t.match(await command(alice, "mail bob@test.example hello", /Verify your own address first/, "the refusal"),
    /setemail ADDRESS/, "an unverified player cannot mail");
  const asked = await command(alice, "setemail alice@test.example", /Your verification mail to alice@test\.example was delivered/, "the delivery notice");
  t.match(asked, /A code is on its way to alice@test\.example \(mail \d+\.\d+\)/, "setemail queues the code");
  const code = /Your code: (\d{6})/.exec(await mbox("alice"))?.[1];
  t.ok(code, "the code is in the mail the receiver stored for alice@test.example");
  t.match(await command(alice, "verify 000000x", /not the code/, "the refusal"), /4 tries left/, "a wrong code is refused");
  t.match(await command(alice, `verify ${code}`, /verified/, "the confirmation"), /Your mail address alice@test\.example is verified/);
  const mailed = await command(alice, "mail bob@test.example The dragon is back, come quick!", /to bob@test\.example was delivered/, "the delivery notice");
  t.match(mailed, /Mail to bob@test\.example queued as \d+\.\d+\.[\s\S]*\[mail \d+\.\d+\] Your mail to bob@test\.example was delivered \(250 /,
    "the player sees the queue id, then that the mail was delivered");
  const bobs = await mbox("bob");
  t.match(bobs, /^Subject: A message from Alice in the mudmail example MUD$/m, "bob got it");
  t.match(bobs, /^Reply-To: alice@test\.example$/m, "a reply goes to the player's verified address");
  t.match(bobs, /\n\nThe dragon is back, come quick!\n/, "with the player's words");
  alice.write("quit\r\n");
  await game.waitForOutput(/login: Alice left/, 5_000);

  // The operator makes Alice an admin (Ranvier's role, in her player file) while she is away.
  const playerFile = path.join(data, "player", "Alice.json");
  const saved = JSON.parse(await fs.readFile(playerFile, "utf8"));
  t.equal(saved.metadata.mail.address, "alice@test.example", "the verified address is saved with the player");
  await fs.writeFile(playerFile, JSON.stringify({ ...saved, role: 2 }, null, 2));

  // --- A delay, a bounce, the queue, then a burst of mail and a SIGKILL mid-flush -------------
  alice = await login(t, port, false);
  t.match(await command(alice, "mail dave@test.example Are you there?", /is delayed/, "the delay notice"),
    /\[mail (\d+\.\d+)\] Your mail to dave@test\.example is delayed: .*451 /, "a 451 reaches the player as a delay");
  t.match(await command(alice, "mail nobody@test.example Hello?", /could not be delivered/, "the bounce notice"),
    /\[mail \d+\.\d+\] Your mail to nobody@test\.example could not be delivered: .*550 /, "a 550 reaches the player as a bounce");
  const listing = await command(alice, "mailq", /Game loop delay while mail was in flight: .*\r\n/, "the listing");
  t.match(listing, /Mail queue: \d+ message\(s\)\.\r\n[\s\S]* +\d+\.\d+ +deferred +to dave@test\.example +\(mail of Alice\)/, "mailq lists the deferred mail and whose it is");
  t.match(listing, /last error: .*451 /, "with its last error");
  t.comment(`game loop delay while mail was in flight, first run (4 mails): ${/Game loop delay while mail was in flight: (.*)\r\n/.exec(listing)?.[1]}`);

  // When the receiver has stored carol's first message, it stalls for a second (this test's
  // loop is held, so it reads nothing and answers nothing) while the game goes on queueing the
  // burst, then the game dies: mail it queued is in its spool, in outgoing/ or in the middle of
  // a session (outgoing_active/).
  let killed: Promise<void> | null = null;
  const onMessage = (m: StoredMessage) => {
    if (killed || !m.to.includes("carol@test.example")) return;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1_000);
    killed = game.kill("SIGKILL"); // the signal goes now; the promise is the exit
  };
  receiver.on("message", onMessage);
  const before = alice.received.length;
  alice.write(Array.from({ length: BURST }, (_, i) => `mail carol@test.example burst ${i + 1}\r\n`).join(""));
  await until(() => killed !== null, 15_000, "the game killed at carol's first message");
  await killed;
  receiver.off("message", onMessage);
  const burstScreen = screen(alice.received.slice(before));
  const queued = [...burstScreen.matchAll(/Mail to carol@test\.example queued as (\d+\.\d+)\./g)].map((m) => m[1]);
  t.equal(queued.length, BURST, "the player saw the whole burst queued before the game died");
  const left = (await Promise.all(["outgoing", "outgoing_active"].map((f) => listFolder(spool, f)))).flat();
  t.ok(left.length > 0, `killed mid-flush: ${left.length} of the ${BURST} mails still in the spool (${left.join(", ")})`);

  // --- The restart: the spool is sent, the notices wait for Alice ----------------------------
  ({ game, port } = await startGame(dir, data, "game2", receiver.address.port));
  const burstsIn = async () => [...(await mbox("carol")).matchAll(/^burst (\d+)$/gm)].map((m) => Number(m[1]));
  await until(async () => new Set(await burstsIn()).size >= queued.length, 15_000, "every queued burst mail at carol's");
  const got = await burstsIn();
  for (let n = 1; n <= queued.length; n++) t.ok(got.includes(n), `burst ${n} delivered`);
  // A message whose final dot went out and whose 250 the dead game never read is sent again:
  // at most one per connection slot (5).
  t.ok(got.length - queued.length <= 5, `carol's mailbox: ${got.length} burst messages for ${queued.length} mails, at most one again per slot`);
  await until(async () => (await listFolder(spool, "outgoing")).length + (await listFolder(spool, "outgoing_active")).length === 0, 15_000, "the spool flushed");

  alice = await login(t, port, false);
  const away = screen(alice.received);
  t.match(away, /While you were away, \d+ mail notice\(s\):/, "the notices kept while Alice was away come at login");
  const screens = burstScreen + away;
  for (const id of queued) {
    t.match(screens, new RegExp(`\\[mail ${id.replace(".", "\\.")}\\] Your mail to carol@test\\.example was delivered`), `mail ${id}: the player heard it was delivered`);
  }
  const after = await command(alice, "mailq", /Game loop delay while mail was in flight: .*\r\n/, "the listing");
  t.match(after, /Mail queue: 1 message\(s\)\.\r\n +\d+\.\d+ +deferred +to dave@test\.example/, "after the restart only dave's mail waits");
  const loop = /Game loop delay while mail was in flight: (p50 .* ms, p99 .* ms, max .* ms \(\d+ samples\))\r\n/.exec(after);
  t.ok(loop, "mailq shows the game loop's delay while mail was in flight");
  t.comment(`game loop delay while mail was in flight, restarted game (the ${left.length} mails the SIGKILL left): ${loop?.[1]}`);
  // The limit, 10 mails an hour: the 4 before the burst and the burst's 6, counted by the first run.
  t.match(await command(alice, "mail bob@test.example one too many", /lately/, "the refusal"), /You have sent 10 mails lately/,
    "the per-player limit holds across the restart");

  // --- A graceful stop: the engine is stopped and the game exits 0 ---------------------------
  await game.kill("SIGTERM", 15_000);
  t.same(await game.done, { code: 0, signal: null }, "SIGTERM: the game exits 0");
  t.match(game.output(), /mail: engine stopped/, "after stopping the mail engine");
  t.equal((await listFolder(spool, "deferred")).length, 1, "dave's mail waits in deferred/");
  t.same(await listFolder(spool, "outgoing_active"), [], "nothing is left active");
});
