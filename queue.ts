/*
 * NAME
 *   queue.ts - the spool: queue files, their folders, their envelope, their body on the wire
 *
 * SYNOPSIS
 *   const spool = new Spool("maildir", { fsync: true });
 *   await spool.init({ recover: true });         // create folders; outgoing_active/ -> outgoing/
 *   spool.lock(); ...; spool.unlock();           // one engine sends from a spool at a time
 *   const id = await spool.create(bytes, book);  // get_mailqueue_file(): tmp/, then outgoing/<id>
 *   const { ids, badNames } = await spool.scan("outgoing");   // one directory read per pass
 *   const claimed = await spool.claim(id, "outgoing");        // { id, booked } or null
 *   const msg = await spool.open(claimed.id);
 *   const wire = await measureWire(spool, msg, makePrefix);   // size, 8-bit, the bytes if small
 *   for await (const chunk of wireChunks(spool, msg, prefix)) write(chunk);
 *   await spool.complete(id, booked) | release(id, to, book) | quarantine(id, from, why)
 *   await spool.rewriteRecipients(msg, pending); await queueEntries(spool); await spool.counts();
 *   await spool.control("hold" | "release" | "delete" | "requeue", id | "ALL");   // postsuper
 *   const name = await spool.putRequest(body); await spool.takeRequests(); ...   // to the lock holder
 *
 * DESCRIPTION
 *   The only code that creates, renames or deletes spool files. A message is one file whose
 *   name is its queue id, <unix seconds>.<subtime>, in exactly one folder at any instant:
 *
 *     tmp/<pid>.<n>         being written by create(); not yet a message. Nothing reads it.
 *     outgoing/<id>         queued: waiting for a connection slot.
 *     outgoing_active/<id>  claimed by a slot (rename from outgoing/). A crash leaves it here;
 *                           init({ recover: true }) renames it back to outgoing/.
 *     deferred/<id>         failed for now; waits for its next attempt.
 *     hold/<id>             put on hold by an operator (postsuper -h); never sent until released.
 *     corrupt/<id>          could not be parsed; kept for a human, never retried.
 *
 *   Beside a message may stand its bookkeeping, .<id> (JSON: attempts, next attempt, last
 *   error, DSN request), in the same folder. It is there before its message is (create), and
 *   follows the message on every move, after it; a claim always takes it along. init() puts
 *   an orphaned one back beside its message, or removes it when the message is gone.
 *
 *   Commit points, and what a crash (kill -9, power loss after the fsync) between two steps
 *   leaves behind; init({ recover: true }) repairs each case:
 *
 *     step                           crash after it leaves          recovery
 *     create: write+fsync tmp/T, B   tmp/T (and B) only             swept from tmp/ after an hour
 *     create: link B outgoing/.X     .X orphaned in outgoing/       removed (its message never came)
 *     create: link T outgoing/X      outgoing/X (+ tmp/T, a link)   nothing; tmp/T swept later
 *       (the link of X is the commit point; outgoing/ is fsynced before send() resolves)
 *     claim: rename to active/X      outgoing_active/X              renamed back to outgoing/X
 *     claim: rename .X to active/    message and .X in active/      as above, .X follows
 *     (mid-claim: X moved, .X not)   .X orphaned in the old folder  .X moved beside X
 *     rewrite: tmp/T then rename     the old or the new file, whole tmp/T swept
 *     defer: write .X, rename X      X in active/ or deferred/      back to outgoing/ or due in deferred/
 *     complete: unlink X, then .X    .X orphaned                    removed (its message is gone)
 *     quarantine: .X, rename X       X in its folder or corrupt/    retried, or kept in corrupt/
 *     hold: rename X to hold/X, .X   X in its folder or hold/       .X moved beside X
 *     release: hold/X to outgoing/X  X in hold/ or outgoing/        .X moved beside X
 *     requeue: .X due now, rename X  X in deferred/ (due now) or     .X moved beside X
 *                                    outgoing/
 *     delete: unlink X, then .X      .X orphaned                    removed (its message is gone)
 *
 *   Queue control (control()) moves only messages that wait: outgoing/, deferred/, hold/,
 *   corrupt/. One rename decides a race with a claim: the loser sees the file gone. While an
 *   engine holds the lock, the command line asks it instead (putRequest(): a JSON file in
 *   .requests/, written aside and renamed in; the engine takes it by reading and unlinking
 *   it, and answers in <name>.answer; the asker withdraws it by unlinking it first), so the
 *   engine that sends is the only one that moves the spool's files.
 *
 *   Every move is one rename, so a crash never leaves a message under two names. An id
 *   lives in one folder at a time (create() checks them all), so the target name is free;
 *   if it is taken all the same (a program that looked only in outgoing/), the message is
 *   renamed to a fresh id that no folder holds. A message delivered and killed before its
 *   unlink is sent again after recovery: the data-done window every MTA has.
 *
 *   A message up to WHOLE (256 KiB) is read in one read of exactly its size, measured, and
 *   stuffed into memory of exactly its wire size (measureWire); a larger one goes on the wire
 *   through wireChunks(), read in CHUNK pieces. Either way every bare CR or LF becomes CRLF,
 *   lines starting with "." are stuffed, and the end is CRLF.CRLF exactly once.
 *
 * DIAGNOSTICS
 *   open() rejects with a CorruptMessageError saying what is wrong with the file; the caller
 *   quarantines it. Other errors are the file system's, with the queue id in the message.
 *
 * BUGS
 *   Only the first 1 MiB of a file may hold the envelope lines.
 */

import { isAscii } from "node:buffer";
import * as fs from "node:fs";
import * as path from "node:path";

export const FOLDERS = ["tmp", "outgoing", "outgoing_active", "deferred", "hold", "corrupt", "users", "journal"] as const;
export type Folder = "outgoing" | "outgoing_active" | "deferred" | "hold" | "corrupt";

/** What queue control (postsuper's -d, -h, -H, -r) does: the folders it takes from, where it puts. */
export type ControlVerb = "delete" | "hold" | "release" | "requeue";
const CONTROL: Record<ControlVerb, { from: Folder[]; to: Folder | null }> = {
  delete: { from: ["outgoing", "deferred", "hold", "corrupt"], to: null },
  hold: { from: ["outgoing", "deferred"], to: "hold" },
  release: { from: ["hold"], to: "outgoing" },
  requeue: { from: ["deferred"], to: "outgoing" },
};

/** What control() did: the ids it moved or deleted (under the id each now has), and the rest with where they were (null: nowhere). */
export interface ControlResult {
  done: string[];
  skipped: Array<{ id: string; folder: Folder | null }>;
}

/** Requests older than this are not acted on: whoever asked has given up. */
const REQUEST_MAX_AGE_MS = 60_000;

/** One read of the queue file: a small message in one go, a large one in pieces this size. */
export const CHUNK = 64 * 1024;
/** A message up to this size is read, measured and handed to a slot whole, in one piece. */
export const WHOLE = 256 * 1024;
/** The envelope lines must end within this many bytes of the file's start. */
const MAX_ENVELOPE = 1024 * 1024;
/** Queue ids other programs may use: no dot first (those are skipped), nothing a log line could choke on. */
const QUEUE_ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** A name that can be a queue id (a file of the spool's folders, never a path nor a dot file). */
export function isQueueId(name: string): boolean {
  return QUEUE_ID.test(name);
}

/** Delivery bookkeeping, kept in .<id> beside the message. */
export interface Bookkeeping {
  attempts: number;
  /** Epoch ms of the next attempt, or null when due now. */
  nextAttempt: number | null;
  lastError: string | null;
  /** A "delayed" report (--delay-warning) went to the sender already. */
  warned?: boolean;
  /** Its pickup and cleanup log lines were written (a message put back untried is not logged as picked up again). */
  picked?: boolean;
  /** RFC 3461 parameters given when the message was queued; never in the message lines. */
  dsn?: DsnRequest;
  /** The header lines the engine put before the message at its first attempt (DKIM signature
   * included), base64: later attempts send exactly these, so the signature stays valid. */
  prefix?: string;
}

/** What the sender asked of delivery status notifications (RFC 3461). */
export interface DsnRequest {
  /** ["never"], or any of "success", "failure", "delay". */
  notify?: string[];
  /** Return the full message or only its headers in a report. */
  ret?: "full" | "hdrs";
  /** The sender's envelope id (ENVID). */
  envid?: string;
}

/**
 * The spool cannot be used, or cannot take a new message. code: EUNSAFE (another user's, or
 * writable by others), ELOCKED (another engine sends from it), or the errno of a failed write
 * (ENOSPC, EDQUOT, EIO, EROFS, ...).
 */
export class SpoolError extends Error {
  constructor(message: string, readonly code = "EUNSAFE", options?: { cause?: unknown }) {
    super(message, options);
    this.name = "SpoolError";
  }
}

export class CorruptMessageError extends Error {
  constructor(readonly queueId: string, readonly reason: string) {
    super(`${queueId}: corrupt queue file: ${reason}`);
    this.name = "CorruptMessageError";
  }
}

/** What the engine needs of a claimed queue file; the content is read on demand. */
export interface QueuedMessage {
  id: string;
  /** Envelope sender, "" for the null sender <>. */
  sender: string;
  recipients: string[];
  /** Arrival, epoch ms: the queue id's seconds (the file's mtime for other names). */
  arrival: number;
  /** Bytes of the message lines (line 3 on). */
  size: number;
  /** File offset of line 3. */
  contentOffset: number;
  /** Start of the message lines, up to CHUNK bytes; all of them when `whole`. */
  head: Buffer;
  whole: boolean;
  folder: Folder;
}

export class Spool {
  readonly dir: string;
  /** Messages this Spool has claimed and not yet completed or moved on. */
  private readonly active = new Set<string>();
  private idSecond = 0;
  private idSub = 0;
  private tmpCounter = 0;

  /** Each folder's path with its trailing slash: pathOf() runs several times a message. */
  private readonly folderPaths = new Map<string, string>();

  constructor(dir: string, private readonly options: { fsync?: boolean } = {}) {
    this.dir = dir;
  }

  /** A file in a folder; `name` is one path component (a queue id, `.id`, a tmp name). */
  pathOf(folder: Folder | "tmp", name: string): string {
    let prefix = this.folderPaths.get(folder);
    if (prefix === undefined) this.folderPaths.set(folder, (prefix = path.join(this.dir, folder) + path.sep));
    return prefix + name;
  }

  /**
   * Creates missing folders (mode 0700; files are 0600) and refuses a spool another user
   * owns or others may write to; with recover, returns crashed claims to outgoing/.
   */
  async init(opts: { recover?: boolean } = {}): Promise<{ recovered: string[] }> {
    await fs.promises.mkdir(this.dir, { recursive: true, mode: 0o700 });
    await Promise.all([...FOLDERS, REQUESTS].map((f) => fs.promises.mkdir(path.join(this.dir, f), { recursive: true, mode: 0o700 })));
    await this.checkOwnership();
    const recovered: string[] = [];
    if (opts.recover) {
      for (const name of await fs.promises.readdir(path.join(this.dir, "outgoing_active"))) {
        if (name.startsWith(".")) continue;
        recovered.push(await this.move(name, "outgoing_active", "outgoing"));
      }
      await this.repairBookkeeping();
      await this.sweepTmp();
    }
    return { recovered };
  }

  /**
   * get_mailqueue_file(): writes a new queue file and returns its id. The name is
   * <seconds>.<subtime> with subtime counting up within a second, without limit; a name
   * taken in any folder (by this or another program) is skipped.
   */
  async create(content: Buffer | string, book?: Bookkeeping): Promise<string> {
    const sync = this.options.fsync !== false;
    const tmpPath = this.tmpPath();
    const bookPath = book ? this.tmpPath() : null;
    try {
      return await this.commitNew(content, book, tmpPath, bookPath, sync);
    } catch (err) {
      const code = errno(err);
      if (code === undefined) throw err;
      throw new SpoolError(`cannot queue a message in ${this.dir}: ${describeErrno(err as NodeJS.ErrnoException)}`, code, { cause: err });
    } finally {
      // A partial file never waits in tmp/ for the sweep: whatever failed, it goes now.
      await fs.promises.unlink(tmpPath).catch(() => undefined);
      if (bookPath) await fs.promises.unlink(bookPath).catch(() => undefined);
    }
  }

  /** create()'s steps: both files written, then linked into outgoing/ under a free id. */
  private async commitNew(content: Buffer | string, book: Bookkeeping | undefined, tmpPath: string, bookPath: string | null, sync: boolean): Promise<string> {
    await writeExclusive(tmpPath, content, sync);
    if (bookPath) await writeExclusive(bookPath, JSON.stringify(book) + "\n", sync);
    for (;;) {
      const id = this.nextId();
      if (await this.idTaken(id)) continue;
      // The bookkeeping lands first and the message last: the message's link is the commit
      // point, so whoever claims it finds its bookkeeping beside it.
      if (bookPath && !(await linkIfFree(bookPath, this.pathOf("outgoing", `.${id}`)))) continue;
      if (!(await linkIfFree(tmpPath, this.pathOf("outgoing", id)))) {
        if (bookPath) await fs.promises.unlink(this.pathOf("outgoing", `.${id}`)).catch(() => undefined);
        continue;
      }
      // A new name survives a power cut only once its directory is on disk.
      if (sync) await syncDir(path.join(this.dir, "outgoing"));
      return id;
    }
  }

  private tmpPath(): string {
    return this.pathOf("tmp", `${process.pid}.${this.tmpCounter++}.${Date.now()}`);
  }

  private nextId(): string {
    const now = Math.floor(Date.now() / 1000);
    // A clock that steps back keeps counting in the last second used: ids never repeat.
    if (now > this.idSecond) {
      this.idSecond = now;
      this.idSub = 0;
    }
    return `${this.idSecond}.${this.idSub++}`;
  }

  /** An id no folder holds now: for a message whose name was taken where it had to go. */
  private async freshId(): Promise<string> {
    for (;;) {
      const id = this.nextId();
      if (!(await this.idTaken(id, ["outgoing", "outgoing_active", "deferred", "hold", "corrupt"]))) return id;
    }
  }

  private async idTaken(id: string, folders: Folder[] = ["outgoing_active", "deferred", "hold", "corrupt"]): Promise<boolean> {
    const checks = folders.map((f) => exists(this.pathOf(f, id)));
    return (await Promise.all(checks)).some(Boolean);
  }

  /**
   * One read of a folder: the queue ids in it (dot files skipped) and which of them have
   * bookkeeping. Names no queue id can have are reported apart, for quarantine.
   */
  async scan(folder: Folder = "outgoing"): Promise<{ ids: string[]; booked: Set<string>; badNames: string[] }> {
    const ids: string[] = [];
    const booked = new Set<string>();
    const badNames: string[] = [];
    const dir = await fs.promises.opendir(path.join(this.dir, folder), { bufferSize: 256 });
    for await (const entry of dir) {
      const name = entry.name;
      if (name.startsWith(".")) {
        booked.add(name.slice(1));
      } else if (QUEUE_ID.test(name)) {
        ids.push(name);
      } else {
        badNames.push(name);
      }
    }
    return { ids, booked, badNames };
  }

  /** How many messages each folder holds now (names starting with "." are not messages); a missing folder holds none. */
  async counts(): Promise<Record<Folder, number>> {
    const counts = { outgoing: 0, outgoing_active: 0, deferred: 0, hold: 0, corrupt: 0 };
    for (const folder of Object.keys(counts) as Folder[]) {
      try {
        for await (const { ids, badNames } of this.scanSlices(folder)) counts[folder] += ids.length + badNames.length;
      } catch (err) {
        if (errno(err) !== "ENOENT") throw err;
      }
    }
    return counts;
  }

  /** The same listing in slices of at most `size` names, as the directory is read. */
  async *scanSlices(folder: Folder, size = 1000): AsyncGenerator<{ ids: string[]; badNames: string[] }> {
    let ids: string[] = [];
    let badNames: string[] = [];
    const dir = await fs.promises.opendir(path.join(this.dir, folder), { bufferSize: 256 });
    for await (const entry of dir) {
      const name = entry.name;
      if (name.startsWith(".")) continue;
      if (QUEUE_ID.test(name)) ids.push(name);
      else badNames.push(name);
      if (ids.length + badNames.length >= size) {
        yield { ids, badNames };
        ids = [];
        badNames = [];
      }
    }
    if (ids.length + badNames.length > 0) yield { ids, badNames };
  }

  /**
   * Takes a queued message for a slot: one rename, and its bookkeeping follows when it has
   * any. Returns the id it is claimed under and whether bookkeeping came with it, or null
   * when someone else took it first. The caller holds the spool's lock, so only this Spool
   * puts files in outgoing_active/: a name it already has there belongs to another message
   * (dropped by a program that only looked in outgoing/), which first gets a fresh id.
   */
  async claim(id: string, from: Folder = "outgoing"): Promise<{ id: string; booked: boolean } | null> {
    let name = id;
    try {
      if (this.active.has(name)) name = await this.move(name, from, from);
      // The hot path's file calls are synchronous: each is one system call whose cost does
      // not grow with the queue or the message, and the promise round trip cost more than
      // the call (measured: about 40% of the CPU per message).
      fs.renameSync(this.pathOf(from, name), this.pathOf("outgoing_active", name));
    } catch (err) {
      if (errno(err) === "ENOENT") return null;
      throw err;
    }
    this.active.add(name);
    // Always looked for: whoever queued the message wrote its bookkeeping before it. Most
    // messages have none, and asking whether the name exists costs a fifth of a rename
    // that fails (no rename lock taken, no error built). Only "no such file" means none:
    // any other failure (EACCES, EIO) throws, as a failing rename's would.
    const book = this.pathOf(from, `.${name}`);
    if (!fs.lstatSync(book, { throwIfNoEntry: false })) return { id: name, booked: false };
    try {
      fs.renameSync(book, this.pathOf("outgoing_active", `.${name}`));
    } catch (err) {
      if (errno(err) !== "ENOENT") throw err;
      return { id: name, booked: false };
    }
    return { id: name, booked: true };
  }

  /** Delivered (or given up on): the message leaves the queue. */
  async complete(id: string, hasBookkeeping = true): Promise<void> {
    // Not synchronous: freeing a synced file's blocks waits on the file system (70 µs to
    // 0.8 ms here), and in the thread pool several messages' unlinks wait side by side, so
    // one slow unlink never holds back the next 250's. The name stays taken until it is gone.
    try {
      await fs.promises.unlink(this.pathOf("outgoing_active", id));
    } finally {
      this.active.delete(id);
    }
    if (hasBookkeeping) await fs.promises.unlink(this.pathOf("outgoing_active", `.${id}`)).catch(() => undefined);
  }

  /**
   * Puts a claimed message back, to outgoing/ or deferred/, with its bookkeeping when
   * given. Returns the id it now has (a new one only if its name was taken meanwhile).
   */
  async release(id: string, to: "outgoing" | "deferred" = "outgoing", book?: Bookkeeping): Promise<string> {
    if (book) await this.writeBookkeeping(id, "outgoing_active", book);
    return this.move(id, "outgoing_active", to);
  }

  /** Moves a message that cannot be parsed to corrupt/, with the reason beside it. */
  async quarantine(id: string, from: Folder, reason: string): Promise<string> {
    await this.writeBookkeeping(id, from, { attempts: 0, nextAttempt: null, lastError: reason }).catch(() => undefined);
    return this.move(id, from, "corrupt");
  }

  /** Rewrites line 2 of a claimed message with the recipients still pending. */
  async rewriteRecipients(msg: QueuedMessage, pending: string[]): Promise<void> {
    const tmpPath = this.tmpPath();
    const envelope = Buffer.from(`${msg.sender === "" ? "<>" : msg.sender}\n${pending.join(", ")}\n`);
    const source = this.pathOf("outgoing_active", msg.id);
    try {
      const out = await fs.promises.open(tmpPath, "wx", 0o600);
      try {
        await out.write(envelope);
        const input = await fs.promises.open(source, "r");
        try {
          const buf = Buffer.allocUnsafe(CHUNK);
          for (let pos = msg.contentOffset; ;) {
            const { bytesRead } = await input.read(buf, 0, CHUNK, pos);
            if (bytesRead === 0) break;
            await out.write(buf.subarray(0, bytesRead));
            pos += bytesRead;
          }
        } finally {
          await input.close();
        }
        if (this.options.fsync !== false) await out.sync();
      } finally {
        await out.close();
      }
      await fs.promises.rename(tmpPath, source);
    } catch (err) {
      await fs.promises.unlink(tmpPath).catch(() => undefined);
      throw err;
    }
    msg.recipients = pending;
  }

  async readBookkeeping(id: string, folder: Folder): Promise<Bookkeeping | null> {
    try {
      const parsed = JSON.parse(await fs.promises.readFile(this.pathOf(folder, `.${id}`), "utf8")) as Partial<Bookkeeping>;
      return {
        attempts: Number.isSafeInteger(parsed.attempts) ? Number(parsed.attempts) : 0,
        nextAttempt: typeof parsed.nextAttempt === "number" ? parsed.nextAttempt : null,
        lastError: typeof parsed.lastError === "string" ? parsed.lastError : null,
        ...(parsed.warned === true ? { warned: true } : {}),
        ...(parsed.picked === true ? { picked: true } : {}),
        ...(parsed.dsn && typeof parsed.dsn === "object" ? { dsn: parsed.dsn } : {}),
        ...(typeof parsed.prefix === "string" ? { prefix: parsed.prefix } : {}),
      };
    } catch {
      return null;
    }
  }

  private async writeBookkeeping(id: string, folder: Folder, book: Bookkeeping): Promise<void> {
    await this.writeAside(this.pathOf(folder, `.${id}`), JSON.stringify(book));
  }

  /** Moves .<id> along with its message; false when there was none. */
  private async moveBookkeeping(id: string, from: Folder, to: Folder): Promise<boolean> {
    try {
      await fs.promises.rename(this.pathOf(from, `.${id}`), this.pathOf(to, `.${id}`));
      return true;
    } catch (err) {
      if (errno(err) !== "ENOENT") throw err;
      return false;
    }
  }

  /**
   * The one place that moves a message between folders. The commit point is one rename, so
   * a crash leaves the message in exactly one folder. A name taken in the target folder
   * (a program that looked only in outgoing/) is never overwritten: the message takes a
   * fresh id that no folder holds.
   */
  async move(id: string, from: Folder, to: Folder): Promise<string> {
    const target = from !== to && !(await exists(this.pathOf(to, id))) ? id : await this.freshId();
    await fs.promises.rename(this.pathOf(from, id), this.pathOf(to, target));
    if (from === "outgoing_active") this.active.delete(id);
    if (target === id) {
      await this.moveBookkeeping(id, from, to);
    } else {
      await fs.promises.rename(this.pathOf(from, `.${id}`), this.pathOf(to, `.${target}`)).catch(() => undefined);
    }
    return target;
  }

  /**
   * Queue control, Postfix's postsuper: delete (-d), hold (-h), release (-H), requeue (-r: a
   * deferred message due now), of one message or ALL. Only messages that wait are touched;
   * one being delivered (outgoing_active/) is skipped, as is one a claim takes meanwhile.
   */
  async control(verb: ControlVerb, target: string): Promise<ControlResult> {
    const { from, to } = CONTROL[verb];
    const result: ControlResult = { done: [], skipped: [] };
    if (target === "ALL") {
      for (const folder of from) {
        for await (const { ids, badNames } of this.scanSlices(folder)) {
          for (const id of [...ids, ...(verb === "delete" && folder === "corrupt" ? badNames : [])]) await this.controlOne(verb, id, folder, to, result);
        }
      }
      return result;
    }
    const id = target;
    const all: Folder[] = ["outgoing", "outgoing_active", "deferred", "hold", "corrupt"];
    const found = QUEUE_ID.test(id) ? (await Promise.all(all.map((f) => exists(this.pathOf(f, id))))).findIndex(Boolean) : -1;
    const folder = found >= 0 ? all[found] : null;
    if (folder && from.includes(folder)) await this.controlOne(verb, id, folder, to, result);
    else result.skipped.push({ id, folder });
    return result;
  }

  private async controlOne(verb: ControlVerb, id: string, folder: Folder, to: Folder | null, result: ControlResult): Promise<void> {
    try {
      if (to === null) {
        await fs.promises.unlink(this.pathOf(folder, id));
        await fs.promises.unlink(this.pathOf(folder, `.${id}`)).catch(() => undefined);
        result.done.push(id);
        return;
      }
      if (verb === "requeue") {
        const book = await this.readBookkeeping(id, folder);
        if (book) await this.writeBookkeeping(id, folder, { ...book, nextAttempt: null });
      }
      result.done.push(await this.move(id, folder, to));
    } catch (err) {
      if (errno(err) !== "ENOENT") throw err;
      // Claimed (or moved) meanwhile: where is it now?
      result.skipped.push({ id, folder: (await exists(this.pathOf("outgoing_active", id))) ? "outgoing_active" : null });
    }
  }

  /** A request to the engine that holds the lock, as a file in .requests/; returns its name. */
  async putRequest(body: unknown): Promise<string> {
    await fs.promises.mkdir(path.join(this.dir, REQUESTS), { recursive: true, mode: 0o700 });
    const name = `${Date.now()}.${process.pid}.${this.tmpCounter++}`;
    await this.writeAside(path.join(this.dir, REQUESTS, name), JSON.stringify(body));
    return name;
  }

  /**
   * The requests waiting, each taken once (read, then unlinked: a request its asker withdrew
   * first is not taken); those older than a minute are dropped unread, as are stale answers.
   */
  async takeRequests(): Promise<Array<{ name: string; body: unknown }>> {
    const dir = path.join(this.dir, REQUESTS);
    const names = await fs.promises.readdir(dir).catch(() => [] as string[]);
    const taken: Array<{ name: string; body: unknown }> = [];
    for (const name of names.sort()) {
      const file = path.join(dir, name);
      const age = Date.now() - Number(name.split(".")[0]);
      if (name.endsWith(".answer")) {
        if (age > 3600_000) await fs.promises.unlink(file).catch(() => undefined);
        continue;
      }
      if (!/^\d+\.\d+\.\d+$/.test(name)) continue;
      const text = await fs.promises.readFile(file, "utf8").catch(() => null);
      const mine = await fs.promises.unlink(file).then(() => true, () => false);
      if (!mine || text === null || !(age <= REQUEST_MAX_AGE_MS)) continue;
      try {
        taken.push({ name, body: JSON.parse(text) });
      } catch {
        // Not ours to understand: dropped.
      }
    }
    return taken;
  }

  async answerRequest(name: string, answer: unknown): Promise<void> {
    await this.writeAside(path.join(this.dir, REQUESTS, `${name}.answer`), JSON.stringify(answer));
  }

  /** The answer to a request, taken (null while there is none). */
  async takeAnswer(name: string): Promise<unknown> {
    const file = path.join(this.dir, REQUESTS, `${name}.answer`);
    const text = await fs.promises.readFile(file, "utf8").catch(() => null);
    if (text === null) return null;
    await fs.promises.unlink(file).catch(() => undefined);
    return JSON.parse(text);
  }

  /** Takes a request back before the engine took it: true when it was still there. */
  async withdrawRequest(name: string): Promise<boolean> {
    return fs.promises.unlink(path.join(this.dir, REQUESTS, name)).then(() => true, () => false);
  }

  /** A small file written in tmp/ and renamed into place: readers see all of it or nothing. */
  private async writeAside(file: string, text: string): Promise<void> {
    const tmpPath = this.tmpPath();
    try {
      await writeExclusive(tmpPath, text + "\n", false);
      await fs.promises.rename(tmpPath, file);
    } catch (err) {
      await fs.promises.unlink(tmpPath).catch(() => undefined);
      throw err;
    }
  }

  /** The live process that holds the spool's lock, other than this one; null when none does. */
  holder(): number | null {
    const pid = lockHolder(path.resolve(this.dir, ".mudmail.lock"));
    return pid && pid !== process.pid && processAlive(pid) ? pid : null;
  }

  /**
   * The spool's lock, maildir/.mudmail.lock: one engine sends from a spool at a time. It is a
   * symbolic link whose target is the holder's pid: made in one call, exclusive, and, being
   * a name and an inode without data, it can be taken on a full disk, where sending (which
   * frees space) must go on. A lock whose process is gone is taken over.
   */
  lock(): void {
    const file = path.resolve(this.dir, ".mudmail.lock");
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        fs.symlinkSync(String(process.pid), file);
        lockTaken(file);
        this.lockFile = file;
        return;
      } catch (err) {
        if (errno(err) !== "EEXIST") throw err;
        const pid = lockHolder(file);
        if (pid && pid !== process.pid && processAlive(pid)) {
          throw new SpoolError(`another mudmail (pid ${pid}) is sending from ${this.dir}; remove ${file} if it is not running`, "ELOCKED");
        }
        if (pid === process.pid && LOCKED_HERE.has(file)) {
          throw new SpoolError(`another MailEngine in this process is sending from ${this.dir}`, "ELOCKED");
        }
        fs.rmSync(file, { force: true });
      }
    }
  }

  unlock(): void {
    if (!this.lockFile) return;
    LOCKED_HERE.delete(this.lockFile);
    fs.rmSync(this.lockFile, { force: true });
    this.lockFile = null;
  }

  private lockFile: string | null = null;

  /** Small engine state beside the folders (".state-NAME", JSON), e.g. hosts owed a plaintext attempt. */
  async readState(name: string): Promise<unknown> {
    try {
      return JSON.parse(await fs.promises.readFile(path.join(this.dir, `.state-${name}`), "utf8"));
    } catch {
      return null;
    }
  }

  async writeState(name: string, value: unknown): Promise<void> {
    await this.writeAside(path.join(this.dir, `.state-${name}`), JSON.stringify(value));
  }

  /** Mail in a spool someone else can write to could be read, changed or injected: refuse it. */
  private async checkOwnership(): Promise<void> {
    const uid = process.getuid?.();
    for (const dir of [this.dir, ...FOLDERS.map((f) => path.join(this.dir, f))]) {
      const st = await fs.promises.stat(dir);
      const problem = uid !== undefined && st.uid !== uid ? `is owned by uid ${st.uid}, not by this user (uid ${uid})`
        : st.mode & 0o022 ? `is writable by ${st.mode & 0o020 ? "its group" : "others"} (mode ${(st.mode & 0o777).toString(8)})` : null;
      if (problem) throw new SpoolError(`unsafe spool: ${dir} ${problem}; fix it (chown, chmod 700) or choose another --maildir`);
    }
  }

  /** After a crash: bookkeeping files whose message moved on are put beside it again. */
  private async repairBookkeeping(): Promise<void> {
    const folders: Folder[] = ["outgoing", "outgoing_active", "deferred", "hold", "corrupt"];
    const listing = new Map<Folder, Set<string>>();
    for (const f of folders) listing.set(f, new Set(await fs.promises.readdir(path.join(this.dir, f))));
    for (const f of folders) {
      for (const name of listing.get(f)!) {
        if (!name.startsWith(".") || listing.get(f)!.has(name.slice(1))) continue;
        const id = name.slice(1);
        const home = folders.find((g) => listing.get(g)!.has(id));
        if (home) await this.moveBookkeeping(id, f, home);
        else await fs.promises.unlink(this.pathOf(f, name)).catch(() => undefined);
      }
    }
  }

  /** Files left in tmp/ by a crash of this program are not messages yet: remove old ones. */
  private async sweepTmp(): Promise<void> {
    const cutoff = Date.now() - 3600_000;
    for (const name of await fs.promises.readdir(path.join(this.dir, "tmp"))) {
      const file = this.pathOf("tmp", name);
      const st = await fs.promises.stat(file).catch(() => null);
      if (st && st.mtimeMs < cutoff) await fs.promises.unlink(file).catch(() => undefined);
    }
  }

  /**
   * Reads and checks a message's envelope and the start of its content: one open, one
   * read and one close for a message up to CHUNK bytes.
   */
  async open(id: string, folder: Folder = "outgoing_active"): Promise<QueuedMessage> {
    const file = this.pathOf(folder, id);
    const fd = fs.openSync(file, "r");
    try {
      const stat = fs.fstatSync(fd);
      const fileSize = stat.size;
      // As much as the message holds (a whole one up to WHOLE), else CHUNK: no fresh 64 KiB
      // for a 1 KB message, one read for a 100 KB one.
      const whole = fileSize <= WHOLE;
      let buf = Buffer.allocUnsafe(Math.max(1, whole ? fileSize : CHUNK));
      let length = readFullySync(fd, buf, 0);
      let envelope = findEnvelope(buf, length, length >= fileSize);
      if (!envelope && !whole) {
        const more = Buffer.allocUnsafe(Math.min(fileSize, MAX_ENVELOPE));
        buf.copy(more, 0, 0, length);
        length += readFullySync(fd, more, length);
        buf = more;
        envelope = findEnvelope(buf, length, length >= fileSize);
      }
      if (!envelope) throw new CorruptMessageError(id, describeMissingEnvelope(buf, length, fileSize));
      const sender = parseSender(id, envelopeText(id, buf.subarray(0, envelope.senderEnd), "sender"));
      const recipients = parseRecipients(id, envelopeText(id, buf.subarray(envelope.recipientsStart, envelope.recipientsEnd), "recipient"));
      const contentOffset = envelope.contentOffset;
      const head = buf.subarray(contentOffset, whole ? length : Math.min(length, contentOffset + CHUNK));
      return {
        id, sender, recipients, folder,
        arrival: arrivalOf(id, stat),
        size: fileSize - contentOffset,
        contentOffset,
        head,
        whole: contentOffset + head.length >= fileSize,
      };
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * The message's header block (up to and including the line end before the blank line),
   * for a bounce: read in CHUNK pieces until the blank line, at most `max` bytes.
   */
  async headerBlock(msg: QueuedMessage, max = 1024 * 1024): Promise<Buffer> {
    let seen = Buffer.alloc(0);
    for await (const chunk of this.content(msg)) {
      seen = Buffer.concat([seen, chunk]);
      const lf = seen.indexOf("\n\n");
      const crlf = seen.indexOf("\r\n\r\n");
      const ends = [lf >= 0 ? lf + 1 : -1, crlf >= 0 ? crlf + 2 : -1].filter((n) => n >= 0);
      if (ends.length > 0) return seen.subarray(0, Math.min(...ends));
      if (seen.length >= max) return seen.subarray(0, max);
    }
    return seen;
  }

  /**
   * Reads the content (line 3 on) in CHUNK pieces. With `reuse`, every piece is a view of one
   * buffer, valid until the next: for readers that do not keep the pieces (memory stays flat).
   */
  async *content(msg: QueuedMessage, options: { reuse?: boolean } = {}): AsyncGenerator<Buffer> {
    if (msg.whole) {
      yield msg.head;
      return;
    }
    const fd = await fsOpen(this.pathOf(msg.folder, msg.id));
    const shared = options.reuse ? Buffer.allocUnsafe(CHUNK) : null;
    try {
      let position = msg.contentOffset;
      for (;;) {
        const buf = shared ?? Buffer.allocUnsafe(CHUNK);
        const n = await fsRead(fd, buf, position);
        if (n === 0) return;
        position += n;
        yield buf.subarray(0, n);
      }
    } finally {
      fsClose(fd);
    }
  }
}

/* ------------------------------------------------------------------------------------ */
/* The queue listing                                                                     */

/** One message of the queue listing, SPEC section 5. */
export interface QueueEntry {
  id: string;
  /** hold: put on hold by an operator (--hold), never sent until released. */
  state: "queued" | "active" | "deferred" | "hold" | "corrupt";
  sender: string | null;
  recipients: string[];
  size: number;
  queuedAt: string;
  attempts: number;
  nextAttempt: string | null;
  lastError: string | null;
  /** The end of the suspension (--suspend, a reply rule) that holds its recipients' destination back; null when none does. */
  suspendedUntil: string | null;
}

/**
 * Every message in the spool, oldest first: the data of --queue and --queue --json (SPEC
 * section 5). `suspendedEnds` reads the spool's suspension state (policy.ts's format; the
 * spool stands on nothing of ours) into domain -> end of its suspension, epoch ms.
 */
export async function queueEntries(spool: Spool, suspendedEnds: (state: unknown) => Map<string, number> = () => new Map()): Promise<QueueEntry[]> {
  await spool.init();
  const states = [["outgoing", "queued"], ["outgoing_active", "active"], ["deferred", "deferred"], ["hold", "hold"], ["corrupt", "corrupt"]] as const;
  const entries: QueueEntry[] = [];
  const suspended = suspendedEnds(await spool.readState("suspended"));
  const suspendedUntil = (recipients: string[]): string | null => {
    const ends = recipients.map((r) => suspended.get(r.slice(r.lastIndexOf("@") + 1).toLowerCase())).filter((u): u is number => u !== undefined);
    return ends.length > 0 ? new Date(Math.min(...ends)).toISOString() : null;
  };
  for (const [folder, state] of states) {
    const { ids, booked, badNames } = await spool.scan(folder);
    for (const id of [...ids, ...(folder === "corrupt" ? badNames : [])]) {
      // Read only where the listing showed one: a failed read for each message without
      // bookkeeping (most of outgoing/) cost a trip through the thread pool apiece.
      const book = booked.has(id) ? await spool.readBookkeeping(id, folder) : null;
      const base = { id, state, attempts: book?.attempts ?? 0, nextAttempt: book?.nextAttempt ? new Date(book.nextAttempt).toISOString() : null, lastError: book?.lastError ?? null, suspendedUntil: null };
      try {
        const msg = await spool.open(id, folder);
        entries.push({ ...base, sender: msg.sender, recipients: msg.recipients, size: msg.size, queuedAt: new Date(msg.arrival).toISOString(),
          suspendedUntil: folder === "corrupt" ? null : suspendedUntil(msg.recipients) });
      } catch (err) {
        if (errno(err) === "ENOENT") continue; // sent or moved while we listed
        const st = await fs.promises.stat(spool.pathOf(folder, id)).catch(() => null);
        if (!st) continue;
        entries.push({ ...base, sender: null, recipients: [], size: st.size, queuedAt: new Date(st.mtimeMs).toISOString(),
          lastError: base.lastError ?? (err as Error).message });
      }
    }
  }
  return byArrival(entries);
}

/**
 * Oldest first, then by queue id as numbers (<time>.<subtime>). The keys are made once per
 * entry: a comparison that parsed or collated strings made a listing of 50,000 take seconds.
 */
function byArrival(entries: QueueEntry[]): QueueEntry[] {
  const keyed = entries.map((entry) => {
    const dot = entry.id.indexOf(".");
    const seconds = Number(entry.id.slice(0, dot < 0 ? undefined : dot));
    const sub = dot < 0 ? 0 : Number(entry.id.slice(dot + 1));
    return { entry, at: Date.parse(entry.queuedAt), seconds: Number.isFinite(seconds) ? seconds : Number.MAX_VALUE, sub: Number.isFinite(sub) ? sub : Number.MAX_VALUE };
  });
  keyed.sort((a, b) => a.at - b.at || a.seconds - b.seconds || a.sub - b.sub || (a.entry.id < b.entry.id ? -1 : a.entry.id > b.entry.id ? 1 : 0));
  return keyed.map((k) => k.entry);
}

/* ------------------------------------------------------------------------------------ */
/* The envelope lines                                                                    */

interface EnvelopeSpan {
  senderEnd: number;
  recipientsStart: number;
  recipientsEnd: number;
  contentOffset: number;
}

function findEnvelope(buf: Buffer, length: number, atEof: boolean): EnvelopeSpan | null {
  const view = buf.subarray(0, length);
  const first = view.indexOf(0x0a);
  if (first < 0) return null;
  const second = view.indexOf(0x0a, first + 1);
  if (second < 0) {
    // A file that ends right after the recipient line, without a newline, has no message
    // lines; it is still a message (an empty one).
    if (!atEof) return null;
    return { senderEnd: stripCR(buf, first), recipientsStart: first + 1, recipientsEnd: length, contentOffset: length };
  }
  return { senderEnd: stripCR(buf, first), recipientsStart: first + 1, recipientsEnd: stripCR(buf, second), contentOffset: second + 1 };
}

function stripCR(buf: Buffer, lf: number): number {
  return lf > 0 && buf[lf - 1] === 0x0d ? lf - 1 : lf;
}

function describeMissingEnvelope(buf: Buffer, length: number, fileSize: number): string {
  if (fileSize === 0) return "empty file, no sender line";
  if (buf.subarray(0, length).indexOf(0x0a) < 0) {
    return length >= MAX_ENVELOPE ? "sender line longer than 1 MiB" : "no recipient line";
  }
  return "recipient line longer than 1 MiB";
}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true });

/** An envelope line as text; bytes that are not UTF-8 would change the address, so they make the file corrupt. */
function envelopeText(id: string, bytes: Buffer, what: string): string {
  try {
    return STRICT_UTF8.decode(bytes);
  } catch {
    throw new CorruptMessageError(id, `the ${what} line is not valid UTF-8`);
  }
}

function parseSender(id: string, line: string): string {
  const text = line.replace(/\r$/, "").trim();
  if (text === "" || text === "<>") return "";
  const problem = addressProblem(text);
  if (problem) throw new CorruptMessageError(id, `bad sender ${JSON.stringify(text)}: ${problem}`);
  return stripBrackets(text);
}

function parseRecipients(id: string, line: string): string[] {
  const tokens = splitRecipients(line.replace(/\r$/, ""));
  if (tokens === null) throw new CorruptMessageError(id, "unbalanced quotes or brackets in the recipient line");
  if (tokens.length === 0) throw new CorruptMessageError(id, "no recipients");
  const recipients = new Set<string>();
  for (const token of tokens) {
    const problem = addressProblem(token);
    if (problem) throw new CorruptMessageError(id, `bad recipient ${JSON.stringify(token)}: ${problem}`);
    recipients.add(stripBrackets(token));
  }
  return [...recipients];
}

/** Splits the recipient line on commas and white space outside quotes and brackets. */
export function splitRecipients(line: string): string[] | null {
  const tokens: string[] = [];
  let current = "";
  let quoted = false;
  let bracketed = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      current += c;
      if (c === "\\" && i + 1 < line.length) current += line[++i];
      else if (c === '"') quoted = false;
    } else if (c === '"') {
      quoted = true;
      current += c;
    } else if (c === "<" && !bracketed) {
      bracketed = true;
      current += c;
    } else if (c === ">" && bracketed) {
      bracketed = false;
      current += c;
    } else if (!bracketed && (c === "," || c === " " || c === "\t")) {
      if (current) tokens.push(current);
      current = "";
    } else {
      current += c;
    }
  }
  if (quoted || bracketed) return null;
  if (current) tokens.push(current);
  return tokens;
}

function stripBrackets(text: string): string {
  return text.startsWith("<") && text.endsWith(">") ? text.slice(1, -1) : text;
}

const ATOM_CHAR = /^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\uffff-]$/u;

/**
 * Why an envelope address cannot be written into MAIL FROM or RCPT TO, or null when it can:
 * addr@domain (optionally in <>), a dot-atom or quoted local part, a domain name or an
 * address literal; no control bytes, no <, > or spaces outside quotes.
 */
export function addressProblem(raw: string): string | null {
  let text = raw;
  if (text.startsWith("<") || text.endsWith(">")) {
    if (!(text.startsWith("<") && text.endsWith(">"))) return "unbalanced angle brackets";
    text = text.slice(1, -1);
  }
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(text)) return "control character in address";
  if (Buffer.byteLength(text) > 320) return "address longer than 320 octets";
  const at = text.lastIndexOf("@");
  if (at < 0) return "not of the form addr@domain";
  const local = text.slice(0, at);
  const domain = text.slice(at + 1);
  if (local === "") return "empty local part";
  const localProblem = local.startsWith('"') ? quotedLocalProblem(local) : dotAtomProblem(local);
  if (localProblem) return localProblem;
  return domainProblem(domain);
}

function dotAtomProblem(local: string): string | null {
  for (const atom of local.split(".")) {
    if (atom === "") return "empty atom in local part (leading, trailing or double dot)";
    for (const c of atom) if (!ATOM_CHAR.test(c)) return `character ${JSON.stringify(c)} not allowed in local part`;
  }
  return null;
}

function quotedLocalProblem(local: string): string | null {
  if (local.length < 2 || !local.endsWith('"')) return "bad quoted local part";
  const inner = local.slice(1, -1);
  for (let i = 0; i < inner.length; i++) {
    if (inner[i] === "\\") i++;
    else if (inner[i] === '"') return "bad quoted local part";
  }
  return null;
}

function domainProblem(domain: string): string | null {
  if (domain === "") return "empty domain";
  if (domain.startsWith("[")) {
    return /^\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]$/.test(domain) ? null : "bad address literal";
  }
  if (domain.length > 255) return "domain longer than 255 octets";
  for (const label of domain.split(".")) {
    if (!/^[A-Za-z0-9\u0080-\uffff](?:[A-Za-z0-9\u0080-\uffff-]{0,61}[A-Za-z0-9\u0080-\uffff])?$/u.test(label)) {
      return `bad domain ${JSON.stringify(domain)}`;
    }
  }
  return null;
}

/* ------------------------------------------------------------------------------------ */
/* The content: header facts and the stuffer                                             */

/** What the engine must know of the header block before it sends: what to add, where. */
export interface HeaderFacts {
  hasDate: boolean;
  hasMessageId: boolean;
  hasFrom: boolean;
  /** The content starts with a header; false means it is all body and a blank line must precede it. */
  startsWithHeader: boolean;
  /** The header block ended within the bytes seen. */
  complete: boolean;
}

const CR = 0x0d, LF = 0x0a, DOT = 0x2e;

/**
 * Scans the header block across chunks, keeping only the start of the current line. Line
 * ends are the stuffer's: CR, LF or CRLF, so it sees the lines the server will see.
 */
export class HeaderScan {
  readonly facts: HeaderFacts = { hasDate: false, hasMessageId: false, hasFrom: false, startsWithHeader: false, complete: false };
  private afterCR = false;
  private lines = 0;
  /* The current line, as far as the scan needs it: its first byte, whether it is still a
     field name (printable, no colon yet), the name's start, and whether a colon ended it. */
  private lineStarted = false;
  private first = -1;
  private inName = true;
  private nameLength = 0;
  private name = "";
  private colon = false;

  push(chunk: Buffer): void {
    for (let i = 0; i < chunk.length && !this.facts.complete; i++) {
      const b = chunk[i];
      if (this.afterCR) {
        this.afterCR = false;
        if (b === LF) continue;
      }
      if (b === CR || b === LF) {
        this.afterCR = b === CR;
        this.endLine();
        continue;
      }
      if (!this.lineStarted) {
        this.lineStarted = true;
        this.first = b;
      }
      if (!this.inName) continue;
      if (b === 0x3a) {
        this.inName = false;
        this.colon = this.nameLength > 0;
      } else if (b >= 0x21 && b <= 0x7e) {
        this.nameLength++;
        if (this.name.length < 16) this.name += String.fromCharCode(b | 0x20);
      } else {
        this.inName = false;
      }
    }
  }

  /** End of content: a last line without a newline still counts. */
  end(): HeaderFacts {
    if (this.lineStarted && !this.facts.complete) this.endLine();
    this.facts.complete = true;
    return this.facts;
  }

  private endLine(): void {
    const started = this.lineStarted, first = this.first, isField = this.colon;
    const name = this.nameLength <= 16 ? this.name : "";
    this.lineStarted = false;
    this.first = -1;
    this.inName = true;
    this.nameLength = 0;
    this.name = "";
    this.colon = false;
    const firstLine = this.lines++ === 0;
    if (!started) {
      this.facts.complete = true;
    } else if ((first === 0x20 || first === 0x09) && !firstLine) {
      // a folded continuation of the previous header
    } else if (isField) {
      if (firstLine) this.facts.startsWithHeader = true;
      if (name === "date") this.facts.hasDate = true;
      else if (name === "message-id") this.facts.hasMessageId = true;
      else if (name === "from") this.facts.hasFrom = true;
    } else {
      this.facts.complete = true;
    }
  }
}

/** RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
export const MAX_LINE = 998;

/**
 * The stuffer (the scsh seed's smtp-stuff): CRLF for every bare CR, bare LF or CRLF, a
 * second dot for a dot at the start of a line, and state carried across chunks so a CR at
 * the end of one chunk and an LF at the start of the next make one line end. A line longer
 * than 998 octets is broken with CRLF and a space, as Postfix's smtp_line_length_limit does:
 * nothing is lost, and a folded header stays one header. It works in runs: the next line
 * end is found with indexOf and the bytes up to it are copied whole, never byte by byte.
 */
export class Stuffer {
  private atLineStart = true;
  private afterCR = false;
  /** Octets of the current output line so far. */
  private column = 0;
  /** Lines broken at MAX_LINE so far. */
  folded = 0;
  /** Whether any byte pushed had the high bit set (8BITMIME). */
  eightBit = false;

  /**
   * Stuffs a chunk; the result is a new buffer, or a view into `into` when it is given and
   * large enough (2 × chunk + 4 octets).
   */
  push(chunk: Buffer, into?: Buffer): Buffer {
    const need = chunk.length * 2 + 4;
    const out = into && into.length >= need ? into : Buffer.allocUnsafe(need);
    return out.subarray(0, this.run(chunk, out));
  }

  /** Stuffs into `out`, which must hold what count() said this chunk makes; returns the octets written. */
  into(chunk: Buffer, out: Buffer): number {
    return this.run(chunk, out);
  }

  /** How many octets push() would make of this chunk, with the same effect on the state: a measuring pass writes nothing. */
  count(chunk: Buffer): number {
    return this.run(chunk, null);
  }

  /** The stuffing itself, writing into `out` when it is given; returns the octets made. */
  private run(chunk: Buffer, out: Buffer | null): number {
    if (!this.eightBit && !isAscii(chunk)) this.eightBit = true;
    const n = chunk.length;
    let j = 0;
    let atLineStart = this.atLineStart;
    let afterCR = this.afterCR;
    let column = this.column;
    // The next CR and LF at or after i: -2 not looked for yet, -1 none left in this chunk.
    let nextCR = -2;
    let nextLF = -2;
    for (let i = 0; i < n;) {
      if (atLineStart && !afterCR) {
        // Whole lines that need nothing (CRLF, no dot first, not too long) are copied as one
        // run; a line that needs only its bare LF made CRLF (a queue file's usual line) or
        // a dot put first ends the run, with the CR or dot put in. Lines with a CR inside,
        // too long or not ended in this chunk go the byte-by-byte way below.
        let p = i; // the run not yet copied starts here
        let q = i; // the line being looked at starts here
        for (;;) {
          if (nextLF !== -1 && nextLF < q) nextLF = chunk.indexOf(LF, q);
          const lf = nextLF;
          if (lf < 0) break;
          if (nextCR !== -1 && nextCR < q) nextCR = chunk.indexOf(CR, q);
          if (nextCR !== -1 && nextCR < lf - 1) break; // a CR inside the line
          const crlf = lf > q && nextCR === lf - 1;
          const dot = chunk[q] === DOT;
          if ((crlf ? lf - 1 : lf) - q + (dot ? 1 : 0) > MAX_LINE) break;
          if (dot) {
            if (out) {
              if (q > p) chunk.copy(out, j, p, q);
              out[j + q - p] = DOT;
            }
            j += q - p + 1;
            p = q;
          }
          if (!crlf) {
            if (out) {
              chunk.copy(out, j, p, lf);
              out[j + lf - p] = CR;
              out[j + lf - p + 1] = LF;
            }
            j += lf - p + 2;
            p = lf + 1;
          }
          q = lf + 1;
        }
        if (q > p) {
          if (out) chunk.copy(out, j, p, q);
          j += q - p;
        }
        if (q > i) {
          i = q;
          if (i >= n) break;
        }
      }
      const b = chunk[i];
      if (afterCR) {
        afterCR = false;
        if (b === LF) {
          i++;
          continue;
        }
      }
      if (b === CR || b === LF) {
        if (out) {
          out[j] = CR;
          out[j + 1] = LF;
        }
        j += 2;
        atLineStart = true;
        afterCR = b === CR;
        column = 0;
        i++;
        continue;
      }
      if (column >= MAX_LINE) {
        if (out) {
          out[j] = CR;
          out[j + 1] = LF;
          out[j + 2] = 0x20;
        }
        j += 3;
        column = 1;
        this.folded++;
      }
      if (atLineStart) {
        atLineStart = false;
        if (b === DOT) {
          if (out) out[j] = DOT;
          j++;
          column++;
        }
      }
      if (nextCR !== -1 && nextCR < i) nextCR = chunk.indexOf(CR, i);
      if (nextLF !== -1 && nextLF < i) nextLF = chunk.indexOf(LF, i);
      let end = nextCR === -1 ? (nextLF === -1 ? n : nextLF) : nextLF === -1 ? nextCR : Math.min(nextCR, nextLF);
      if (end - i > MAX_LINE - column) end = i + (MAX_LINE - column);
      if (out) chunk.copy(out, j, i, end);
      j += end - i;
      column += end - i;
      i = end;
    }
    this.atLineStart = atLineStart;
    this.afterCR = afterCR;
    this.column = column;
    return j;
  }

  /** The end of data: CRLF first when the content did not end with a line end. */
  end(): Buffer {
    return Buffer.from(this.atLineStart ? ".\r\n" : "\r\n.\r\n");
  }
}

enum Dot { LineStart, Mid, Cr, Dot, DotCr }

/**
 * SMTP DATA framing (RFC 5321 4.5.2): finds the end, CRLF "." CRLF and nothing else, and
 * removes the dot-stuffing. push() returns the message bytes of a chunk (pieces of it, no
 * copy) and, when the end was in it, where the bytes after the end start. State carries
 * across chunks, so the end and the stuffing are found whatever the packet boundaries.
 * A line start is the start of the message or the byte after a CRLF: a bare LF or CR is
 * message content, never part of the end (SMTP smuggling).
 */
export class DotDecoder {
  /** Octets of message content seen so far. */
  size = 0;
  private state = Dot.LineStart;

  push(chunk: Buffer, from = 0): { out: Buffer[]; done: boolean; next: number } {
    const out: Buffer[] = [];
    const n = chunk.length;
    let i = from;
    let run = from;
    const cut = (end: number) => {
      if (end > run) out.push(chunk.subarray(run, end));
    };
    while (i < n) {
      switch (this.state) {
        case Dot.Mid: {
          const cr = chunk.indexOf(CR, i);
          if (cr < 0) {
            i = n;
          } else {
            i = cr + 1;
            this.state = Dot.Cr;
          }
          break;
        }
        case Dot.Cr: {
          const b = chunk[i++];
          this.state = b === LF ? Dot.LineStart : b === CR ? Dot.Cr : Dot.Mid;
          break;
        }
        case Dot.LineStart: {
          const b = chunk[i];
          if (b === DOT) {
            cut(i); // the dot is held: stuffing, or the start of the end
            i++;
            run = i;
            this.state = Dot.Dot;
          } else {
            i++;
            this.state = b === CR ? Dot.Cr : Dot.Mid;
          }
          break;
        }
        case Dot.Dot: {
          if (chunk[i] === CR) {
            i++;
            run = i; // the CR is held too
            this.state = Dot.DotCr;
          } else {
            this.state = Dot.Mid; // a stuffed dot: dropped; the byte is looked at again as content
          }
          break;
        }
        case Dot.DotCr: {
          if (chunk[i] === LF) {
            this.size += out.reduce((sum, b) => sum + b.length, 0);
            this.state = Dot.LineStart;
            return { out, done: true, next: i + 1 };
          }
          // "." CR then not LF: the dot was stuffing, the CR is content; the byte is looked at again.
          out.push(CR_BUF);
          run = i;
          this.state = Dot.Cr;
          break;
        }
      }
    }
    cut(n);
    this.size += out.reduce((sum, b) => sum + b.length, 0);
    return { out, done: false, next: n };
  }
}

const CR_BUF = Buffer.from([CR]);

/** Wire bytes of a message: prefix (headers the engine adds), stuffed content, CRLF.CRLF. */
export interface Wire {
  /** Octets after DATA, the terminator included (what SIZE= declares). */
  size: number;
  eightBit: boolean;
  /** The whole wire form for a message that was read in one piece, else null (stream it). */
  bytes: Buffer | null;
  facts: HeaderFacts;
}

/**
 * Measures a message on the wire and, for one read in one piece, builds it. Large
 * messages are streamed once through the stuffer here to count, and again when sent.
 */
export async function measureWire(spool: Spool, msg: QueuedMessage, makePrefix: (facts: HeaderFacts) => Buffer): Promise<Wire> {
  const scan = new HeaderScan();
  if (msg.whole) {
    scan.push(msg.head);
    const facts = scan.end();
    const prefix = makePrefix(facts);
    // One pass to count, one to stuff straight into memory of exactly the wire's size (its
    // own, not a pool's: the worker hands it over without a copy).
    const counter = new Stuffer();
    const size = prefix.length + counter.count(msg.head) + counter.end().length;
    const bytes = Buffer.allocUnsafeSlow(size);
    prefix.copy(bytes, 0);
    const stuffer = new Stuffer();
    const body = stuffer.into(msg.head, bytes.subarray(prefix.length));
    stuffer.end().copy(bytes, prefix.length + body);
    return { size, eightBit: stuffer.eightBit, bytes, facts };
  }
  let size = 0;
  const stuffer = new Stuffer();
  for await (const chunk of spool.content(msg, { reuse: true })) {
    if (!scan.facts.complete) scan.push(chunk);
    size += stuffer.count(chunk);
  }
  const facts = scan.end();
  size += makePrefix(facts).length + stuffer.end().length;
  return { size, eightBit: stuffer.eightBit, bytes: null, facts };
}

/**
 * The wire form of a large message, chunk by chunk, read from the file as it is sent. With
 * `reuse`, each chunk is a view of one buffer, valid until the generator resumes: the caller
 * must be done with it (written out) before asking for the next.
 */
export async function* wireChunks(spool: Spool, msg: QueuedMessage, prefix: Buffer, options: { reuse?: boolean } = {}): AsyncGenerator<Buffer> {
  const stuffer = new Stuffer();
  const out = options.reuse ? Buffer.allocUnsafe(CHUNK * 2 + 4) : undefined;
  yield prefix;
  // The stuffer copies each piece out of the read buffer, so that one can be reused always.
  for await (const chunk of spool.content(msg, { reuse: true })) yield stuffer.push(chunk, out);
  yield stuffer.end();
}

/** Locks this process holds: removed at exit, whatever the engines did. */
const LOCKED_HERE = new Set<string>();
/** Requests to the engine that holds the lock (queue control from the command line). */
const REQUESTS = ".requests";
let exitHookSet = false;

function lockTaken(file: string): void {
  if (!exitHookSet) {
    exitHookSet = true;
    process.once("exit", () => {
      for (const held of LOCKED_HERE) fs.rmSync(held, { force: true });
    });
  }
  LOCKED_HERE.add(file);
}

/** The pid a lock names: its link target, or the content of a lock file an older mudmail wrote. */
function lockHolder(file: string): number {
  try {
    return Number(fs.readlinkSync(file));
  } catch (err) {
    if (errno(err) !== "EINVAL") return 0;
    return Number(fs.readFileSync(file, "utf8").trim());
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errno(err) === "EPERM";
  }
}

/* ------------------------------------------------------------------------------------ */
/* Small file-system helpers: callback fs, cheaper than fs.promises' FileHandle per call */

/** Links `from` to the new name `to`; false when that name is taken. */
async function linkIfFree(from: string, to: string): Promise<boolean> {
  try {
    await fs.promises.link(from, to);
    return true;
  } catch (err) {
    if (errno(err) === "EEXIST") return false;
    throw err;
  }
}

/** fsync a directory, so the names just made in it survive a power cut. */
export async function syncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, "r");
  try {
    await handle.sync();
  } catch (err) {
    // Some file systems cannot fsync a directory; their names are as safe as they get.
    if (errno(err) !== "EINVAL" && errno(err) !== "EISDIR") throw err;
  } finally {
    await handle.close();
  }
}

async function writeExclusive(file: string, content: Buffer | string, sync: boolean): Promise<void> {
  const handle = await fs.promises.open(file, "wx", 0o600);
  try {
    await handle.writeFile(content);
    if (sync) await handle.sync();
  } finally {
    await handle.close();
  }
}

function fsOpen(file: string): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, "r", (err, fd) => (err ? reject(err) : resolve(fd))));
}

function fsRead(fd: number, buf: Buffer, position: number, offset = 0): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buf, offset, buf.length - offset, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function fsClose(fd: number): void {
  fs.close(fd, () => undefined);
}

/** A queue id's seconds are its arrival; another program's name has its file's mtime. */
function arrivalOf(id: string, stat: fs.Stats): number {
  const match = /^(\d{9,11})\./.exec(id);
  return match ? Number(match[1]) * 1000 : stat.mtimeMs;
}

/** Reads into buf from `from` on (file position = buffer offset) until it is full or the file ends. */
function readFullySync(fd: number, buf: Buffer, from: number): number {
  let total = 0;
  while (from + total < buf.length) {
    const n = fs.readSync(fd, buf, from + total, buf.length - from - total, from + total);
    if (n === 0) break;
    total += n;
  }
  return total;
}

function exists(file: string): Promise<boolean> {
  return fs.promises.access(file).then(() => true, () => false);
}

/** "no space left on device (ENOSPC)": the cause in words, then its code. */
function describeErrno(err: NodeJS.ErrnoException): string {
  const words: Record<string, string> = {
    ENOSPC: "no space left on device", EDQUOT: "disk quota exceeded", EIO: "input/output error",
    EROFS: "read-only file system", EACCES: "permission denied", ENOENT: "a spool folder is missing", ENOTDIR: "a spool folder is not a directory",
  };
  return `${words[err.code!] ?? err.message} (${err.code})`;
}

export function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | null)?.code;
}
