// examples/talker.ts as a user meets it: bundled with esbuild, run, a telnet-like client
// queues a mail with .mail, and the talker reports the outcome the engine's events give it.

import t from "tap";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import fs from "node:fs/promises";
import { spawn } from "node:child_process";
import { build } from "esbuild";
import { startScriptedServer } from "./helpers/scripted-server.js";
import { freePort } from "./helpers/postfix.js";

t.test("a talker user's .mail is delivered and the outcome is told to that user", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-talker-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const bundle = path.join(dir, "talker.mjs");
  await build({ entryPoints: ["examples/talker.ts"], bundle: true, platform: "node", format: "esm", outfile: bundle, logLevel: "error" });
  const server = await startScriptedServer();
  t.teardown(() => server.close());
  const port = await freePort();
  const talker = spawn(process.execPath, [bundle, String(port)], {
    env: { ...process.env, MUDMAIL_RELAY: `127.0.0.1:${server.port}`, MUDMAIL_MAILDIR: path.join(dir, "maildir") },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.teardown(() => { talker.kill("SIGKILL"); });
  let stdout = "";
  talker.stdout.on("data", (d) => (stdout += d));
  talker.stderr.on("data", (d) => (stdout += d));
  const until = async (what: () => boolean, ms: number, label: string) => {
    const deadline = Date.now() + ms;
    while (!what() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    if (!what()) throw new Error(`timed out waiting for ${label}; talker said: ${stdout}`);
  };
  await until(() => stdout.includes("talker on"), 10_000, "the talker to listen");

  const client = net.connect(port, "127.0.0.1");
  t.teardown(() => client.destroy());
  let screen = "";
  client.setEncoding("utf8");
  client.on("data", (d) => (screen += d));
  await until(() => screen.includes("Welcome"), 5_000, "the welcome");
  client.write(".name Alice\r\n.mail bob@test.example The dragon is back, come quick!\r\n");
  await until(() => /queued as \d+\.\d+/.test(screen), 5_000, "the queue id");
  await until(() => /\[mail \d+\.\d+\] to bob@test\.example: sent/.test(screen), 10_000, "the outcome");
  t.match(screen, /Mail to bob@test\.example queued as (\d+\.\d+)\./, "the user sees the queue id");
  t.match(screen, /to bob@test\.example: sent \(250 /, "and then that it was sent");
  t.equal(server.messages.length, 1, "the server got one message");
  t.same(server.messages[0].to, ["bob@test.example"]);
  t.match(server.messages[0].data.toString(), /Subject: A message from Alice\r\n[\s\S]*\r\n\r\nThe dragon is back, come quick!\r\n$/);
});
