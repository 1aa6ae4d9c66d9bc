// Test helper: the policy hosts of MTA-STS (RFC 8461), https://mta-sts.DOMAIN/.well-known/mta-sts.txt,
// and the https: endpoints of TLS reports (RFC 8460), on one loopback address and port 443 (root:
// CI runs as root; requireAll() fails there when it cannot bind). One node:https server picks
// each name's certificate by SNI (`certs`, else `cert`), answers from `policies` by the Host
// header, and records every request (method, host, path, headers, body).
//
//   policies[domain] = "version: STSv1\nmode: enforce\n..."          200, text/plain
//                    = { status: 302, headers: { location } }         any status, headers, body
//                    = { body, cutAfter: 20 }                         headers, 20 bytes of body, then the
//                                                                     connection is destroyed (mid-fetch)
//                    = { stall: true }                                never answers (the client's time limit)

import https from "node:https";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import type { Test } from "tap";
import type { KeyPair } from "./certs.js";
import { needRoot, requireAll } from "./daemon.js";

export type PolicyAnswer = string | { status?: number; headers?: Record<string, string>; body?: string; cutAfter?: number; stall?: boolean };

export interface HttpsRequest {
  method: string;
  host: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

export interface PolicyServer {
  host: string;
  port: number;
  /** By domain (the Host header less "mta-sts."); change at any time. */
  policies: Record<string, PolicyAnswer>;
  requests: HttpsRequest[];
  /** Policy fetches for one domain so far. */
  fetches(domain: string): number;
}

/** False (and the test failed under CI, skipped elsewhere) when port 443 cannot be had here. */
export function requirePort443(t: Test): boolean {
  return requireAll(t, [needRoot("an HTTPS policy host on port 443 (RFC 8461 fixes the port)")]);
}

export async function startPolicyServer(t: Test, o: { host: string; cert: KeyPair; certs?: Record<string, KeyPair>; policies?: Record<string, PolicyAnswer> }): Promise<PolicyServer> {
  const contexts = new Map(Object.entries(o.certs ?? {}).map(([name, pair]) => [name, tls.createSecureContext({ key: pair.key, cert: pair.cert })]));
  const requests: HttpsRequest[] = [];
  const policies: Record<string, PolicyAnswer> = o.policies ?? {};
  const server = https.createServer({
    key: o.cert.key, cert: o.cert.cert,
    SNICallback: (name, callback) => callback(null, contexts.get(name.toLowerCase()) ?? tls.createSecureContext({ key: o.cert.key, cert: o.cert.cert })),
  }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const host = String(req.headers.host ?? "").replace(/:\d+$/, "").toLowerCase();
      requests.push({ method: req.method ?? "", host, path: req.url ?? "", headers: req.headers, body: Buffer.concat(chunks) });
      const answer = req.method === "GET" && req.url === "/.well-known/mta-sts.txt" ? policies[host.replace(/^mta-sts\./, "")] : policies[`${host}${req.url}`];
      if (answer === undefined) return void res.writeHead(req.method === "POST" ? 200 : 404, { "content-type": "text/plain" }).end(req.method === "POST" ? "ok\n" : "no such policy\n");
      const a = typeof answer === "string" ? { body: answer } : answer;
      if (a.stall) return;
      const body = Buffer.from(a.body ?? "");
      res.writeHead(a.status ?? 200, { "content-type": "text/plain", "content-length": String(body.length), ...a.headers });
      if (a.cutAfter === undefined) return void res.end(body);
      res.write(body.subarray(0, a.cutAfter), () => setTimeout(() => req.socket.destroy(), 50));
    });
  });
  server.on("clientError", (_err, socket) => socket.destroy());
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(443, o.host, () => resolve());
  });
  t.teardown(() => new Promise<void>((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  }));
  return {
    host: o.host,
    port: (server.address() as AddressInfo).port,
    policies,
    requests,
    fetches: (domain) => requests.filter((r) => r.host === `mta-sts.${domain}` && r.path === "/.well-known/mta-sts.txt").length,
  };
}

/** An MTA-STS policy file. */
export function stsPolicy(mode: "enforce" | "testing" | "none", mx: string[], maxAge = 86_400): string {
  return ["version: STSv1", `mode: ${mode}`, ...mx.map((m) => `mx: ${m}`), `max_age: ${maxAge}`, ""].join("\r\n");
}
