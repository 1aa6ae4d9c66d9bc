// Test helper: what the secure-transport tests share (TLS, AUTH, smuggling, caps, spool modes):
// rig() (an engine in this process against the scripted server, 3-second stage timeouts, every
// text it produced via texts()), message(), verbs(), smtpLines(), secretForms() and
// assertNoSecrets() (no credential in any log line or error), startHostile() (hostile servers
// in a child process, so their buffers are not in this process's RSS), and Postfix with TLS
// and Cyrus SASL: postfixSecurityCf(), postfixWith(), postfixEngine().
//
// Facts about Postfix 3.7.11 on Debian 12 that these rely on, found the hard way:
// - Debian's Postfix reads Cyrus SASL's smtpd.conf from $config_directory/sasl/ (and
//   /usr/lib/sasl/) and ignores cyrus_sasl_config_path; sasldb_path in it is honoured.
// - smtpd_forbid_bare_newline = yes means "normalize" (a bare LF is taken as CRLF); "reject"
//   refuses any bare LF; the exclusions default to $mynetworks (loopback here), so they are
//   emptied. A raw client checks that the refusal is live.
// - Postfix keeps NUL bytes of the message content as they are.

import * as fs from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import type { Test } from "tap";
import { MailEngine, MailError, type FlushSummary, type MailOptions, type Outcome } from "../../mail.js";
import { type Script, type ScriptedServer } from "./scripted-server.js";
import { type KeyPair, type TestCerts } from "./certs.js";
import { addTlsmgr, startPostfix, type PostfixInstance, type PostfixOptions } from "./postfix.js";
import { run, spawnDaemon } from "./daemon.js";
import { bounded, newQueueId, setup, type FolderName } from "./engine-rig.js";
import { queueFile, testMessage } from "./spool-files.js";

export const SASLPASSWD2 = "/usr/sbin/saslpasswd2";
export const STAGE_S = 3;
export const FAST: MailOptions = {
  connectTimeout: STAGE_S, heloTimeout: STAGE_S, mailTimeout: STAGE_S, rcptTimeout: STAGE_S,
  dataInitTimeout: STAGE_S, dataXferTimeout: STAGE_S, dataDoneTimeout: STAGE_S, quitTimeout: STAGE_S,
};
export const FLUSH_MS = 20_000;
export const b64 = (text: string): string => Buffer.from(text, "utf8").toString("base64");

/* ------------------------------------------------------------------------------------ */
/* The rig: a maildir, a scripted server, an engine in this process                      */

export interface Rig {
  dir: string;
  maildir: string;
  server: ScriptedServer;
  engine: MailEngine;
  lines: string[];
  errors: MailError[];
  outcomes: Outcome[];
  relay: string;
  flush(force?: boolean, ms?: number): Promise<FlushSummary>;
  files(folder: FolderName): string[];
  drop(content: string | Buffer, id?: string): string;
  /** Every text the engine produced: log lines, error messages and details, event texts. */
  texts(): string[];
}

export interface RigOptions {
  engine?: MailOptions;
  /** Where the server listens (e.g. port 465). */
  at?: { host?: string; port?: number };
  /** Engine relay; default the server. */
  relay?: string;
}

/** engine-rig.ts's setup() with this file's stage timeouts, and every text the engine produced. */
export async function rig(tt: Test, script: Script, o: RigOptions = {}): Promise<Rig> {
  const r = await setup(tt, { script, engine: { ...FAST, ...o.engine }, relay: o.relay, at: o.at });
  return {
    dir: r.dir, maildir: r.maildir, server: r.server, engine: r.engine, lines: r.lines, errors: r.errors, outcomes: r.all,
    relay: r.relay, files: r.files, drop: r.drop,
    flush: (force = false, ms = FLUSH_MS) => r.flush(ms, force),
    texts: () => [
      ...r.lines,
      ...r.errors.map((e) => `${e.message}\n${JSON.stringify(e.details)}\n${e.stack ?? ""}`),
      ...r.all.map((e) => JSON.stringify(e)),
    ],
  };
}

export function message(n: number, rcpt = `user${n}@test.example`): string {
  return queueFile("sender@test.example", [rcpt], testMessage(n));
}

/** Verbs of the commands a session received, e.g. ["EHLO", "STARTTLS", "EHLO", "MAIL", ...]. */
export function verbs(commands: string[]): string[] {
  return commands.map((c) => (/^\S*/.exec(c)?.[0] ?? "").toUpperCase());
}

export const TRANSACTION = /^(MAIL|RCPT|DATA|BDAT|AUTH)\b/i;

export function smtpLines(lines: string[], status?: string): string[] {
  return lines.filter((l) => l.includes(" mudmail/smtp[") && / to=</.test(l) && (!status || l.includes(`status=${status} `)));
}

/** Every form a credential takes on the wire; none may appear in a log line or an error. */
export function secretForms(user: string, password: string | null, token: string | null = null): Array<[string, string]> {
  const forms: Array<[string, string]> = [];
  if (password !== null) {
    forms.push(["the password", password], ["the password in base64 (AUTH LOGIN)", b64(password)],
      ["\\0user\\0password in base64 (AUTH PLAIN)", b64(`\0${user}\0${password}`)]);
  }
  if (token !== null) {
    forms.push(["the token", token], ["the XOAUTH2 initial response", b64(`user=${user}\x01auth=Bearer ${token}\x01\x01`)]);
  }
  return forms;
}

export function assertNoSecrets(tt: Test, texts: string[], forms: Array<[string, string]>, where: string): void {
  tt.ok(texts.length > 0, `${where}: there is output to scan`);
  for (const [what, secret] of forms) {
    const hits = texts.filter((text) => text.includes(secret));
    tt.equal(hits.length, 0, `${where}: ${what} appears nowhere (${texts.length} texts scanned)`);
  }
}

/* ------------------------------------------------------------------------------------ */
/* Hostile servers in a child process (so their buffers are not in this process's RSS)    */

export const HOSTILE_SERVER = String.raw`
const net = require("node:net");
const mode = process.argv[1];
const limit = Number(process.argv[2]);
setTimeout(() => process.exit(0), 60000);
const server = net.createServer((sock) => {
  const started = Date.now();
  let written = 0;
  let closed = false;
  sock.on("error", () => undefined);
  sock.on("close", () => {
    closed = true;
    process.stdout.write(JSON.stringify({ closed: true, written, ms: Date.now() - started }) + "\n");
  });
  const pump = (chunk, total, tail) => {
    while (!closed && written < total) {
      written += chunk.length;
      if (!sock.write(chunk)) { sock.once("drain", () => pump(chunk, total, tail)); return; }
    }
    if (!closed && tail) sock.write(tail);
  };
  sock.write("220 hostile.test ESMTP\r\n");
  if (mode === "flood") {
    pump(Buffer.from("250 flood\r\n".repeat(6000)), limit, null);
    return;
  }
  sock.once("data", () => {
    if (mode === "longline") pump(Buffer.alloc(65536, "x"), limit, "\r\n");
    else pump(Buffer.from("250-x\r\n".repeat(1000)), limit * 7, "250 x\r\n");
  });
});
server.listen(0, "127.0.0.1", () => process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n"));
`;

export interface Hostile {
  port: number;
  /** Per connection: bytes the server wrote (or tried to) before the client went away. */
  closed(): Array<{ written: number; ms: number }>;
}

export async function startHostile(tt: Test, mode: "longline" | "manylines" | "flood", limit: number): Promise<Hostile> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-hostile-"));
  const d = spawnDaemon(process.execPath, ["-e", HOSTILE_SERVER, mode, String(limit)], dir, "hostile");
  tt.teardown(async () => {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const said = () => fs.readFileSync(d.stdoutFile, "utf8").split("\n").filter(Boolean)
    .map((l) => JSON.parse(l) as { port?: number; closed?: boolean; written: number; ms: number });
  await d.waitForOutput(/"port":\d+/, 10_000);
  return {
    port: said().find((m) => m.port)!.port!,
    closed: () => said().filter((m) => m.closed).map((m) => ({ written: m.written, ms: m.ms })),
  };
}

/* ------------------------------------------------------------------------------------ */
/* Postfix with TLS and Cyrus SASL (sasldb)                                               */

export function groupId(name: string): number {
  for (const line of fs.readFileSync("/etc/group", "utf8").split("\n")) {
    const f = line.split(":");
    if (f[0] === name) return Number(f[2]);
  }
  throw new Error(`no group ${name}`);
}

/**
 * main.cf settings for TLS (the test certificate, key readable by root only) and, with
 * `sasl`, Cyrus SASL from a private sasldb (users in realm test.example), AUTH only over TLS,
 * and mail accepted only from authenticated clients.
 */
export async function postfixSecurityCf(certs: TestCerts | KeyPair, sasl?: { mechanisms: string[]; users: Record<string, string> }): Promise<PostfixSecurity> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "mudmail-pf-sec-"));
  await fsp.chmod(dir, 0o755);
  const key = path.join(dir, "smtpd.key");
  const cert = path.join(dir, "smtpd.crt");
  // The test server certificate, or one made for the MX name (with its chain when it has one).
  const pair = "server" in certs ? certs.server : certs;
  await fsp.writeFile(key, pair.key, { mode: 0o600 });
  await fsp.writeFile(cert, pair.chainFile ? await fsp.readFile(pair.chainFile, "utf8") : pair.cert, { mode: 0o644 });
  const mainCf: Record<string, string> = {
    smtpd_tls_security_level: "may",
    smtpd_tls_cert_file: cert,
    smtpd_tls_key_file: key,
    smtpd_tls_loglevel: "1",
  };
  let saslConf: string | undefined;
  if (sasl) {
    const db = path.join(dir, "sasldb2");
    for (const [user, password] of Object.entries(sasl.users)) {
      const r = await run(SASLPASSWD2, ["-f", db, "-c", "-p", "-u", "test.example", user], { input: password, timeoutMs: 20_000 });
      if (r.code !== 0) throw new Error(`saslpasswd2 failed: ${r.stdout}${r.stderr}`);
    }
    await fsp.chown(db, 0, groupId("postfix"));
    await fsp.chmod(db, 0o640);
    saslConf = [
      "pwcheck_method: auxprop",
      "auxprop_plugin: sasldb",
      `sasldb_path: ${db}`,
      `mech_list: ${sasl.mechanisms.join(" ")}`,
      "",
    ].join("\n");
    Object.assign(mainCf, {
      smtpd_sasl_auth_enable: "yes",
      smtpd_sasl_type: "cyrus",
      smtpd_sasl_path: "smtpd",
      smtpd_sasl_local_domain: "test.example",
      smtpd_sasl_security_options: "noanonymous",
      smtpd_tls_auth_only: "yes",
      smtpd_relay_restrictions: "permit_sasl_authenticated, reject",
      smtpd_recipient_restrictions: "permit_sasl_authenticated, reject",
    });
  }
  return { mainCf, dir, saslConf };
}

export interface PostfixSecurity {
  mainCf: Record<string, string>;
  /** Holds the key, the certificate and the sasldb. */
  dir: string;
  /** Cyrus SASL's smtpd.conf for this instance. */
  saslConf?: string;
}

/**
 * A private Postfix with these settings. Debian's Postfix looks for Cyrus SASL's smtpd.conf in
 * $config_directory/sasl/ (and /usr/lib/sasl/) and ignores cyrus_sasl_config_path (seen with
 * strace: it opens <conf>/sasl/smtpd.conf), so the file goes there, before the reload below.
 */
export async function postfixWith(tt: Test, security: PostfixSecurity | { mainCf: Record<string, string>; dir?: undefined; saslConf?: undefined }, at: Omit<PostfixOptions, "mainCf"> = {}): Promise<PostfixInstance> {
  const pf = await startPostfix({ ...at, mainCf: security.mainCf });
  tt.teardown(async () => {
    await pf.stop();
    if (security.dir) await fsp.rm(security.dir, { recursive: true, force: true });
  });
  if (security.saslConf) {
    await fsp.mkdir(path.join(pf.dir, "conf", "sasl"), { mode: 0o755 });
    await fsp.writeFile(path.join(pf.dir, "conf", "sasl", "smtpd.conf"), security.saslConf, { mode: 0o644 });
  }
  if (security.mainCf.smtpd_tls_cert_file) await addTlsmgr(pf);
  return pf;
}

/** An engine on a fresh maildir in front of a Postfix instance. */
export function postfixEngine(tt: Test, pf: PostfixInstance, options: MailOptions): { engine: MailEngine; maildir: string; lines: string[]; errors: MailError[]; drop(n: number): string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mudmail-security-pf-"));
  const maildir = path.join(dir, "maildir");
  fs.mkdirSync(path.join(maildir, "outgoing"), { recursive: true, mode: 0o700 });
  const lines: string[] = [];
  const errors: MailError[] = [];
  const engine = new MailEngine({
    maildir, relay: `127.0.0.1:${pf.port}`, log: (l) => lines.push(l), helo: "client.test", fsync: false, ...FAST, ...options,
  });
  engine.on("error", (e: MailError) => errors.push(e));
  tt.teardown(async () => {
    await bounded(engine.stop(), 5000, "engine.stop()").catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return {
    engine, maildir, lines, errors,
    drop(n: number) {
      const id = newQueueId();
      fs.writeFileSync(path.join(dir, id), message(n));
      fs.renameSync(path.join(dir, id), path.join(maildir, "outgoing", id));
      return id;
    },
  };
}
