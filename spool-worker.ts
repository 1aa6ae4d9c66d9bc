/*
 * NAME
 *   spool-worker.ts - the spool's file work on a worker thread, off the host's event loop
 *
 * SYNOPSIS
 *   const spool = new SpoolThread("maildir", { fsync: true, helo, dkimKeys });
 *   const { recovered } = await spool.init({ recover: true });
 *   await spool.scan("outgoing", (ids, badNames) => enqueue(ids));   // in slices, as read
 *   const ready = await spool.prepare(id, "outgoing");  // claimed, read, measured, signed
 *   for await (const chunk of spool.wireChunks(ready.msg, ready.prefix)) await written(chunk);
 *   await spool.complete(id, booked) | release(id, to, book) | rewriteRecipients(msg, rcpts)
 *   await spool.close();
 *
 * DESCRIPTION
 *   A talker's loop must never wait on its disk. Every file call the engine makes while it
 *   sends (claim, read, measure, sign, rewrite, release, unlink, and new mail from send())
 *   runs here, on a worker thread the engine owns: the loop does the sockets, a second CPU
 *   does the disk, the stuffing and the DKIM signatures. The worker runs queue.ts's Spool, so
 *   the spool's crash-state table is unchanged: the same code moves the same files.
 *
 *   Requests made in one turn of the host's loop leave in one message; the worker answers
 *   them in order, in one message for all that finish together. Wire bytes come back as
 *   transferred memory (no copy). A directory is listed in slices, each its own message, so
 *   a queue of any size never holds the loop for long. The worker is started on first use,
 *   keeps the process alive only while a request waits, and is restarted if it dies.
 *
 *   The same module is the worker's code: started with the role in workerData, it serves.
 *   dist/ bundles carry it as a string (build.mjs), so a host that bundles mudmail needs no
 *   file beside its bundle.
 *
 * DIAGNOSTICS
 *   A request fails with the error the spool raised in the worker, rebuilt with its class
 *   (SpoolError, CorruptMessageError, MailError) and code; a worker that dies fails every
 *   request waiting with a MailError (EWORKER), and the next request starts a new one.
 */

import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { MailError } from "./smtp-codes.js";
import { addedHeaders, messageIdOf } from "./compose.js";
import { signByFrom, type DkimKey } from "./dkim.js";
import { PolicyFiles, type CachedPolicy, type PolicyStore } from "./tls-policy.js";
import { suspendedDomains } from "./policy.js";
import {
  CorruptMessageError, Spool, SpoolError, measureWire, queueEntries, wireChunks,
  type Bookkeeping, type ControlResult, type ControlVerb, type Folder, type QueuedMessage, type QueueEntry, type Wire,
} from "./queue.js";

/** A queue file as the engine keeps it: what open() found, without the content. */
export type MessageInfo = Omit<QueuedMessage, "head">;

/** What prepare() made of a queued message. */
export type Prepared =
  /** Someone else took it first. */
  | { kind: "gone" }
  /** It cannot be parsed: the caller quarantines it. */
  | { kind: "corrupt"; id: string; reason: string }
  /** It could not be read; it went back where it came from (under `putBack`). */
  | { kind: "unreadable"; id: string; putBack: string; error: string }
  | {
    kind: "ready";
    id: string;
    /** Its bookkeeping came with it. */
    booked: boolean;
    book: Bookkeeping | null;
    msg: MessageInfo;
    wire: Wire;
    /** The header fields put before the message (DKIM signature included). */
    prefix: Buffer;
    /** Lines for the log ("not DKIM-signed: ..."). */
    notes: string[];
    /** Its Message-ID as it goes on the wire (the message's, or the one the engine adds), for the cleanup log line. */
    messageId: string | null;
  };

export interface SpoolThreadOptions {
  fsync?: boolean;
  /** For the Date:, Message-ID: and From: the engine adds. */
  helo: string;
  /** DKIM keys: messages are signed when prepared, once (a kept prefix is sent again as it was). */
  dkimKeys?: DkimKey[];
}

interface Request { n: number; op: string; args: unknown[] }
type Reply =
  | { n: number; ok: true; value: unknown }
  | { n: number; ok: false; error: { name: string; message: string; code?: string; queueId?: string; reason?: string } }
  /** A slice of a streamed answer (a directory listing); the final reply follows. */
  | { n: number; slice: unknown };

const ROLE = "mudmail-spool";

/** Set by build.mjs in the bundles: the worker's code, as one script. */
declare const MUDMAIL_SPOOL_WORKER: string | undefined;

/* ------------------------------------------------------------------------------------ */
/* The host's side                                                                        */

let sourceBundle: string | null = null;

/**
 * The worker's code as one script: from the bundle build.mjs made, or, running from source
 * (the tests), bundled here once per process the way build.mjs does it (starting a worker
 * on the TypeScript files themselves takes seconds).
 */
function workerCode(): string {
  if (typeof MUDMAIL_SPOOL_WORKER === "string") return MUDMAIL_SPOOL_WORKER;
  if (sourceBundle === null) {
    let esbuild: typeof import("esbuild");
    try {
      esbuild = createRequire(import.meta.url)("esbuild") as typeof import("esbuild");
    } catch {
      throw new MailError("the spool worker's code is missing: import mudmail from its package entry (dist/index.js, which carries it), " +
        "or run from the source tree with esbuild installed", "EWORKER");
    }
    const built = esbuild.buildSync({
      entryPoints: [fileURLToPath(import.meta.url)], bundle: true, platform: "node", target: "node20", format: "cjs", write: false,
      logLevel: "warning", define: { "import.meta.url": '"file:///mudmail-spool-worker"' },
    });
    sourceBundle = built.outputFiles[0].text;
  }
  return sourceBundle;
}

export class SpoolThread {
  readonly dir: string;
  readonly #options: SpoolThreadOptions;
  #worker: Worker | null = null;
  #next = 1;
  readonly #waiting = new Map<number, { resolve: (value: unknown) => void; reject: (err: Error) => void; slice?: (value: unknown) => void }>();
  #outbox: Request[] = [];
  /** Bodies streamed so far (their handles). */
  #bodies = 0;
  /** Memory handed back to the worker with the outbox (bodies' buffers, to be filled again). */
  #outboxMoves: ArrayBuffer[] = [];

  constructor(dir: string, options: SpoolThreadOptions) {
    this.dir = dir;
    this.#options = options;
  }

  /** Starts the thread now, so that the first request does not wait for it (it idles unref'd). */
  start(): void {
    try {
      this.#start();
    } catch {
      // The first request reports it.
    }
  }

  /** Creates what is missing and checks ownership; with recover, puts crashed claims back. */
  init(options: { recover?: boolean } = {}): Promise<{ recovered: string[] }> {
    return this.#call("init", options) as Promise<{ recovered: string[] }>;
  }

  /** get_mailqueue_file() and the bookkeeping, written and fsynced by the worker. */
  create(content: Buffer, book?: Bookkeeping): Promise<string> {
    return this.#call("create", content, book) as Promise<string>;
  }

  /** Lists a folder in slices as the worker reads it; each slice is handed over in its own turn. */
  async scan(folder: Folder, onSlice: (ids: string[], badNames: string[]) => void): Promise<void> {
    await this.#request("scan", [folder], (slice) => {
      const { ids, badNames } = slice as { ids: string[]; badNames: string[] };
      onSlice(ids, badNames);
    });
  }

  /** deferred/, with each message's due time from its bookkeeping (0: due now), in slices. */
  async scanDue(onSlice: (due: Array<[string, number]>) => void): Promise<void> {
    await this.#request("scanDue", [], (slice) => onSlice(slice as Array<[string, number]>));
  }

  /** Claims, reads, checks, measures and (with keys) signs one queued message. */
  async prepare(id: string, from: "outgoing" | "deferred"): Promise<Prepared> {
    const prepared = (await this.#call("prepare", id, from)) as Prepared;
    if (prepared.kind === "ready") {
      prepared.prefix = asBuffer(prepared.prefix);
      if (prepared.wire.bytes) prepared.wire.bytes = asBuffer(prepared.wire.bytes);
    }
    return prepared;
  }

  /**
   * The wire form of a message too large to be prepared whole, piece by piece: the next
   * piece is asked for while this one is written. A piece is memory the worker made and
   * handed over; once the caller has taken it (its write's callback came, and it asks for
   * the next) it goes back with the next request to be filled again, so a body of any size
   * crosses in the same few buffers instead of leaving one behind for the GC per piece.
   * So the caller must be done with a piece (its socket write's callback came) before it
   * asks for the next one.
   */
  async *wireChunks(msg: MessageInfo, prefix: Buffer): AsyncGenerator<Buffer> {
    // Numbered here, not in the worker: a restarted worker knows none of the old numbers, so
    // a body cut off by its death fails, and is never continued with another one's pieces.
    const handle = ++this.#bodies;
    await this.#call("bodyOpen", handle, msg, prefix);
    try {
      const ask = (returned: ArrayBuffer | null) =>
        this.#request("bodyNext", [handle, returned], undefined, returned ? [returned] : [])
          .then((chunk) => (chunk === null ? null : asBuffer(chunk as Uint8Array)));
      // The next piece is asked for before this one is handed out; if the thread dies while
      // the caller writes, that request fails with no one awaiting it yet: it is marked
      // handled here, and the failure reaches the caller when it asks for the piece.
      const ahead = (returned: ArrayBuffer | null) => {
        const request = ask(returned);
        request.catch(() => undefined);
        return request;
      };
      let next = ahead(null);
      let written: ArrayBuffer | null = null;
      for (;;) {
        const chunk = await next;
        if (chunk === null) return;
        next = ahead(written);
        yield chunk;
        // Resumed: the caller is done with this piece (an abandoned body is not resumed, so
        // memory a socket may still hold is never handed back).
        written = chunk.buffer as ArrayBuffer;
      }
    } finally {
      await this.#call("bodyClose", handle).catch(() => undefined);
    }
  }

  complete(id: string, booked: boolean): Promise<void> {
    return this.#call("complete", id, booked) as Promise<void>;
  }

  release(id: string, to: "outgoing" | "deferred", book?: Bookkeeping): Promise<string> {
    return this.#call("release", id, to, book) as Promise<string>;
  }

  quarantine(id: string, from: Folder, reason: string): Promise<string> {
    return this.#call("quarantine", id, from, reason) as Promise<string>;
  }

  /** Line 2 rewritten with the recipients still pending; returns them as the file now has them. */
  rewriteRecipients(msg: MessageInfo, pending: string[]): Promise<void> {
    return this.#call("rewriteRecipients", msg, pending).then(() => { msg.recipients = pending; });
  }

  /** The message's header block, for a report. */
  headerBlock(msg: MessageInfo): Promise<Buffer> {
    return this.#call("headerBlock", msg).then((bytes) => asBuffer(bytes as Uint8Array));
  }

  /** The message's body after its header block and blank line, for RET=FULL. */
  body(msg: MessageInfo, headerLength: number): Promise<Buffer> {
    return this.#call("body", msg, headerLength).then((bytes) => asBuffer(bytes as Uint8Array));
  }

  readState(name: string): Promise<unknown> {
    return this.#call("readState", name);
  }

  writeState(name: string, value: unknown): Promise<void> {
    return this.#call("writeState", name, value) as Promise<void>;
  }

  /**
   * The queue listing. It crosses in slices, each taken in its own turn of the loop: a queue
   * of 100,000 is never one long task for the host.
   */
  async queueEntries(): Promise<QueueEntry[]> {
    const entries: QueueEntry[] = [];
    await this.#request("queueEntries", [], (slice) => {
      for (const entry of slice as QueueEntry[]) entries.push(entry);
    });
    return entries;
  }

  /** Messages in each folder, counted by the worker (the metrics' folder gauges). */
  counts(): Promise<Record<Folder, number>> {
    return this.#call("counts") as Promise<Record<Folder, number>>;
  }

  /** Queue control (postsuper's -d, -h, -H, -r), as the command line asked the engine that holds the lock. */
  control(verb: ControlVerb, target: string): Promise<ControlResult> {
    return this.#call("control", verb, target) as Promise<ControlResult>;
  }

  /** Requests from the command line waiting in .requests/, each taken once. */
  takeRequests(): Promise<Array<{ name: string; body: unknown }>> {
    return this.#call("takeRequests") as Promise<Array<{ name: string; body: unknown }>>;
  }

  answerRequest(name: string, answer: unknown): Promise<void> {
    return this.#call("answerRequest", name, answer) as Promise<void>;
  }

  /** The MTA-STS policy cache (.mta-sts/ in the spool), read and written by the worker too. */
  policies(): PolicyStore {
    return {
      read: (domain) => this.#call("policyRead", domain) as Promise<CachedPolicy | null>,
      write: (domain, policy) => this.#call("policyWrite", domain, policy) as Promise<void>,
    };
  }

  /** Ends the worker once what waits is answered; a later request starts a new one. */
  async close(): Promise<void> {
    const worker = this.#worker;
    if (!worker) return;
    if (this.#waiting.size > 0) await new Promise<void>((resolve) => { this.#drained = resolve; });
    if (this.#worker === worker) this.#worker = null;
    await worker.terminate();
  }

  #drained: (() => void) | null = null;

  #call(op: string, ...args: unknown[]): Promise<unknown> {
    return this.#request(op, args);
  }

  /**
   * A request; `slice` takes the pieces of a streamed answer before the final one; `moves`
   * is memory among the arguments that goes to the worker (transferred, no longer ours).
   */
  #request(op: string, args: unknown[], slice?: (value: unknown) => void, moves: ArrayBuffer[] = []): Promise<unknown> {
    const n = this.#next++;
    let worker: Worker;
    try {
      worker = this.#start();
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      if (this.#waiting.size === 0) worker.ref();
      this.#waiting.set(n, { resolve, reject, slice });
      if (this.#outbox.length === 0) setImmediate(() => this.#send());
      this.#outbox.push({ n, op, args });
      this.#outboxMoves.push(...moves);
    });
  }

  #send(): void {
    const batch = this.#outbox;
    const moves = this.#outboxMoves;
    this.#outbox = [];
    this.#outboxMoves = [];
    try {
      this.#worker?.postMessage(batch, moves);
    } catch (err) {
      // A batch that cannot cross (memory not ours to hand over, a value that cannot be
      // copied) fails its own requests rather than leaving them waiting for ever.
      this.#receive(batch.map(({ n }) => ({ n, ok: false as const, error: { name: "MailError", message: `spool thread for ${this.dir}: request not sent: ${(err as Error).message}`, code: "EWORKER" } })));
    }
  }

  #start(): Worker {
    if (this.#worker) return this.#worker;
    const data = { role: ROLE, dir: this.dir, fsync: this.#options.fsync !== false, helo: this.#options.helo, dkimKeys: this.#options.dkimKeys ?? [] };
    const worker = new Worker(workerCode(), { eval: true, workerData: data });
    worker.on("message", (replies: Reply[]) => this.#receive(replies));
    const died = (why: string) => {
      if (this.#worker !== worker) return;
      this.#worker = null;
      const waiting = [...this.#waiting.values()];
      this.#waiting.clear();
      for (const w of waiting) w.reject(new MailError(`spool worker for ${this.dir} stopped: ${why}`, "EWORKER"));
      this.#drained?.();
    };
    worker.on("error", (err) => died(err.message));
    worker.on("exit", (code) => died(`exit code ${code}`));
    // Idle, the thread keeps no process alive (after the listeners: adding one refs it again).
    worker.unref();
    this.#worker = worker;
    return worker;
  }

  #receive(replies: Reply[]): void {
    for (const reply of replies) {
      const waiter = this.#waiting.get(reply.n);
      if (!waiter) continue;
      if ("slice" in reply) {
        waiter.slice?.(reply.slice);
        continue;
      }
      this.#waiting.delete(reply.n);
      if (reply.ok) waiter.resolve(reply.value);
      else waiter.reject(rebuildError(reply.error));
    }
    if (this.#waiting.size === 0) {
      this.#worker?.unref();
      this.#drained?.();
      this.#drained = null;
    }
  }
}

/** Bytes come back from the worker as Uint8Arrays: the engine wants Buffers (a view, no copy). */
function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function rebuildError(e: Extract<Reply, { ok: false }>["error"]): Error {
  if (e.name === "CorruptMessageError") return new CorruptMessageError(e.queueId ?? "", e.reason ?? e.message);
  if (e.name === "SpoolError") return new SpoolError(e.message, e.code);
  return new MailError(e.message, e.code ?? "EQUEUE");
}

/* ------------------------------------------------------------------------------------ */
/* The worker's side                                                                      */

interface WorkerData { role: string; dir: string; fsync: boolean; helo: string; dkimKeys: DkimKey[] }

function serve(data: WorkerData): void {
  const spool = new Spool(data.dir, { fsync: data.fsync });
  const policies = new PolicyFiles(data.dir);
  const bodies = new Map<number, Body>();
  let outbox: Reply[] = [];
  let transfer: ArrayBuffer[] = [];
  const flush = () => {
    const replies = outbox;
    const moved = transfer;
    outbox = [];
    transfer = [];
    parentPort!.postMessage(replies, moved);
  };
  const answer = (reply: Reply, moves: ArrayBuffer[] = []) => {
    if (outbox.length === 0) setImmediate(flush);
    outbox.push(reply);
    transfer.push(...moves);
  };
  /** Everything the engine asks of the spool. Messages' bytes leave as transferred memory. */
  const ops: Record<string, (...args: never[]) => Promise<unknown>> = {
    init: (options: { recover?: boolean }) => spool.init(options),
    create: (content: Uint8Array, book?: Bookkeeping) => spool.create(Buffer.from(content.buffer, content.byteOffset, content.byteLength), book),
    scan: async (n: number, folder: Folder) => {
      for await (const slice of spool.scanSlices(folder)) answer({ n, slice });
    },
    scanDue: async (n: number) => {
      for await (const { ids } of spool.scanSlices("deferred")) {
        const due: Array<[string, number]> = [];
        for (const id of ids) due.push([id, (await spool.readBookkeeping(id, "deferred"))?.nextAttempt ?? 0]);
        answer({ n, slice: due });
      }
    },
    prepare: (id: string, from: "outgoing" | "deferred") => prepare(spool, data, id, from),
    bodyOpen: async (handle: number, msg: MessageInfo, prefix: Uint8Array) => {
      // One read buffer and one stuffing buffer for the whole message: each piece is copied
      // into a buffer that crosses to the host (fillPiece) before the next is made.
      const pieces = wireChunks(spool, fileBacked(msg), Buffer.from(prefix.buffer, prefix.byteOffset, prefix.byteLength), { reuse: true });
      bodies.set(handle, { pieces, waiting: null, ended: false, spares: [] });
    },
    bodyNext: async (handle: number, returned: ArrayBuffer | null) => {
      const body = bodies.get(handle);
      if (!body) throw new MailError(`${data.dir}: body ${handle} is not open in this spool thread (restarted since it was opened)`, "EWORKER");
      if (returned) body.spares.push(returned);
      return fillPiece(body);
    },
    bodyClose: async (handle: number) => {
      await bodies.get(handle)?.pieces.return(undefined);
      bodies.delete(handle);
    },
    complete: (id: string, booked: boolean) => spool.complete(id, booked),
    release: (id: string, to: "outgoing" | "deferred", book?: Bookkeeping) => spool.release(id, to, book),
    quarantine: (id: string, from: Folder, reason: string) => spool.quarantine(id, from, reason),
    rewriteRecipients: (msg: MessageInfo, pending: string[]) => spool.rewriteRecipients(fileBacked(msg), pending),
    headerBlock: (msg: MessageInfo) => spool.headerBlock(fileBacked(msg)),
    body: async (msg: MessageInfo, headerLength: number) => {
      const parts: Buffer[] = [];
      for await (const chunk of spool.content(fileBacked(msg))) parts.push(chunk);
      const rest = Buffer.concat(parts).subarray(headerLength);
      // Skip the blank line that separates headers and body.
      return rest.subarray(rest[0] === 0x0d && rest[1] === 0x0a ? 2 : rest[0] === 0x0a ? 1 : 0);
    },
    readState: (name: string) => spool.readState(name),
    writeState: (name: string, value: unknown) => spool.writeState(name, value),
    queueEntries: async (n: number) => {
      const entries = await queueEntries(spool, suspendedDomains);
      for (let i = 0; i < entries.length; i += LISTING_SLICE) {
        answer({ n, slice: entries.slice(i, i + LISTING_SLICE) });
        // Each slice leaves in a message of its own (answers of one turn travel together).
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    },
    counts: () => spool.counts(),
    control: (verb: ControlVerb, target: string) => spool.control(verb, target),
    takeRequests: () => spool.takeRequests(),
    answerRequest: (name: string, answer: unknown) => spool.answerRequest(name, answer),
    policyRead: (domain: string) => policies.read(domain),
    policyWrite: (domain: string, policy: CachedPolicy) => policies.write(domain, policy),
  };
  const perform = async ({ n, op, args }: Request) => {
    try {
      const run = ops[op] as (...a: unknown[]) => Promise<unknown>;
      const value = STREAMED.has(op) ? await run(n, ...args) : await run(...args);
      const moves: ArrayBuffer[] = [];
      answer({ n, ok: true, value: detach(value, moves) }, moves);
    } catch (err) {
      answer({ n, ok: false, error: describe(err) });
    }
  };
  // Settling a message (above all the unlink after a 250) never waits behind the reading of
  // others: every moment between the server's 250 and the unlink is a window for a
  // duplicate after a crash. The rest goes one batch at a time, in order, except that up to
  // PREPARE_AHEAD prepares overlap one another (each claims as it starts, in order): while
  // one message's signature is computed in the thread pool, the next is read and measured.
  // Any other request waits for the prepares before it.
  let queue: Promise<void> = Promise.resolve();
  const preparing = new Set<Promise<void>>();
  parentPort!.on("message", (batch: Request[]) => {
    const later: Request[] = [];
    for (const request of batch) {
      if (SETTLING.has(request.op)) void perform(request);
      else later.push(request);
    }
    if (later.length > 0) {
      queue = queue.then(async () => {
        for (const request of later) {
          if (request.op === "prepare") {
            while (preparing.size >= PREPARE_AHEAD) await Promise.race(preparing);
            const done: Promise<void> = perform(request).finally(() => preparing.delete(done));
            preparing.add(done);
          } else {
            while (preparing.size > 0) await Promise.all(preparing);
            await perform(request);
          }
          // A turn of the loop between requests: a settling request that arrives meanwhile
          // is taken at once, not after the whole batch.
          await new Promise<void>((resolve) => setImmediate(resolve));
        }
      });
    }
  });
}

/** Prepares at once at the most: enough to keep the thread pool's four threads signing. */
const PREPARE_AHEAD = 4;

/** Requests answered in slices before their final reply: they are given the request's number. */
const STREAMED = new Set(["scan", "scanDue", "queueEntries"]);

/** Queue entries a slice of the listing carries (about 2 ms of the host's loop to take in). */
const LISTING_SLICE = 500;

/** Requests that settle a message already prepared: they touch only its own files. */
const SETTLING = new Set(["complete", "release", "quarantine", "rewriteRecipients"]);

/** A body on its way out: the stuffed pieces, and the buffers the host has handed back. */
interface Body {
  pieces: AsyncGenerator<Buffer>;
  /** A piece that did not fit in the last buffer (a view, valid until the next is made). */
  waiting: Buffer | null;
  ended: boolean;
  spares: ArrayBuffer[];
}

/**
 * What crosses to the host at once for a body: several stuffed pieces, so that a round trip
 * between the threads carries a quarter MiB, not one read's worth.
 */
const BODY_CROSSING = 256 * 1024;

/** The next stretch of a body, in a handed-back buffer when there is one; null at the end. */
async function fillPiece(body: Body): Promise<Moved | null> {
  let into = new Uint8Array(body.spares.pop() ?? new ArrayBuffer(BODY_CROSSING));
  let used = 0;
  while (!body.ended) {
    let piece = body.waiting;
    body.waiting = null;
    if (!piece) {
      const next = await body.pieces.next();
      if (next.done) {
        body.ended = true;
        break;
      }
      piece = next.value;
    }
    if (piece.length > into.length - used) {
      if (used > 0) {
        body.waiting = piece;
        break;
      }
      into = new Uint8Array(piece.length);
    }
    into.set(piece, used);
    used += piece.length;
  }
  return used === 0 ? null : new Moved(into.subarray(0, used));
}

/** Memory the answer hands over as it is (a view of it, its whole buffer transferred). */
class Moved {
  constructor(readonly bytes: Uint8Array) {}
}

/** A message read again from its file (the worker keeps no content between requests). */
function fileBacked(msg: MessageInfo): QueuedMessage {
  return { ...msg, head: Buffer.alloc(0), whole: false };
}

/**
 * Buffers on their way to the host: a Buffer that owns all of its memory is transferred, any
 * other (a view of a pool or of a larger buffer) is copied into memory of its own first.
 */
function detach(value: unknown, moves: ArrayBuffer[]): unknown {
  if (value instanceof Moved) {
    moves.push(value.bytes.buffer as ArrayBuffer);
    return value.bytes;
  }
  if (Buffer.isBuffer(value)) {
    const owns = value.byteOffset === 0 && value.byteLength === value.buffer.byteLength && value.buffer instanceof ArrayBuffer;
    // Never Buffer.from(): a small copy would land in Node's shared pool, which must not move.
    const own = owns ? value : Buffer.allocUnsafeSlow(value.length);
    if (own !== value) value.copy(own);
    moves.push(own.buffer as ArrayBuffer);
    return own;
  }
  if (Array.isArray(value)) return value.map((v) => detach(v, moves));
  if (value && typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = detach(v, moves);
    return out;
  }
  return value;
}

function describe(err: unknown): Extract<Reply, { ok: false }>["error"] {
  const e = err as NodeJS.ErrnoException & { reason?: string; queueId?: string };
  return { name: e?.name ?? "Error", message: String(e?.message ?? err), code: e?.code, reason: e?.reason, queueId: e?.queueId };
}

/** Claim, bookkeeping, read, measure, and sign once: everything between outgoing/ and the wire. */
async function prepare(spool: Spool, data: WorkerData, queued: string, from: "outgoing" | "deferred"): Promise<Prepared> {
  const claimed = await spool.claim(queued, from);
  if (claimed === null) return { kind: "gone" };
  const { id, booked } = claimed;
  const book = booked ? await spool.readBookkeeping(id, "outgoing_active") : null;
  let msg: QueuedMessage;
  let wire: Wire;
  let prefix: Buffer = Buffer.alloc(0);
  const notes: string[] = [];
  try {
    msg = await spool.open(id);
    // A prefix made (and signed) at an earlier attempt is used again as it was: one
    // signature per message, valid whatever the clock or the queue id says now.
    const kept = book?.prefix ? Buffer.from(book.prefix, "base64") : null;
    wire = await measureWire(spool, msg, (facts) => (prefix = kept ?? addedHeaders(facts, msg, data.helo)));
    if (!kept && data.dkimKeys.length > 0) ({ prefix, wire } = await sign(spool, msg, prefix, wire, data.dkimKeys, notes));
  } catch (err) {
    if (err instanceof CorruptMessageError) return { kind: "corrupt", id, reason: err.reason };
    const putBack = await spool.release(id, from).catch(() => id);
    return { kind: "unreadable", id, putBack, error: (err as Error).message };
  }
  const { head: _head, ...info } = msg;
  return { kind: "ready", id, booked, book, msg: info, wire, prefix, notes, messageId: messageIdOf(prefix) ?? messageIdOf(msg.head) };
}

/** DKIM: signs what will go on the wire (the added headers, then the message) and prepends the signature. */
async function sign(spool: Spool, msg: QueuedMessage, prefix: Buffer, wire: Wire, keys: DkimKey[], notes: string[]): Promise<{ prefix: Buffer; wire: Wire }> {
  // A message prepared whole is hashed from its wire bytes (no second stuffing pass); a
  // large one from its file, stuffed again piece by piece: the same octets either way.
  const content = wire.bytes ? [wire.bytes] : (async function* () {
    yield prefix;
    yield* spool.content(msg);
  })();
  try {
    const result = await signByFrom(content, keys, { wire: wire.bytes !== null });
    if (result.skipped) {
      notes.push(result.skipped);
      return { prefix, wire };
    }
    const fields = Buffer.from(result.fields);
    const bytes = wire.bytes ? Buffer.allocUnsafeSlow(fields.length + wire.bytes.length) : null;
    if (bytes) {
      fields.copy(bytes, 0);
      wire.bytes!.copy(bytes, fields.length);
    }
    return { prefix: Buffer.concat([fields, prefix]), wire: { ...wire, size: wire.size + fields.length, bytes } };
  } catch (err) {
    notes.push(`warning: not DKIM-signed: ${(err as Error).message}`);
    return { prefix, wire };
  }
}

if (!isMainThread && (workerData as WorkerData | null)?.role === ROLE) serve(workerData as WorkerData);
