// Test helper: a small world for routing tests: a test DNS server with a zone, scripted
// SMTP servers on loopback addresses (127.0.0.2, 127.0.0.3, ...) sharing one port, and an
// engine that looks up MX records through that DNS server.

import type { Test } from "tap";
import { MailEngine, type FlushSummary, type Outcome } from "../../mail.js";
import { startDnsServer, type DnsServer, type Zone } from "./dns-server.js";
import { startScriptedServer, type Script, type ScriptedServer } from "./scripted-server.js";
import { freePort } from "./postfix.js";
import { dropQueueFile, makeSpool, queueFile, tempMaildir } from "./spool-files.js";

export type { Zone, Script };

export const SIMPLE = "From: talker@talker.test\nSubject: hello\nDate: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <m@talker.test>\n\nhello\n";

export interface World {
  dns: DnsServer;
  port: number;
  servers: Map<string, ScriptedServer>;
  maildir: string;
  lines: string[];
  events: Outcome[];
  engine: MailEngine;
  flush(force?: boolean): Promise<FlushSummary>;
  drop(recipients: string[], sender?: string, ageSeconds?: number): Promise<string>;
}

let idCounter = 0;

/** A DNS zone, scripted servers on the given loopback addresses (one port), an engine using both. */
export async function world(t: Test, zone: Zone, servers: Record<string, Script>, options: Record<string, unknown> = {}): Promise<World> {
  const dns = await startDnsServer(zone);
  t.teardown(() => dns.close());
  let port = 0;
  const started = new Map<string, ScriptedServer>();
  for (let attempt = 0; attempt < 10 && started.size < Object.keys(servers).length; attempt++) {
    for (const s of started.values()) await s.close();
    started.clear();
    port = await freePort();
    try {
      for (const [host, script] of Object.entries(servers)) started.set(host, await startScriptedServer(script, { host, port }));
    } catch {
      continue; // that port was taken on another address: try another
    }
  }
  t.teardown(async () => { for (const s of started.values()) await s.close(); });
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const lines: string[] = [];
  const events: Outcome[] = [];
  const engine = new MailEngine({
    maildir, resolver: dns.address, port: port || 2, log: (l) => lines.push(l), fsync: false, helo: "talker.test",
    connectTimeout: 2, heloTimeout: 2, mailTimeout: 2, rcptTimeout: 2, dataInitTimeout: 2, dataXferTimeout: 2, dataDoneTimeout: 2,
    dnsTimeout: 1, ...options,
  });
  for (const e of ["sent", "deferred", "bounced"] as const) engine.on(e, (o: Outcome) => events.push(o));
  t.teardown(() => engine.stop());
  return {
    dns, port, servers: started, maildir, lines, events, engine,
    flush: (force = false) => engine.flush({ force }),
    async drop(recipients, sender = "talker@talker.test", ageSeconds = 0) {
      const id = `${Math.floor(Date.now() / 1000) - ageSeconds}.${9000 + idCounter++}`;
      return dropQueueFile(maildir, id, queueFile(sender, recipients, SIMPLE));
    },
  };
}


export const line = (w: World, id: string, rcpt: string) => w.lines.find((l) => l.includes(`${id}: to=<${rcpt}>`)) ?? "";

