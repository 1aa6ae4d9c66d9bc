/*
 * examples/talker.ts - a tiny talker that embeds the mudmail engine.
 *
 * It shows the shape of the original C design: the host program owns the event loop and the
 * one-minute heartbeat, and the heartbeat calls the mail engine (mail.tick() is check_smtp()).
 * Users connect with telnet, chat, and queue mail with `.mail`; the engine tells the talker
 * what became of each message ("sent", "deferred", "bounced") and the talker tells the user.
 *
 * Run it (esbuild, a devDependency, bundles it with the engine into one file):
 *   npx esbuild examples/talker.ts --bundle --platform=node --format=esm --outfile=dist/talker.js
 *   MUDMAIL_RELAY=127.0.0.1:2525 node dist/talker.js 4000
 * then `telnet 127.0.0.1 4000`. Something to relay to, for a try on loopback:
 *   smtp-sink -u nobody 127.0.0.1:2525 64 &
 * `npm test` type-checks this file and runs it (tests/talker.test.ts).
 *
 * Environment: MUDMAIL_RELAY (HOST[:PORT]; unset means MX lookup), MUDMAIL_MAILDIR ("./maildir").
 */

import * as net from "node:net";
// The package entry, as a host imports it ("mudmail"): dist/index.js, built by `npm run build`.
import { MailEngine, type Outcome } from "../dist/index.js";

const port = Number(process.argv[2] ?? 4000);

// The mail engine lives in our process. It only writes to the spool and talks SMTP when we
// call it; nothing it does blocks the talker for long.
const mail = new MailEngine({
  relay: process.env.MUDMAIL_RELAY || null,
  maildir: process.env.MUDMAIL_MAILDIR || "./maildir",
});

/** One telnet connection. */
interface User {
  socket: net.Socket;
  name: string;
  pending: string; // bytes received but not yet a whole line
}

const users = new Set<User>();
/** Who queued which mail: the engine's events carry the queue id, we find the user by it. */
const owners = new Map<string, User>();

function tell(user: User, text: string): void {
  if (user.socket.writable) user.socket.write(text.replace(/\n/g, "\r\n") + "\r\n");
}

function prompt(user: User): void {
  if (user.socket.writable) user.socket.write(`${user.name}> `);
}

function shout(text: string, except?: User): void {
  for (const u of users) if (u !== except) tell(u, text);
}

// Mail outcomes come back as events: announce them to whoever queued the message.
for (const status of ["sent", "deferred", "bounced"] as const) {
  mail.on(status, (o: Outcome) => {
    const user = owners.get(o.queueId);
    if (!user) return; // queued by someone who left, or by another program
    tell(user, `\n[mail ${o.queueId}] to ${o.recipient}: ${status} (${o.text})`);
    prompt(user);
    if (status !== "deferred") owners.delete(o.queueId); // deferred: it will be tried again
  });
}
mail.on("error", (err: Error) => console.error(`mail: ${err.message}`));

/** One line typed by a user. */
async function command(user: User, line: string): Promise<void> {
  const [word, ...rest] = line.split(" ");
  const args = rest.join(" ").trim();
  switch (word) {
    case ".name":
      if (!/^[A-Za-z][A-Za-z0-9_]{1,15}$/.test(args)) return tell(user, "Usage: .name NAME (letters and digits, 2-16)");
      shout(`${user.name} is now known as ${args}.`, user);
      user.name = args;
      return tell(user, `You are now ${args}.`);
    case ".mail": {
      const [to, ...words] = args.split(" ");
      if (!to || words.length === 0) return tell(user, "Usage: .mail ADDRESS TEXT");
      try {
        // Writes the queue file (tmp/ -> outgoing/) and, since the engine is running, starts sending.
        const id = await mail.send({ from: "talker@localhost", to, subject: `A message from ${user.name}`, text: words.join(" ") });
        owners.set(id, user);
        return tell(user, `Mail to ${to} queued as ${id}.`);
      } catch (err) {
        return tell(user, `Cannot send that: ${(err as Error).message}`);
      }
    }
    case ".who":
      return tell(user, `On the talker: ${[...users].map((u) => u.name).join(", ")}`);
    case ".quit":
      tell(user, "Bye!");
      user.socket.end();
      return;
    case ".help":
      return tell(user, "Commands: .name NAME, .mail ADDRESS TEXT, .who, .quit; anything else is said aloud.");
    default:
      if (word.startsWith(".")) return tell(user, `Unknown command ${word}; try .help`);
      shout(`${user.name} says: ${line}`);
  }
}

const server = net.createServer((socket) => {
  const user: User = { socket, name: `guest${Math.floor(Math.random() * 1000)}`, pending: "" };
  users.add(user);
  socket.setEncoding("utf8");
  tell(user, `Welcome to the mudmail talker! You are ${user.name}. Type .help for commands.`);
  prompt(user);

  // Commands are handled one at a time, in order, however the lines arrive.
  let queue = Promise.resolve();
  socket.on("data", (chunk: string) => {
    user.pending += chunk;
    let nl: number;
    while ((nl = user.pending.indexOf("\n")) >= 0) {
      // Drop the CR and anything telnet negotiates (control bytes, IAC sequences).
      const line = user.pending.slice(0, nl).replace(/[\x00-\x1f\x7f\ufffd]/g, "").trim();
      user.pending = user.pending.slice(nl + 1);
      queue = queue.then(() => (line ? command(user, line) : undefined)).then(() => prompt(user));
    }
    if (user.pending.length > 4096) user.pending = ""; // no endless lines
  });
  socket.on("error", () => undefined); // a dropped telnet is not our problem
  socket.on("close", () => {
    users.delete(user);
    for (const [id, owner] of owners) if (owner === user) owners.delete(id);
    shout(`${user.name} has left.`);
  });
});

server.listen(port, "127.0.0.1", () => console.log(`talker on 127.0.0.1:${port}; telnet in and type .help`));

// The talker's own heartbeat, once a minute, as in the C talker: it drives the mail engine.
// The first tick at boot sends what an earlier run left in the spool and lets send() start
// delivery at once; later ticks retry what is waiting.
mail.tick();
const heartbeat = setInterval(() => mail.tick(), 60_000);

process.on("SIGINT", () => {
  clearInterval(heartbeat);
  server.close();
  for (const u of users) u.socket.end("The talker is shutting down.\r\n");
  // Graceful: messages in flight go back to outgoing/ for next time.
  mail.stop().then(() => process.exit(0));
});
