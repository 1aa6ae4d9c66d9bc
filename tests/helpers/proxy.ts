// Test helper: a recording TCP proxy on loopback, for tests that must see the exact bytes a
// client wrote: recordingProxy(targetPort) forwards every connection to 127.0.0.1:targetPort
// (half-closes passed on) and keeps what the client wrote, chunk by chunk as it arrived, per
// connection; close() ends every connection and stops listening. `at.port` listens on a port
// chosen beforehand (a relay address that refused connections until now).

import net from "node:net";

/** A recording TCP proxy: what the client wrote, chunk by chunk as it arrived, per connection. */
export interface Proxy {
  port: number;
  chunks: Buffer[][];
  close(): Promise<void>;
}

export async function recordingProxy(targetPort: number, at: { port?: number } = {}): Promise<Proxy> {
  const chunks: Buffer[][] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    const mine: Buffer[] = [];
    chunks.push(mine);
    const upstream = net.connect({ host: "127.0.0.1", port: targetPort, allowHalfOpen: true });
    for (const s of [client, upstream]) {
      s.setNoDelay(true);
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => { client.destroy(); upstream.destroy(); });
    }
    client.on("data", (chunk: Buffer) => { mine.push(Buffer.from(chunk)); upstream.write(chunk); });
    upstream.on("data", (chunk: Buffer) => client.write(chunk));
    client.on("end", () => upstream.end());
    upstream.on("end", () => client.end());
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(at.port ?? 0, "127.0.0.1", () => { server.off("error", reject); resolve(); });
  });
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    chunks,
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}
