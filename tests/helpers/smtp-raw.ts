// Test helper: the suite's one raw SMTP client. It writes exactly the bytes it is given and
// frames what comes back itself (not with the engine's parser, so it can test that parser's
// peers and see what is not a reply at all): a reply is CRLF-ended lines up to the first one
// that is not "NNN-...". Every wait is bounded.
//
//   RawClient.connect(port, host?, { timeoutMs?, implicitTls? })   plain TCP, or TLS from the first byte
//   write(bytes) / send(bytes) (resolves once written) / sendInPieces / writeAndDrain (backpressure)
//   reply()     the next reply as its wire lines, e.g. ["250-a", "250 b"] (any line that does not
//               start "NNN-" ends a reply, so garbage comes back as a one-line reply)
//   replies(n)  the next n replies; text() the next reply as one string ("250-a\n250 b")
//   cmd(line)   sends a command line (CRLF added), returns text(); command(line) returns reply()
//   pending()   bytes received and not taken by a reply yet; queued: whole replies among them
//   received    everything received so far (latin1); waitForText(re) waits until it matches
//   quietFor(ms) what arrived during ms (usually "": nothing)
//   waitClosed() the peer closed; upgrade() STARTTLS's second half (any certificate accepted)

import net from "node:net";
import tls from "node:tls";
import { setTimeout as sleep } from "node:timers/promises";

export interface ConnectOptions {
  /** Bound on the TCP connect (and the TLS handshake with implicitTls); default 5000 ms. */
  timeoutMs?: number;
  /** Speak TLS from the first byte (SMTPS), accepting any certificate. */
  implicitTls?: boolean;
}

export class RawClient {
  /** Everything received so far, latin1. */
  received = "";
  /** Offset in `received` of the first byte no reply has taken. */
  private taken = 0;
  private ended = false;
  private waiters: Array<() => void> = [];

  private constructor(public socket: net.Socket) {
    this.listen(socket);
  }

  static connect(port: number, host = "127.0.0.1", opts: ConnectOptions | number = {}): Promise<RawClient> {
    const { timeoutMs = 5000, implicitTls = false } = typeof opts === "number" ? { timeoutMs: opts } : opts;
    return new Promise((resolve, reject) => {
      const socket = implicitTls
        ? tls.connect({ host, port, rejectUnauthorized: false, servername: "localhost" })
        : net.connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect to ${host}:${port} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once(implicitTls ? "secureConnect" : "connect", () => {
        clearTimeout(timer);
        socket.removeAllListeners("error");
        socket.setNoDelay(true);
        resolve(new RawClient(socket));
      });
    });
  }

  private listen(socket: net.Socket): void {
    socket.on("data", (chunk: Buffer) => {
      this.received += chunk.toString("latin1");
      this.wake();
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves true on new data or close, false when ms have passed. */
  private change(ms: number): Promise<boolean> {
    if (ms <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.waiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  /** Waits (at most timeoutMs) until ready() is true; false when the time ran out or the connection closed. */
  private async until(ready: () => boolean, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!ready()) {
      if (this.ended) return ready();
      if (!(await this.change(deadline - Date.now()))) return ready();
    }
    return true;
  }

  /** The end offset of the next whole reply at `from`, or -1. */
  private replyEnd(from: number): number {
    let offset = from;
    for (;;) {
      const end = this.received.indexOf("\r\n", offset);
      if (end === -1) return -1;
      const line = this.received.slice(offset, end);
      offset = end + 2;
      if (!/^\d{3}-/.test(line)) return offset;
    }
  }

  get closed(): boolean {
    return this.ended;
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Writes and resolves once the bytes are handed to the kernel. */
  send(data: string | Buffer): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(data, (e) => (e ? reject(e) : resolve())));
  }

  /** Sends data in pieces, each its own write, with a pause between them. */
  async sendInPieces(pieces: Array<string | Buffer>, pauseMs = 15): Promise<void> {
    for (const piece of pieces) {
      await this.send(piece);
      await sleep(pauseMs);
    }
  }

  /** Writes with backpressure: resolves once the socket takes more. */
  async writeAndDrain(data: string | Buffer): Promise<void> {
    if (!this.socket.write(data)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.socket.removeListener("drain", done);
          this.socket.removeListener("close", done);
          resolve();
        };
        this.socket.once("drain", done);
        this.socket.once("close", done);
      });
    }
  }

  /** The lines of the next whole reply; rejects after timeoutMs or when the connection closes first. */
  async reply(timeoutMs = 5000): Promise<string[]> {
    if (!(await this.until(() => this.replyEnd(this.taken) >= 0, timeoutMs))) {
      const why = this.ended ? "connection closed" : `no whole reply within ${timeoutMs} ms`;
      throw new Error(`${why}; unread: ${JSON.stringify(this.pending())}`);
    }
    const end = this.replyEnd(this.taken);
    const text = this.received.slice(this.taken, end - 2);
    this.taken = end;
    return text.split("\r\n");
  }

  async replies(n: number, timeoutMs = 5000): Promise<string[][]> {
    const all: string[][] = [];
    for (let i = 0; i < n; i++) all.push(await this.reply(timeoutMs));
    return all;
  }

  /** The next reply as text ("250 2.1.0 Ok"; the lines of a multi-line reply joined by \n). */
  async text(timeoutMs = 5000): Promise<string> {
    return (await this.reply(timeoutMs)).join("\n");
  }

  /** Sends one command line (CRLF added) and returns the reply's text. */
  async cmd(line: string, timeoutMs = 5000): Promise<string> {
    this.write(`${line}\r\n`);
    return this.text(timeoutMs);
  }

  /** Sends one command line (CRLF added) and returns the reply's lines. */
  async command(line: string, timeoutMs = 5000): Promise<string[]> {
    this.write(`${line}\r\n`);
    return this.reply(timeoutMs);
  }

  /** Everything received and not yet taken by reply(). */
  pending(): string {
    return this.received.slice(this.taken);
  }

  /** Whole replies received and not yet taken. */
  get queued(): number {
    let n = 0;
    for (let at = this.replyEnd(this.taken); at >= 0; at = this.replyEnd(at)) n++;
    return n;
  }

  /** Waits until everything received matches `re`; rejects after timeoutMs with what came. */
  async waitForText(re: RegExp, timeoutMs = 5000, what = String(re)): Promise<RegExpExecArray> {
    await this.until(() => re.test(this.received), timeoutMs);
    const m = re.exec(this.received);
    if (!m) throw new Error(`timed out waiting for ${what} after ${timeoutMs} ms; received: ${JSON.stringify(this.received)}`);
    return m;
  }

  /** Everything received during ms milliseconds (expecting nothing, usually). */
  async quietFor(ms: number): Promise<string> {
    const before = this.received.length;
    await sleep(ms);
    return this.received.slice(before);
  }

  /** Resolves when the peer closed the connection; rejects after timeoutMs. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    if (!(await this.until(() => this.ended, timeoutMs))) throw new Error(`connection still open after ${timeoutMs} ms`);
  }

  /** STARTTLS's second half: a TLS handshake on this connection (any certificate accepted). */
  async upgrade(timeoutMs = 5000): Promise<tls.TLSSocket> {
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("close");
    this.received = "";
    this.taken = 0;
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({ socket: raw, rejectUnauthorized: false, servername: "localhost" });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error("TLS handshake timed out"));
      }, timeoutMs);
      s.once("secureConnect", () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
    this.socket = secure;
    this.listen(secure);
    return secure;
  }

  destroy(): void {
    this.socket.destroy();
  }
}
