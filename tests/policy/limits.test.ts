// A destination's limits at work (the scheduler of mail.ts under policy.ts), against the
// scripted server: connections open at once, messages per connection, and the rate, spread
// evenly over one and over several connections. Rates are short intervals (tens of ms).

import t from "tap";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { setup, simple, testMails, verbs, type Rig } from "../helpers/engine-rig.js";
import type { Script, Session } from "../helpers/scripted-server.js";

/** The most sessions the server had open at once, watched at every command. */
function concurrency(script: Script = {}): { script: Script; max: () => number; watch: (rig: Rig) => void } {
  let max = 0;
  let sessions: () => Session[] = () => [];
  return {
    script: {
      ...script,
      onCommand: (command: string, session: Session) => {
        max = Math.max(max, sessions().filter((s) => !s.closed).length);
        return script.onCommand?.(command, session);
      },
    },
    max: () => max,
    watch(rig: Rig) {
      sessions = () => rig.server.sessions;
    },
  };
}

/**
 * Every MAIL command's arrival time at the server, in order, and how late this process's loop
 * ran at worst meanwhile: the scripted server shares the engine's loop, so it reads a command
 * late by as much as the loop was held (a busy machine, a GC pause), and a gap between two
 * arrivals can look shorter than the gap between the two writes by that much, never more.
 */
function mailTimes(): { script: Script; times: number[]; lateMs: () => number } {
  const times: number[] = [];
  const lag = monitorEventLoopDelay({ resolution: 1 });
  lag.enable();
  return {
    times,
    script: { mail: () => { times.push(Date.now()); return undefined; } },
    lateMs: () => {
      lag.disable();
      return Math.ceil(lag.max / 1e6);
    },
  };
}

t.test("messagesPerConnection: a connection QUITs after N messages and a new one takes the rest", async (t) => {
  for (const pipelining of [true, false]) {
    await t.test(pipelining ? "with PIPELINING" : "without PIPELINING", async (t) => {
      const rig = await setup(t, { script: { pipelining }, engine: { maxConnections: 1, policy: { default: { messagesPerConnection: 3 } } } });
      for (let i = 0; i < 7; i++) rig.drop(simple("a@example.org", [`u${i}@example.net`]));
      t.match(await rig.flush(), { sent: 7, deferred: 0, messages: 7 });
      const perSession = rig.server.sessions.map((s) => testMails(s).length);
      t.same(perSession, [3, 3, 1], "three, three, then the one left");
      for (const s of rig.server.sessions) t.equal(verbs(s).at(-1), "QUIT", `session ${s.id} ends with QUIT`);
    });
  }
});

t.test("connections: the destination's limit holds whatever --max-connections allows", async (t) => {
  const watch = concurrency({ onData: async () => ({ action: "delay", ms: 60, reply: "250 2.0.0 Ok" }) });
  const rig = await setup(t, { script: watch.script, engine: { maxConnections: 5, policy: { default: { connections: 2 } } } });
  watch.watch(rig);
  for (let i = 0; i < 12; i++) rig.drop(simple("a@example.org", [`u${i}@example.net`]));
  t.match(await rig.flush(), { sent: 12 });
  t.equal(watch.max(), 2, "never more than two connections at once");

  // The same engine options without a policy open more (the comparison that shows the limit bites).
  const open = concurrency({ onData: async () => ({ action: "delay", ms: 60, reply: "250 2.0.0 Ok" }) });
  const free = await setup(t, { script: open.script, engine: { maxConnections: 5 } });
  open.watch(free);
  for (let i = 0; i < 12; i++) free.drop(simple("a@example.org", [`u${i}@example.net`]));
  t.match(await free.flush(), { sent: 12 });
  t.ok(open.max() > 2, `without a policy, ${open.max()} connections`);
});

t.test("rate: messages start spread evenly, on one connection and over several", async (t) => {
  for (const maxConnections of [1, 3]) {
    await t.test(`${maxConnections} connection(s)`, async (t) => {
      const clock = mailTimes();
      // 20/s: a message every 50 ms at most, whatever the number of connections.
      const rig = await setup(t, { script: clock.script, engine: { maxConnections, policy: { default: { rate: "20/s" } } } });
      for (let i = 0; i < 8; i++) rig.drop(simple("a@example.org", [`u${i}@example.net`]));
      t.match(await rig.flush(), { sent: 8, deferred: 0 });
      t.equal(clock.times.length, 8, "eight transactions");
      const times = [...clock.times].sort((a, b) => a - b);
      const gaps = times.slice(1).map((time, i) => time - times[i]);
      const late = clock.lateMs();
      if (maxConnections === 1) {
        // One connection: the server sees the starts in the order they were made. Timers may fire
        // a little late, never early: each gap is at least the interval, less a millisecond of
        // rounding and less what the server's reading was held up (lateMs; a burst is gaps of
        // a millisecond or two, which no ordinary delay hides).
        t.ok(gaps.every((g) => g >= 49 - late), `every start at least 50 ms after the one before: ${gaps.join(", ")} ms (the loop ran up to ${late} ms late)`);
      } else {
        // Several connections: each MAIL crosses its own socket, so the server sees the starts
        // with some jitter; a burst would be gaps of a millisecond or two.
        t.ok(gaps.every((g) => g >= 20), `no burst: ${gaps.join(", ")} ms`);
      }
      t.ok(times.at(-1)! - times[0] >= 6 * 50, `eight starts span at least six intervals (${times.at(-1)! - times[0]} ms)`);
    });
  }
});

t.test("rate: a slow pace closes the idle connection and opens one when the next message may start", async (t) => {
  const clock = mailTimes();
  // 1 message per 12 s would keep a connection idle past the 10 s it may wait; 5/min is 12 s.
  // The test gives the engine no such wait: it drops two messages and checks what the
  // scheduler decided after the first, without waiting 12 s for the second.
  const rig = await setup(t, { script: clock.script, engine: { maxConnections: 1, policy: { default: { rate: "5/min" } } } });
  rig.drop(simple("a@example.org", ["u1@example.net"]));
  rig.drop(simple("a@example.org", ["u2@example.net"]));
  const flushing = rig.engine.flush();
  await rig.server.waitFor(() => rig.server.messages.length === 1 && rig.server.sessions[0].closed && rig.engine.progress.waiting === 1,
    5000, "the first message, then QUIT, and the second read and waiting");
  t.equal(verbs(rig.server.sessions[0]).at(-1), "QUIT", "the connection is not kept idle for 12 s");
  t.equal(clock.times.length, 1, "the second message waits for its time");
  await rig.engine.stop();
  await flushing;
  t.same(rig.files("outgoing").length, 1, "stop() puts the waiting message back untried");
});
