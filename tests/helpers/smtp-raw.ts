// Test helper: a raw SMTP client that writes exactly the bytes it is given and reads replies
// with the engine's own ReplyParser, plus a throw-away self-signed certificate for STARTTLS.
// Every wait is bounded.

import net from "node:net";
import tls from "node:tls";
import path from "node:path";
import { execFile } from "node:child_process";
import { ReplyParser, type Reply } from "../../smtp-codes.js";

export const OPENSSL = "/usr/bin/openssl";

/** A reply as the wire had it: "250-a\n250 b" (one "<code><sep><text>" per line). */
export function show(reply: Reply): string {
  return reply.lines.map((l, i) => `${reply.code}${i === reply.lines.length - 1 ? " " : "-"}${l}`).join("\n");
}

export class RawClient {
  private parser = new ReplyParser();
  private replies: Reply[] = [];
  private waiter: (() => void) | null = null;
  private closedFlag = false;
  private closeWaiters: Array<() => void> = [];

  private constructor(public socket: net.Socket) {
    this.listen(socket);
  }

  static connect(port: number, host = "127.0.0.1", timeoutMs = 5000): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect to ${host}:${port} timed out`));
      }, timeoutMs);
      socket.once("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once("connect", () => {
        clearTimeout(timer);
        socket.setNoDelay(true);
        resolve(new RawClient(socket));
      });
    });
  }

  private listen(socket: net.Socket): void {
    socket.on("data", (chunk: Buffer) => {
      this.replies.push(...this.parser.push(chunk));
      this.wake();
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      this.closedFlag = true;
      this.wake();
      for (const w of this.closeWaiters.splice(0)) w();
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
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

  /** The next reply; rejects after timeoutMs or when the connection closes first. */
  async reply(timeoutMs = 5000): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    while (this.replies.length === 0) {
      if (this.closedFlag) throw new Error("connection closed while waiting for a reply");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.waiter = null;
          resolve();
        }, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return this.replies.shift()!;
  }

  /** The next reply as text ("250 2.1.0 Ok"; multi-line replies joined by \n). */
  async text(timeoutMs = 5000): Promise<string> {
    return show(await this.reply(timeoutMs));
  }

  /** Sends one command line (CRLF added) and returns the reply's text. */
  async cmd(line: string, timeoutMs = 5000): Promise<string> {
    this.write(`${line}\r\n`);
    return this.text(timeoutMs);
  }

  /** Replies already received and not yet taken. */
  get queued(): number {
    return this.replies.length;
  }

  /** Resolves when the server closed the connection; rejects after timeoutMs. */
  waitClosed(timeoutMs = 5000): Promise<void> {
    if (this.closedFlag) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`connection still open after ${timeoutMs} ms`)), timeoutMs);
      this.closeWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** STARTTLS's second half: a TLS handshake on this connection (any certificate accepted). */
  async upgrade(timeoutMs = 5000): Promise<tls.TLSSocket> {
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("close");
    this.parser = new ReplyParser();
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

/** A self-signed certificate for CN=localhost, valid one day: { cert, key } file paths in dir. */
export async function makeCert(dir: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, "cert.pem");
  const key = path.join(dir, "key.pem");
  await new Promise<void>((resolve, reject) => {
    execFile(
      OPENSSL,
      ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
      { timeout: 60_000 },
      (err, _stdout, stderr) => (err ? reject(new Error(`openssl: ${err.message}: ${stderr}`)) : resolve()),
    );
  });
  return { cert, key };
}
