// Crash safety under load: 50 kill -9 at random moments (seeded) while
// `node dist/mail.js --flush --force` sends 1,000 messages through a slow scripted server
// (2-5 ms before each reply to the message data), a restart after each kill, then a last
// flush. Every message must arrive, none be lost, nothing be left in outgoing/,
// outgoing_active/ or deferred/. A message may arrive twice only when its process was killed
// in the data-done window: its dot had gone out and the 250 was either still to come (the
// server takes it anyway: it never learns that its client died) or read and the queue file
// not yet unlinked. Each duplicate is matched to its kill, counted and reported.
//
// The bound: a connection has at most two messages in that window (one whose 250 is in and
// whose file is being unlinked, one whose dot went out behind it), so a kill duplicates at most
// 2 x connections. With one connection that is the issue's "at most 2 per kill"; with the
// default five, against a server this slow, a connection is waiting for a dot reply nearly all
// the time, so a kill mid-flow duplicates about one message a connection. Both are run.
//
// TORTURE_SEED=<n> (or "random") changes the seed; the seed used is printed as a comment.

import t from "tap";
import * as fs from "node:fs";
import * as path from "node:path";
import { startScriptedServer, type Message } from "../helpers/scripted-server.js";
import { MAIL_JS, dropQueueFile, listFolder, makeSpool, queueFile, runCli, tempMaildir, testMessage, testNumber } from "../helpers/spool-files.js";
import { Prng, torturePrng } from "../helpers/prng.js";
import { sleep, spawnDaemon } from "../helpers/daemon.js";

const TOTAL = 1000;
const KILLS = 50;
/** How long before a kill the 250 of a duplicated copy may have been decided (the data-done window, loaded machine). */
const WINDOW_MS = 1500;

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const prng = torturePrng(7_0050);
t.comment(`seed ${prng.seed} (TORTURE_SEED=${prng.seed} repeats this run)`);

interface Run {
  k: number;
  spawnAt: number;
  killAt: number | null;
  /** Moment chosen: after a delay from the start, or once the server stored so many messages. */
  how: string;
  /** Sessions (first, end] of the server that this process opened. */
  sessions: [number, number];
  activeAtKill: number;
}

async function crashRun(t: Tap, o: { connections: number; total: number; kills: number; seed: number }): Promise<void> {
  if (!fs.existsSync(MAIL_JS)) {
    t.fail(`${MAIL_JS} is missing: run node build.mjs`);
    return;
  }
  const prng = new Prng(o.seed);
  const delays = new Prng(o.seed ^ 0xd1a7);
  /** When the server decided to say 250 to each copy (it writes it right after). */
  const decidedAt = new WeakMap<Message, number>();
  const server = await startScriptedServer({
    onData: async (message) => {
      await sleep(delays.range(2, 5));
      decidedAt.set(message, Date.now());
      return "250 2.0.0 Ok: queued";
    },
  });
  t.teardown(() => server.close());

  const maildir = await tempMaildir("mudmail-torture-crash-");
  await makeSpool(maildir);
  t.teardown(() => fs.rmSync(path.dirname(maildir), { recursive: true, force: true }));
  const second = Math.floor(Date.now() / 1000) - 10;
  for (let n = 0; n < o.total; n++) {
    await dropQueueFile(maildir, `${second}.${n}`, queueFile("talker@test.example", [`user${n}@test.example`], testMessage(n, { bodyLines: 10 })));
  }
  const relay = `127.0.0.1:${server.port}`;
  const logFile = path.join(path.dirname(maildir), "mail.log");
  const args = ["--flush", "--force", "--relay", relay, "--maildir", maildir, "--log", logFile, "--max-connections", String(o.connections)];

  /** Distinct messages the server has accepted so far (each session's list only grows). */
  const seen = new Set<number>();
  const counted = new Map<number, number>();
  const distinct = (): number => {
    for (const session of server.sessions) {
      let i = counted.get(session.id) ?? 0;
      for (; i < session.messages.length; i++) {
        const n = testNumber(session.messages[i].data);
        if (n !== null) seen.add(n);
      }
      counted.set(session.id, i);
    }
    return seen.size;
  };

  const runs: Run[] = [];
  const killed = () => runs.filter((r) => r.killAt !== null).length;
  const started = Date.now();
  for (let k = 0; killed() < o.kills && k < o.kills * 2; k++) {
    const child = spawnDaemon(process.execPath, [MAIL_JS, ...args], path.dirname(maildir), `flush-${k}`);
    const exit = child.done;
    const exited = () => child.exited() !== undefined;
    const run: Run = { k, spawnAt: Date.now(), killAt: null, how: "", sessions: [server.sessions.length, 0], activeAtKill: 0 };
    if (prng.chance(0.2)) {
      // Anywhere in the start: node's start-up, the lock, recovery of outgoing_active/, the scan, the first claims.
      const ms = prng.range(0, 250);
      run.how = `start-up, ${ms} ms`;
      await Promise.race([sleep(ms), exit]);
    } else {
      // Mid-flow: once the server has stored some more messages, then 0-25 ms later, so the
      // moment is not tied to any one reply (a message takes about 5 ms a connection). A tenth
      // of the messages is left for the last flush.
      const remaining = Math.max(0, Math.floor(o.total * 0.9) - distinct());
      const more = Math.max(1, Math.round((remaining / (o.kills - killed() + 1)) * (0.3 + prng.next() * 0.9)));
      const target = distinct() + more;
      const jitter = prng.int(26);
      run.how = `mid-flow, ${more} more stored +${jitter} ms`;
      await Promise.race([server.waitFor(() => distinct() >= target, 30_000, `${target} distinct messages`).catch(() => undefined), exit]);
      if (jitter > 0) await Promise.race([sleep(jitter), exit]);
    }
    if (!exited()) {
      run.activeAtKill = (await listFolder(maildir, "outgoing_active")).length;
      child.kill("SIGKILL").catch(() => undefined);
      run.killAt = Date.now();
    }
    await Promise.race([exit, sleep(10_000)]);
    if (!exited()) t.fail(`run ${k}: the process did not die`);
    run.sessions[1] = server.sessions.length;
    runs.push(run);
  }
  const kills = runs.filter((r) => r.killAt !== null);
  t.equal(kills.length, o.kills, `${o.kills} processes killed (${runs.length} started)`);
  const waiting = await Promise.all(["outgoing", "outgoing_active", "deferred"].map((f) => listFolder(maildir, f)));
  t.comment(`after ${kills.length} kills in ${((Date.now() - started) / 1000).toFixed(1)} s: ${distinct()} of ${o.total} delivered, ` +
    `${server.messages.length} copies; ${waiting.map((s) => s.length).join(" / ")} in outgoing / outgoing_active / deferred`);

  const last = await runCli(args, { timeoutMs: 120_000 });
  t.equal(last.code, 0, `the last flush exits 0 ${last.stderr}`);
  t.match(last.stdout, /flush: \d+ messages?: \d+ sent, 0 deferred, 0 bounced, 0 corrupt/, `the last flush: ${last.stdout.trim()}`);
  for (const folder of ["outgoing", "outgoing_active", "deferred", "corrupt"]) {
    t.same(await listFolder(maildir, folder), [], `${folder}/ is empty`);
  }
  t.throws(() => fs.lstatSync(path.join(maildir, ".mudmail.lock")), "no lock left behind");

  // Every message delivered; the copies of each in the order the server took them.
  const copies = new Map<number, Message[]>();
  for (const m of server.messages) {
    const n = testNumber(m.data);
    if (n === null) continue;
    copies.set(n, [...(copies.get(n) ?? []), m]);
  }
  for (const list of copies.values()) list.sort((a, b) => (decidedAt.get(a) ?? 0) - (decidedAt.get(b) ?? 0));
  const missing = Array.from({ length: o.total }, (_, n) => n).filter((n) => !copies.has(n));
  t.same(missing, [], "every message was delivered, none lost");
  const damaged = [...copies].filter(([n, list]) => list.some((m) => m.data.toString() !== testMessage(n, { bodyLines: 10, crlf: true })));
  t.same(damaged.map(([n]) => n), [], "every copy is the whole message, as queued");

  // Each duplicate: a copy taken in a session of a killed process, its 250 decided at most
  // WINDOW_MS before the kill (or after it: the dot was out, the client gone).
  const runOfSession = (id: number): Run | undefined => runs.find((r) => id > r.sessions[0] && id <= r.sessions[1]);
  const perKill = new Map<number, number>();
  const unexplained: string[] = [];
  const kinds = { afterKill: 0, beforeKill: 0 };
  let duplicates = 0;
  let widest = 0;
  for (const [n, list] of copies) {
    // Every copy but the last was taken for a process that never unlinked the file.
    for (const copy of list.slice(0, -1)) {
      duplicates++;
      const run = runOfSession(copy.session);
      const decided = decidedAt.get(copy) ?? NaN;
      const gap = run?.killAt != null ? run.killAt - decided : NaN;
      if (!run || run.killAt === null || !(gap <= WINDOW_MS)) {
        unexplained.push(`message ${n}: a copy from session ${copy.session} (run ${run?.k ?? "?"}, killed: ${run?.killAt != null}), 250 decided ${gap} ms before the kill`);
        continue;
      }
      if (gap < 0) kinds.afterKill++;
      else {
        kinds.beforeKill++;
        widest = Math.max(widest, gap);
      }
      perKill.set(run.k, (perKill.get(run.k) ?? 0) + 1);
    }
  }
  t.same(unexplained, [], "every duplicate comes from a process killed in the data-done window");
  const most = Math.max(0, ...perKill.values());
  const bound = 2 * o.connections;
  t.ok(most <= bound, `at most ${bound} duplicates a kill (2 a connection): the most was ${most}`);
  if (o.connections === 1) t.ok(duplicates <= 2 * o.kills, `at most 2 a kill in all: ${duplicates} after ${o.kills} kills`);
  t.comment(`duplicates: ${duplicates} after ${o.kills} kills (${(duplicates / o.kills).toFixed(2)} a kill, at most ${most} for one kill, ${perKill.size} kills caused any): ` +
    `${kinds.afterKill} whose 250 the server decided after the kill (the dot was out), ${kinds.beforeKill} whose 250 came before it ` +
    `(the file not yet unlinked; at most ${widest} ms before)`);
  const histogram = new Map<number, number>();
  for (const r of kills) histogram.set(perKill.get(r.k) ?? 0, (histogram.get(perKill.get(r.k) ?? 0) ?? 0) + 1);
  t.comment(`kills by duplicates caused: ${[...histogram].sort((a, b) => a[0] - b[0]).map(([d, c]) => `${c} caused ${d}`).join(", ")}`);
  const midFlow = kills.filter((r) => r.how.startsWith("mid-flow"));
  t.comment(`kill moments: ${kills.length - midFlow.length} in the start-up, ${midFlow.length} mid-flow ` +
    `(${(midFlow.reduce((s, r) => s + (perKill.get(r.k) ?? 0), 0) / Math.max(1, midFlow.length)).toFixed(2)} duplicates a mid-flow kill); ` +
    `${kills.reduce((s, r) => s + r.activeAtKill, 0)} messages were in outgoing_active/ at the kills`);
  const log = fs.readFileSync(logFile, "utf8");
  t.comment(`the last flush: ${last.stdout.trim()}; the log has ${(log.match(/requeued from outgoing_active\/ after an unclean stop/g) ?? []).length} "requeued" lines`);
}

t.test(`${KILLS} kill -9 at random moments while flushing ${TOTAL} messages through a slow server, 5 connections`, (t) =>
  crashRun(t, { connections: 5, total: TOTAL, kills: KILLS, seed: prng.seed }));

t.test(`${KILLS} kill -9 at random moments while flushing ${TOTAL} messages through a slow server, 1 connection: at most 2 duplicates a kill`, (t) =>
  crashRun(t, { connections: 1, total: TOTAL, kills: KILLS, seed: prng.seed ^ 0x0001 }));
