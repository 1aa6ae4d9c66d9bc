/*
 * NAME
 *   bundles/mail/lib/MailService.js - the game's one MailEngine, and what its commands need
 *
 * SYNOPSIS
 *   state.Mail = new MailService(state);  await state.Mail.start();   // server event 'startup'
 *   await state.Mail.requestVerification(player, address);           // setemail ADDRESS
 *   state.Mail.verify(player, code);                                   // verify CODE
 *   await state.Mail.mailFrom(player, to, text);                       // mail ADDRESS TEXT
 *   await state.Mail.listing();                                        // mailq (admins)
 *   state.Mail.greet(player);                                          // player event 'login'
 *   await state.Mail.stop();                                           // server event 'shutdown'
 *
 * DESCRIPTION
 *   One MailEngine per game, its spool in the game's data directory (DATA/mail/spool). The
 *   engine is driven from the game's own player update tick: mail.tick() once a minute of
 *   it, and once at start, which also sends what a crash left in the spool. send() starts
 *   delivery at once between ticks; stop() puts mail in flight back in outgoing/.
 *
 *   The engine's outcome events carry the queue id; the service keeps who queued which id
 *   (owners), the notices of players who were away (notices) and when each player last sent
 *   mail (recent) in DATA/mail/state.json, rewritten (write aside, rename) before the call
 *   that changed them returns, so a SIGKILL loses none of them. A notice goes to the player
 *   at once if online, else at the next login.
 *
 *   A player's address lives in the player's own metadata ('mail': { address, pending }),
 *   saved with the player: `pending` holds the address being verified, the SHA-256 of its
 *   code, its expiry and the wrong tries left. Per player, at most perPlayer.mails messages
 *   (verification mail included) in perPlayer.minutes.
 *
 *   The event loop's delay is measured while mail is in flight: from send() (or the start,
 *   for what an earlier run left) to the message's outcome event, or to a tick that finds the
 *   engine idle. A 1 ms timer records the time between its firings, as monitorEventLoopDelay
 *   does at 1 ms resolution (about 1.1 ms on an idle loop); monitorEventLoopDelay itself
 *   cannot be paused, as its first sample after enable() spans the whole pause. mailq shows
 *   it. (A 1 ms timer costs about 2% of a core here: it runs only while mail is in flight.)
 *
 * DIAGNOSTICS
 *   The engine's log lines (Postfix-shaped) go to standard error; the service logs its start,
 *   its stop and the engine's "error" events through Ranvier's Logger.
 *
 * BUGS
 *   mudmail is an ES module: this CommonJS bundle loads it with import(), so the service is
 *   usable a moment after 'startup', not during it. A SIGKILL in the instant between the
 *   queue file landing and the owner being written loses that message's in-game notice
 *   (never the message). The engine gives a message a new queue id when it moves it onto a
 *   name already taken (queue.ts's move()), and no event says so: that message's outcome
 *   then reaches no one, and its record goes, with an "unknown" notice, at the next start.
 */
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { createHistogram } = require('node:perf_hooks');
const { Broadcast, Logger } = require('ranvier');

/** How often the game's tick calls mail.tick(): check_smtp's one minute. */
const TICK_MS = 60_000;
/** How long after mail.tick() the engine's progress is not taken to mean idle (it may be reading the spool). */
const SCAN_MS = 5_000;
/** Wrong codes allowed before a pending verification is dropped. */
const CODE_TRIES = 5;
/** An address as a player may type it: local@domain, no spaces or angle brackets (the engine checks the rest). */
const ADDRESS = /^[^\s<>@]+@[^\s<>@]+\.[^\s<>@]+$/;

class MailService {
  constructor(state) {
    const config = state.Config.get('mail', {});
    this.state = state;
    this.game = state.Config.get('name', 'the game');
    this.from = config.from || 'mud@localhost';
    this.dir = path.join(state.Config.get('dataPath'), 'mail');
    this.file = path.join(this.dir, 'state.json');
    this.perPlayer = { mails: config.perPlayer?.mails ?? 10, ms: (config.perPlayer?.minutes ?? 60) * 60_000 };
    this.codeMs = (config.codeMinutes ?? 60) * 60_000;
    this.engineOptions = {
      maildir: path.join(this.dir, 'spool'),
      ...config.engine,
      // The relay and its credentials come from the environment, as for mudmail's command line.
      ...(process.env.MUDMAIL_RELAY ? { relay: process.env.MUDMAIL_RELAY } : {}),
      ...(process.env.MUDMAIL_AUTH ? { auth: process.env.MUDMAIL_AUTH } : {}),
    };
    /** The MailEngine, once started. */
    this.engine = null;
    /** Queue id -> { player, to, kind: 'verification' | 'mail' }. */
    this.owners = new Map();
    /** Player name (lower case) -> notices kept for the next login. */
    this.notices = new Map();
    /** Player name (lower case) -> times of the mail they queued lately. */
    this.recent = new Map();
    this.lastTick = 0;
    this.loopDelay = new LoopDelay();
    /** Queue ids sent and not yet told of: while there are any, loopDelay runs. */
    this.inFlight = new Set();
    this.onTick = () => this.tick();
  }

  /** Loads the engine and the notices, sends what an earlier run left, and hooks the game's tick. */
  async start() {
    const { MailEngine } = await import('mudmail');
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    this.load();
    const engine = new MailEngine(this.engineOptions);
    for (const status of ['sent', 'deferred', 'bounced']) engine.on(status, (outcome) => this.outcome(status, outcome));
    engine.on('error', (err) => Logger.error(`mail: ${err.message}`));
    // A message whose file left the spool while the game was down (an operator deleted it)
    // will have no outcome: its owner hears so, and the record goes.
    const entries = await engine.queue();
    const inSpool = new Set(entries.map((entry) => entry.id));
    for (const [id, owner] of this.owners) {
      if (inSpool.has(id)) continue;
      this.owners.delete(id);
      this.notify(owner.player, `[mail ${id}] Your ${owner.kind} to ${owner.to} left the mail queue while the game was down; what became of it is not known.`);
    }
    this.save();
    this.engine = engine;
    for (const entry of entries) if (entry.state === 'queued' || entry.state === 'active') this.flying(entry.id, true);
    this.lastTick = Date.now();
    engine.tick();
    this.state.PlayerManager.on('updateTick', this.onTick);
    Logger.log(`mail: engine started, spool ${this.engineOptions.maildir}, relay ${this.engineOptions.relay || '(MX lookup)'}; ${inSpool.size} message(s) in the spool`);
  }

  /**
   * On the game's player tick: mail.tick() once a minute. Between, an engine with no slot
   * busy and nothing waiting has nothing in flight (a message whose outcome never came: its
   * file was removed by hand, or renamed on a clash). Not in the seconds after mail.tick():
   * the engine reads the spool first, and looks idle until it has.
   */
  tick() {
    const now = Date.now();
    if (now - this.lastTick >= TICK_MS) {
      this.lastTick = now;
      this.engine.tick();
    }
    if (this.inFlight.size === 0 || now - this.lastTick < SCAN_MS) return;
    const { busySlots, waiting } = this.engine.progress;
    if (busySlots === 0 && waiting === 0) {
      this.inFlight.clear();
      this.loopDelay.stop();
    }
  }

  /** Message id is in flight (sent, not yet told of), or no longer: loopDelay runs while any is. */
  flying(id, on) {
    const before = this.inFlight.size;
    if (on) this.inFlight.add(id);
    else this.inFlight.delete(id);
    if (before === 0 && this.inFlight.size > 0) this.loopDelay.start();
    if (before > 0 && this.inFlight.size === 0) this.loopDelay.stop();
  }

  /** Graceful: mail in flight goes back to the spool's outgoing/. */
  async stop() {
    this.state.PlayerManager.removeListener('updateTick', this.onTick);
    if (!this.engine) return;
    await this.engine.stop();
    this.inFlight.clear();
    this.loopDelay.stop();
    Logger.log('mail: engine stopped; mail in flight is back in the spool');
  }

  /* Player commands */

  /** setemail ADDRESS: a code to ADDRESS; the address counts once `verify CODE` gives it back. */
  async requestVerification(player, address) {
    if (!ADDRESS.test(address)) return this.say(player, `'${address}' does not look like a mail address.`);
    const code = String(crypto.randomInt(0, 1_000_000)).padStart(6, '0');
    const pending = { address, hash: sha256(code), expires: Date.now() + this.codeMs, tries: CODE_TRIES };
    const id = await this.queue(player, 'verification mail', {
      to: address,
      subject: `Your code for ${this.game}`,
      text: `Someone playing ${player.name} in ${this.game} asked to use this address.\n\n` +
        `Your code: ${code}\n\nType 'verify ${code}' in the game within ${Math.round(this.codeMs / 60_000)} minutes. ` +
        'If it was not you, ignore this mail.',
    });
    if (id === null) return;
    await this.setMeta(player, { ...this.meta(player), pending });
    this.say(player, `A code is on its way to ${address} (mail ${id}). Type 'verify CODE' when it comes.`);
  }

  /** verify CODE */
  async verify(player, code) {
    const meta = this.meta(player);
    const pending = meta.pending;
    if (!pending) return this.say(player, "There is nothing to verify: 'setemail ADDRESS' first.");
    if (Date.now() > pending.expires) {
      await this.setMeta(player, { ...meta, pending: null });
      return this.say(player, "That code has expired: 'setemail ADDRESS' for a new one.");
    }
    if (!timingSafeEqual(sha256(code), pending.hash)) {
      const tries = pending.tries - 1;
      await this.setMeta(player, { ...meta, pending: tries > 0 ? { ...pending, tries } : null });
      return this.say(player, tries > 0 ? `That is not the code (${tries} tries left).` : "That is not the code, and that was the last try: 'setemail ADDRESS' again.");
    }
    await this.setMeta(player, { address: pending.address, pending: null });
    this.say(player, `Your mail address ${pending.address} is verified. 'mail ADDRESS TEXT' sends mail.`);
  }

  /** mail ADDRESS TEXT: from the game's address, with the player's verified address as Reply-To. */
  async mailFrom(player, to, text) {
    const own = this.meta(player).address;
    if (!own) return this.say(player, "Verify your own address first: 'setemail ADDRESS', then 'verify CODE'.");
    if (!ADDRESS.test(to)) return this.say(player, `'${to}' does not look like a mail address.`);
    const id = await this.queue(player, 'mail', {
      to,
      subject: `A message from ${player.name} in ${this.game}`,
      headers: { 'Reply-To': own },
      text: `${text}\n\n-- \n${player.name} sent this from ${this.game}. A reply goes to ${own}.`,
    });
    if (id !== null) this.say(player, `Mail to ${to} queued as ${id}.`);
  }

  /** mailq: the engine's queue listing, who queued each message, and the loop delay. */
  async listing() {
    if (!this.engine) return ['The mail engine is not running.'];
    const entries = await this.engine.queue();
    const lines = [entries.length === 0 ? 'The mail queue is empty.' : `Mail queue: ${entries.length} message(s).`];
    for (const e of entries) {
      const owner = this.owners.get(e.id);
      lines.push(`  ${e.id}  ${e.state.padEnd(8)}  to ${e.recipients.join(', ')}` +
        `${owner ? `  (${owner.kind} of ${owner.player})` : ''}  queued ${e.queuedAt}` +
        `${e.attempts ? `  attempts ${e.attempts}` : ''}${e.nextAttempt ? `  next ${e.nextAttempt}` : ''}` +
        `${e.lastError ? `\r\n      last error: ${e.lastError}` : ''}`);
    }
    lines.push(`Game loop delay while mail was in flight: ${this.loopDelay.text()}`);
    return lines;
  }

  /** At login: the notices kept while the player was away. */
  greet(player) {
    const key = player.name.toLowerCase();
    const kept = this.notices.get(key);
    if (!kept) return;
    this.say(player, `While you were away, ${kept.length} mail notice(s):`);
    for (const text of kept) this.say(player, text);
    this.notices.delete(key);
    this.save();
  }

  /* Inside */

  /** Queues one message for player (rate limit, then send()); the queue id, or null when refused. */
  async queue(player, kind, message) {
    if (!this.engine) {
      this.say(player, 'The mail service is starting; try again in a moment.');
      return null;
    }
    const key = player.name.toLowerCase();
    const now = Date.now();
    const recent = (this.recent.get(key) || []).filter((t) => now - t < this.perPlayer.ms);
    if (recent.length >= this.perPlayer.mails) {
      const wait = Math.ceil((recent[0] + this.perPlayer.ms - now) / 60_000);
      this.say(player, `You have sent ${recent.length} mails lately; the next one can go in ${wait} minute(s).`);
      return null;
    }
    let id;
    try {
      id = await this.engine.send({ from: this.from, ...message });
    } catch (err) {
      this.say(player, `That mail cannot be sent: ${err.message}`);
      return null;
    }
    // Recorded before anything else can run: no outcome event comes between send() and here.
    this.owners.set(id, { player: player.name, to: message.to, kind });
    recent.push(now);
    this.recent.set(key, recent);
    this.save();
    this.flying(id, true);
    return id;
  }

  /** An outcome event: tell whoever queued the message. */
  outcome(status, o) {
    this.flying(o.queueId, false);
    const owner = this.owners.get(o.queueId);
    if (!owner) return; // a bounce report, or mail that another program queued
    if (status !== 'deferred') this.owners.delete(o.queueId); // deferred: it is tried again
    const what = `[mail ${o.queueId}] Your ${owner.kind} to ${o.recipient}`;
    if (status === 'sent') this.notify(owner.player, `${what} was delivered (${o.reply || o.text}).`);
    else if (status === 'deferred') this.notify(owner.player, `${what} is delayed: ${o.text}. It will be tried again.`);
    else this.notify(owner.player, `${what} could not be delivered: ${o.text}.`);
    this.save();
  }

  /** Tells the player now if online, else keeps the notice for the next login (the caller saves). */
  notify(name, text) {
    const player = this.state.PlayerManager.getPlayer(name);
    if (player && player.socket && player.socket.writable) {
      this.say(player, text);
      Broadcast.prompt(player);
      return;
    }
    const key = name.toLowerCase();
    this.notices.set(key, [...(this.notices.get(key) || []), text]);
  }

  say(player, text) {
    Broadcast.sayAt(player, text);
  }

  meta(player) {
    return player.getMeta('mail') || { address: null, pending: null };
  }

  async setMeta(player, value) {
    player.setMeta('mail', value);
    await this.state.PlayerManager.save(player);
  }

  load() {
    let data;
    try {
      data = JSON.parse(fs.readFileSync(this.file, 'utf8'));
    } catch (err) {
      if (err.code === 'ENOENT') return;
      throw new Error(`mail: cannot read ${this.file}: ${err.message}`);
    }
    this.owners = new Map(Object.entries(data.owners || {}));
    this.notices = new Map(Object.entries(data.notices || {}));
    this.recent = new Map(Object.entries(data.recent || {}));
  }

  /** Writes owners, notices and recent aside, then renames: the file is always whole. */
  save() {
    const tmp = `${this.file}.tmp`;
    const data = { owners: Object.fromEntries(this.owners), notices: Object.fromEntries(this.notices), recent: Object.fromEntries(this.recent) };
    fs.writeFileSync(tmp, JSON.stringify(data, null, 1), { mode: 0o600 });
    fs.renameSync(tmp, this.file);
  }
}

function sha256(text) {
  return crypto.createHash('sha256').update(String(text)).digest('hex');
}

function timingSafeEqual(a, b) {
  return a.length === b.length && crypto.timingSafeEqual(Buffer.from(a), Buffer.from(b));
}

/** The event loop's delay, sampled only between start() and stop(): a 1 ms timer's intervals. */
class LoopDelay {
  constructor() {
    this.histogram = createHistogram();
    this.timer = null;
    this.last = 0n;
  }

  start() {
    if (this.timer) return;
    this.last = process.hrtime.bigint();
    this.timer = setInterval(() => {
      const now = process.hrtime.bigint();
      this.histogram.record(now - this.last);
      this.last = now;
    }, 1);
    this.timer.unref();
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  /** "p50 1.10 ms, p99 2.10 ms, max 8.30 ms (12345 samples)" */
  text() {
    const h = this.histogram;
    if (h.count === 0) return 'no samples yet';
    const ms = (ns) => (ns / 1e6).toFixed(2);
    return `p50 ${ms(h.percentile(50))} ms, p99 ${ms(h.percentile(99))} ms, max ${ms(h.max)} ms (${h.count} samples)`;
  }
}

module.exports = MailService;
