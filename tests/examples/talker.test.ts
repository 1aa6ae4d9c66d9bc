// examples/talker.ts as a user meets it: bundled with esbuild, run, a telnet-like client
// queues a mail with .mail, and the talker reports the outcome the engine's events give it.

import t from "tap";
import os from "node:os";
import path from "node:path";
import fs from "node:fs/promises";
import { build } from "esbuild";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { freePort } from "../helpers/postfix.js";
import { spawnDaemon } from "../helpers/daemon.js";
import { RawClient } from "../helpers/smtp-raw.js";

t.test("a talker user's .mail is delivered and the outcome is told to that user", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-talker-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const bundle = path.join(dir, "talker.mjs");
  await build({ entryPoints: ["examples/talker.ts"], bundle: true, platform: "node", format: "esm", outfile: bundle, logLevel: "error" });
  const server = await startScriptedServer();
  t.teardown(() => server.close());
  const port = await freePort();
  const talker = spawnDaemon(process.execPath, [bundle, String(port)], dir, "talker",
    { ...process.env, MUDMAIL_RELAY: `127.0.0.1:${server.port}`, MUDMAIL_MAILDIR: path.join(dir, "maildir") });
  t.teardown(() => talker.kill("SIGKILL"));
  await talker.waitForOutput(/talker on/, 10_000);

  const client = await RawClient.connect(port);
  t.teardown(() => client.destroy());
  await client.waitForText(/Welcome/, 5_000, "the welcome");
  client.write(".name Alice\r\n.mail bob@test.example The dragon is back, come quick!\r\n");
  await client.waitForText(/queued as \d+\.\d+/, 5_000, "the queue id");
  await client.waitForText(/\[mail \d+\.\d+\] to bob@test\.example: sent/, 10_000, "the outcome");
  const screen = client.received;
  t.match(screen, /Mail to bob@test\.example queued as (\d+\.\d+)\./, "the user sees the queue id");
  t.match(screen, /to bob@test\.example: sent \(250 /, "and then that it was sent");
  t.equal(server.messages.length, 1, "the server got one message");
  t.same(server.messages[0].to, ["bob@test.example"]);
  t.match(server.messages[0].data.toString(), /Subject: A message from Alice\r\n[\s\S]*\r\n\r\nThe dragon is back, come quick!\r\n$/);
});
