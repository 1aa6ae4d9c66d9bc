/*
 * NAME
 *   cli.ts - the command line: node dist/mail.js [MODE] [OPTIONS]
 *
 * SYNOPSIS
 *   node dist/mail.js                      run: flush now, every 60 s, and when mail is queued
 *   node dist/mail.js --flush [--force]    one pass, a summary, exit
 *   node dist/mail.js --queue [--json]     the queue, like mailq
 *   node dist/mail.js --send -f FROM RCPT...; --serve; --demo; --vrfy/--expn/--help-server;
 *   --dkim-keygen/--dkim-print-dns/--check-domain
 *   node dist/mail.js --delete|--hold|--release|--requeue ID|ALL   postsuper -d/-h/-H/-r
 *   node dist/mail.js --suspend DOMAIN [--seconds N]; --resume DOMAIN
 *   node dist/mail.js [--flush] --metrics HOST:PORT   Prometheus text at /metrics while it runs
 *
 * DESCRIPTION
 *   SPEC section 3 on top of the library: flags parsed into MailOptions (checked by
 *   options.ts, so the engine and the command line refuse a bad value in the same words),
 *   then one mode run with a MailEngine, the receiver, the direct client or dkim.ts.
 *   build.mjs bundles this file as dist/mail.js; the library entry (dist/index.js) is
 *   mail.ts, which never runs a command line.
 *
 *   Queue control (--delete, --hold, --release, --requeue, --suspend, --resume) and --flush
 *   are safe while another process sends from the spool: when the spool's lock is held by a
 *   live process, the request is handed to it as a file in the spool's .requests/ (queue.ts),
 *   which the engine watches and answers; otherwise this process takes the lock and does it.
 *   A request file rather than a signal to the pid in the lock: a signal cannot say what is
 *   asked (an id, --force) nor bring an answer back, SIGUSR1's default action kills a process
 *   that has no handler (a talker that embeds the engine, or another program that was given a
 *   dead holder's pid), and a file reaches only whoever owns the spool, with our permissions.
 *   One unlink decides whether the engine took a request or its asker withdrew it.
 *
 * DIAGNOSTICS
 *   Exit status 0 when the pass or run worked (deferred and bounced mail are normal
 *   outcomes); 2 for a usage or configuration error, with one line naming the flag; 1 for
 *   anything else, with its message.
 */

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { MailEngine, VERSION, type FlushSummary } from "./mail.js";
import { DEFAULTS, UsageError, parseHostPort, type MailOptions } from "./options.js";
import { checkDsn, formatAge, syslogDate } from "./compose.js";
import { startServer, checkServerOptions, type ServerOptions } from "./receiver.js";
import { vrfy, expn, help } from "./client.js";
import { loadDkimKeys, generateDkimKey, dnsRecord, spfRecord, dmarcRecord, checkDomain, formatCheck, DkimConfigError, type DkimKey } from "./dkim.js";
import { Spool, SpoolError, addressProblem, isQueueId, type ControlResult, type ControlVerb } from "./queue.js";
import { printable } from "./smtp-codes.js";
import { PolicyError, Shaper, checkPolicy, isDomainName, readSuspensions, type Policy, type Suspension } from "./policy.js";
import { CONTROL_DONE, MailLog, resumedLine, suspendedLine } from "./log.js";
import { serveMetrics } from "./metrics.js";

type FlagKind = "bool" | "int" | "string" | "list";
interface FlagSpec { kind: FlagKind; key?: keyof MailOptions; help: string; arg?: string }

const MODE_FLAGS: Record<string, FlagSpec> = {
  "--flush": { kind: "bool", help: "one pass: send every message that is due, wait, print a summary, exit" },
  "--force": { kind: "bool", help: "with --flush: deferred messages count as due" },
  "--queue": { kind: "bool", help: "list the queue like mailq" },
  "--json": { kind: "bool", help: "with --queue: the JSON listing" },
  "--send": { kind: "bool", help: "compose a message from standard input and queue it; prints the queue id" },
  "-f": { kind: "string", arg: "FROM", help: "with --send: the envelope sender and From:" },
  "-s": { kind: "string", arg: "SUBJECT", help: "with --send: the Subject:" },
  "--notify": { kind: "string", arg: "LIST", help: "with --send: DSN NOTIFY, never or success,failure,delay" },
  "--ret": { kind: "string", arg: "full|hdrs", help: "with --send: DSN RET" },
  "--serve": { kind: "bool", help: "run the built-in SMTP receiver for the local mailboxes in users/" },
  "--demo": { kind: "bool", help: "on loopback only: receiver, queue, flush, show where it landed" },
  "--help": { kind: "bool", help: "this text" },
  "--version": { kind: "bool", help: "the version" },
  "--listen": { kind: "string", arg: "HOST:PORT", help: "--serve: where to listen (127.0.0.1:2525)" },
  "--hostname": { kind: "string", arg: "NAME", help: "--serve: the name in the greeting" },
  "--max-size": { kind: "int", arg: "BYTES", help: "--serve: message size limit (10 MB)" },
  "--max-recipients": { kind: "int", arg: "N", help: "--serve: recipients per message, 100..1000 (100)" },
  "--tls-cert": { kind: "string", arg: "FILE", help: "--serve: certificate for STARTTLS" },
  "--tls-key": { kind: "string", arg: "FILE", help: "--serve: key for STARTTLS" },
  "--dkim-keygen": { kind: "bool", help: "write a new DKIM key and print its DNS record" },
  "--dkim-algorithm": { kind: "string", arg: "ed25519|rsa", help: "DKIM key type for --dkim-keygen" },
  "--dkim-print-dns": { kind: "bool", help: "print the DNS record of an existing DKIM key" },
  "--check-domain": { kind: "string", arg: "D", help: "check MX, SPF, DMARC, DKIM of a domain" },
  "--source-ip": { kind: "string", arg: "IP", help: "with --check-domain: check this address's PTR" },
  "--vrfy": { kind: "string", arg: "ADDRESS", help: "ask --relay to verify an address" },
  "--expn": { kind: "string", arg: "NAME", help: "ask --relay to expand a list" },
  "--help-server": { kind: "string", arg: "[TOPIC]", help: "ask --relay for HELP" },
  "--delete": { kind: "string", arg: "ID|ALL", help: "postsuper -d: delete a waiting message, or every one" },
  "--hold": { kind: "string", arg: "ID|ALL", help: "postsuper -h: put on hold (hold/): never sent until released" },
  "--release": { kind: "string", arg: "ID|ALL", help: "postsuper -H: release from hold: back to outgoing/, due now" },
  "--requeue": { kind: "string", arg: "ID|ALL", help: "postsuper -r: deferred mail due now" },
  "--suspend": { kind: "string", arg: "DOMAIN", help: "no connections to a domain (or a provider of the policy) for --seconds" },
  "--seconds": { kind: "int", arg: "N", help: "with --suspend: how long (3600)" },
  "--resume": { kind: "string", arg: "DOMAIN", help: "lift a suspension now" },
};

const OPTION_FLAGS: Record<string, FlagSpec> = {
  "--maildir": { kind: "string", key: "maildir", arg: "DIR", help: "the spool (./maildir)" },
  "--relay": { kind: "string", key: "relay", arg: "HOST[:PORT]", help: "send everything through this smarthost, no MX lookup" },
  "--port": { kind: "int", key: "port", arg: "N", help: "TCP port for hosts found by MX/A lookup (25)" },
  "--resolver": { kind: "string", key: "resolver", arg: "IP[:PORT]", help: "DNS server for MX/A lookups (the system's)" },
  "--max-connections": { kind: "int", key: "maxConnections", arg: "N", help: "connection slots (5)" },
  "--helo": { kind: "string", key: "helo", arg: "NAME", help: "name sent in EHLO/HELO (the host name)" },
  "--tls": { kind: "string", key: "tls", arg: "MODE", help: "none, may, encrypt, verify or dane (may; verify with --auth)" },
  "--tls-ca": { kind: "string", key: "tlsCa", arg: "FILE", help: "extra CA bundle for --tls verify, MTA-STS and its policy fetches" },
  "--no-mta-sts": { kind: "bool", help: "do not look up or apply MTA-STS policies (RFC 8461)" },
  "--tls-rpt-org": { kind: "string", key: "tlsRptOrg", arg: "NAME", help: "TLS reports (RFC 8460): our organisation's name (--helo)" },
  "--tls-rpt-contact": { kind: "string", key: "tlsRptContact", arg: "ADDRESS", help: "TLS reports: the contact address they give (--postmaster)" },
  "--tls-wrapper": { kind: "bool", key: "tlsWrapper", help: "implicit TLS from the first byte (SMTPS; a relay on port 465 implies it)" },
  "--auth": { kind: "string", key: "auth", arg: "USER:PASS", help: "SMTP AUTH to the relay; MUDMAIL_AUTH is preferred (MUDMAIL_XOAUTH2: a bearer token)" },
  "--log": { kind: "string", key: "log", arg: "FILE", help: "where log lines go (standard error)" },
  "--connect-timeout": { kind: "int", key: "connectTimeout", arg: "S", help: "smtp_connect_timeout (30)" },
  "--helo-timeout": { kind: "int", key: "heloTimeout", arg: "S", help: "smtp_helo_timeout (300)" },
  "--mail-timeout": { kind: "int", key: "mailTimeout", arg: "S", help: "smtp_mail_timeout (300)" },
  "--rcpt-timeout": { kind: "int", key: "rcptTimeout", arg: "S", help: "smtp_rcpt_timeout (300)" },
  "--data-init-timeout": { kind: "int", key: "dataInitTimeout", arg: "S", help: "smtp_data_init_timeout (120)" },
  "--data-xfer-timeout": { kind: "int", key: "dataXferTimeout", arg: "S", help: "smtp_data_xfer_timeout (180)" },
  "--data-done-timeout": { kind: "int", key: "dataDoneTimeout", arg: "S", help: "smtp_data_done_timeout (600)" },
  "--quit-timeout": { kind: "int", key: "quitTimeout", arg: "S", help: "smtp_quit_timeout (300)" },
  "--min-backoff": { kind: "int", key: "minBackoff", arg: "S", help: "minimal_backoff_time (300)" },
  "--max-backoff": { kind: "int", key: "maxBackoff", arg: "S", help: "maximal_backoff_time (4000)" },
  "--max-queue-lifetime": { kind: "int", key: "maxQueueLifetime", arg: "S", help: "maximal_queue_lifetime (432000)" },
  "--fallback-relay": { kind: "string", key: "fallbackRelay", arg: "HOST[:PORT]", help: "fallback_relay" },
  "--inet-interfaces": { kind: "list", key: "inetInterfaces", arg: "LIST", help: "inet_interfaces, for mail-loop detection" },
  "--best-mx-relay": { kind: "string", key: "bestMxRelay", arg: "HOST[:PORT]", help: "best_mx_transport" },
  "--ignore-mx-lookup-error": { kind: "bool", key: "ignoreMxLookupError", help: "ignore_mx_lookup_error" },
  "--disable-dns-lookups": { kind: "bool", key: "disableDnsLookups", help: "disable_dns_lookups (needs --relay)" },
  "--skip-quit-response": { kind: "bool", key: "skipQuitResponse", help: "smtp_skip_quit_response (on)" },
  "--no-skip-quit-response": { kind: "bool", help: "wait for the reply to QUIT" },
  "--notify-classes": { kind: "list", key: "notifyClasses", arg: "LIST", help: "notify_classes (resource,software)" },
  "--postmaster": { kind: "string", key: "postmaster", arg: "ADDRESS", help: "error_notice_recipient" },
  "--debug-peer": { kind: "list", key: "debugPeer", arg: "HOST|IP|CIDR", help: "debug_peer_list (repeatable)" },
  "--delay-warning": { kind: "int", key: "delayWarning", arg: "HOURS", help: "delay_warning_time (off)" },
  "--dkim-domain": { kind: "string", key: "dkimDomain", arg: "D", help: "DKIM: sign mail From this domain (or a subdomain)" },
  "--dkim-selector": { kind: "string", key: "dkimSelector", arg: "S", help: "DKIM: the selector (S._domainkey.D)" },
  "--dkim-key": { kind: "string", key: "dkimKey", arg: "FILE", help: "DKIM: the private key (PEM; RSA >= 2048 bits or Ed25519)" },
  "--dkim-keys": { kind: "string", key: "dkimKeys", arg: "FILE", help: "DKIM: a JSON table of From domains to selector and key" },
  "--policy": { kind: "string", arg: "FILE", help: "per-destination and per-provider limits and reply rules (JSON)" },
  "--metrics": { kind: "string", arg: "HOST:PORT", help: "run or --flush: serve Prometheus metrics at http://HOST:PORT/metrics" },
  "--syslog-name": { kind: "string", key: "syslogName", arg: "NAME", help: "syslog_name: log lines read NAME/smtp[pid] (mudmail)" },
};

export function usage(): string {
  const rows = (table: Record<string, FlagSpec>) => Object.entries(table)
    .map(([flag, spec]) => `  ${`${flag}${spec.arg ? ` ${spec.arg}` : ""}`.padEnd(34)} ${spec.help}`).join("\n");
  return `mudmail ${VERSION} - an outgoing-mail engine for programs that live in one event loop

Usage: node dist/mail.js [MODE] [OPTIONS]
  (no mode)                          run: flush now, then every 60 s and when mail is queued;
                                     SIGINT/SIGTERM stop gracefully
  --send -f FROM [-s SUBJECT] RCPT...  compose from standard input and queue

Modes and their flags:
${rows(MODE_FLAGS)}

Options:
${rows(OPTION_FLAGS)}

Exit status: 0 when the run or pass worked (deferred and bounced mail is a normal outcome),
2 for a usage or configuration error, 1 for anything else.
`;
}

interface Parsed { modes: Record<string, string | boolean>; options: MailOptions; rest: string[] }

export function parseArgs(argv: string[]): Parsed {
  const modes: Record<string, string | boolean> = {};
  const options: Record<string, unknown> = {};
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let inline: string | undefined;
    const eq = arg.indexOf("=");
    if (arg.startsWith("--") && eq > 0) {
      inline = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const spec = MODE_FLAGS[arg] ?? OPTION_FLAGS[arg];
    if (!spec) {
      if (arg.startsWith("-") && arg !== "-") throw new UsageError(`unknown flag ${arg} (see --help)`);
      rest.push(arg);
      continue;
    }
    let value: string | boolean = true;
    if (spec.kind !== "bool") {
      const next = argv[i + 1];
      const nextIsFlag = next !== undefined && (next in MODE_FLAGS || next in OPTION_FLAGS || next.split("=")[0] in OPTION_FLAGS);
      if (inline !== undefined) value = inline;
      else if (arg === "--help-server" && (next === undefined || next.startsWith("-"))) value = "";
      else if (next !== undefined && !nextIsFlag) value = argv[++i];
      else throw new UsageError(`${arg}: missing value ${spec.arg ?? ""}`.trim());
    } else if (inline !== undefined) {
      throw new UsageError(`${arg} takes no value`);
    }
    if (arg === "--no-skip-quit-response") { options.skipQuitResponse = false; continue; }
    if (arg === "--no-mta-sts") { options.mtaSts = false; continue; }
    if (arg === "--policy") { options.policy = readPolicy(String(value)); continue; }
    if (!spec.key) {
      if (spec.kind === "int") value = String(intValue(arg, String(value)));
      modes[arg] = value;
      continue;
    }
    if (spec.kind === "int") options[spec.key] = intValue(arg, String(value));
    else if (spec.kind === "list") {
      const list = String(value).split(/[,\s]+/).filter(Boolean);
      options[spec.key] = spec.key === "debugPeer" ? [...((options[spec.key] as string[]) ?? []), ...list] : list;
    } else options[spec.key] = value;
  }
  return { modes, options: options as MailOptions, rest };
}

/** --policy FILE: the JSON, checked; a bad file is a usage error naming the file and the key. */
function readPolicy(file: string): Policy {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new UsageError(`--policy ${file}: cannot read: ${(err as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`--policy ${file}: not JSON: ${(err as Error).message}`);
  }
  try {
    return checkPolicy(json);
  } catch (err) {
    if (err instanceof PolicyError) throw new UsageError(`--policy ${file}: ${err.message}`);
    throw err;
  }
}

function intValue(flag: string, text: string): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`${flag}: expected a whole number, got ${JSON.stringify(text)}`);
  return Number(text);
}

async function readStdin(): Promise<Buffer> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Uint8Array);
  return Buffer.concat(chunks);
}

/** `node dist/mail.js ...`: returns the exit status. */
export async function main(argv: string[]): Promise<number> {
  let parsed: Parsed;
  let engine: MailEngine;
  try {
    parsed = parseArgs(argv);
    const { modes, options } = parsed;
    if (modes["--help"]) { process.stdout.write(usage()); return 0; }
    if (modes["--version"]) { process.stdout.write(`mudmail ${VERSION}\n`); return 0; }
    if (options.auth != null) process.stderr.write("mudmail: warning: --auth shows the password in the process table; prefer MUDMAIL_AUTH\n");
    else if (process.env.MUDMAIL_AUTH) options.auth = process.env.MUDMAIL_AUTH;
    if (process.env.MUDMAIL_XOAUTH2) options.xoauth2Token = process.env.MUDMAIL_XOAUTH2;
    if (modes["--max-recipients"] !== undefined) {
      const n = Number(modes["--max-recipients"]);
      if (n < 100 || n > 1000) throw new UsageError(`--max-recipients: expected 100..1000, got ${n}`);
    }
    for (const flag of ["--force", "--json", "--notify", "--ret", "-f", "-s", "--seconds"]) {
      const needs = flag === "--force" ? "--flush" : flag === "--json" ? "--queue" : flag === "--seconds" ? "--suspend" : "--send";
      if (modes[flag] && !modes[needs]) throw new UsageError(`${flag} goes with ${needs}`);
    }
    const chosen = ["--flush", "--queue", "--send", "--serve", "--demo", "--dkim-keygen", "--dkim-print-dns", "--check-domain", "--vrfy", "--expn", "--help-server",
      ...Object.keys(CONTROL_MODES), "--suspend", "--resume"]
      .filter((m) => modes[m] !== undefined);
    if (chosen.length > 1) throw new UsageError(`choose one mode, not ${chosen.join(" and ")}`);
    if (!modes["--send"] && parsed.rest.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(parsed.rest[0])}`);
    const mode = chosen[0];
    if (modes["--metrics"] !== undefined) {
      if (mode !== undefined && mode !== "--flush") throw new UsageError(`--metrics goes with the run mode or --flush, not ${mode}`);
      if (!/:\d+$/.test(String(modes["--metrics"]))) throw new UsageError(`--metrics: expected HOST:PORT, got ${JSON.stringify(modes["--metrics"])}`);
      parseHostPort(String(modes["--metrics"]), "--metrics", 0);
    }
    // Modes that do not send from the spool come first: --dkim-keygen's --dkim-key is a file still to be made.
    if (mode === "--dkim-keygen") return await dkimKeygen(modes, options);
    if (mode === "--dkim-print-dns") return printDkimDns(options);
    if (mode === "--check-domain") return await checkDomainMode(String(modes["--check-domain"]), modes, options);
    if (mode === "--vrfy" || mode === "--expn" || mode === "--help-server") return await ask(mode, String(modes[mode]), options);
    if (mode === "--serve") return await serve(serverOptions(modes, options));
    engine = new MailEngine(options);
    if (mode === "--demo") return await demo(modes, options);
    if (mode in CONTROL_MODES) return await queueControl(CONTROL_MODES[mode as keyof typeof CONTROL_MODES], String(modes[mode]), options);
    if (mode === "--suspend" || mode === "--resume") return await suspension(mode, String(modes[mode]), modes, options);
    if (mode === "--send") {
      if (typeof modes["-f"] !== "string") throw new UsageError("--send needs -f FROM");
      if (parsed.rest.length === 0) throw new UsageError("--send needs at least one recipient");
      for (const rcpt of parsed.rest) {
        const problem = addressProblem(rcpt);
        if (problem) throw new UsageError(`--send: bad recipient ${JSON.stringify(rcpt)}: ${problem}`);
      }
      const sender = modes["-f"];
      if (sender !== "" && sender !== "<>" && addressProblem(sender)) throw new UsageError(`-f: bad sender ${JSON.stringify(sender)}: ${addressProblem(sender)}`);
      const dsn = modes["--notify"] !== undefined || modes["--ret"] !== undefined ? {
        ...(typeof modes["--notify"] === "string" ? { notify: modes["--notify"].split(",").map((n) => n.trim()) as Array<"never"> } : {}),
        ...(typeof modes["--ret"] === "string" ? { ret: modes["--ret"].toLowerCase() as "full" } : {}),
      } : undefined;
      checkDsn(dsn);
      const text = (await readStdin()).toString("utf8");
      const id = await engine.send({ from: sender === "<>" ? "" : sender, to: parsed.rest, subject: typeof modes["-s"] === "string" ? modes["-s"] : "", text, dsn });
      process.stdout.write(`${id}\n`);
      return 0;
    }
  } catch (err) {
    if (err instanceof UsageError || err instanceof DkimConfigError) {
      process.stderr.write(`mudmail: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const { modes, options } = parsed;
  if (modes["--queue"]) return listQueue(engine, options, Boolean(modes["--json"]));
  if (modes["--flush"]) {
    // postqueue -f: an engine that holds the lock flushes when asked; else this process does.
    const holder = new Spool(options.maildir ?? DEFAULTS.maildir).holder();
    if (holder !== null) {
      const { by } = await byLockHolder(options, { op: "flush", force: Boolean(modes["--force"]) }, async () => null);
      process.stdout.write(`mudmail: flush: asked the running mudmail (pid ${by}) to flush the queue now${modes["--force"] ? ", deferred mail too" : ""}; it is flushing (postqueue -f)\n`);
      return 0;
    }
    const metrics = await metricsServer(modes, engine);
    try {
      return await flushOnce(engine, Boolean(modes["--force"]));
    } finally {
      metrics?.close();
    }
  }
  await new Spool(options.maildir ?? DEFAULTS.maildir).init(); // an unusable spool stops the daemon now, not at its first tick
  const metrics = await metricsServer(modes, engine);
  try {
    return await runDaemon(engine);
  } finally {
    metrics?.close();
  }
}

/** --metrics HOST:PORT: GET /metrics answers with engine.metrics() (metrics.ts); an address that cannot be had exits 2. */
async function metricsServer(modes: Record<string, string | boolean>, engine: MailEngine): Promise<{ close(): void } | null> {
  if (modes["--metrics"] === undefined) return null;
  const at = parseHostPort(String(modes["--metrics"]), "--metrics", 0);
  void engine.metrics().catch(() => undefined); // the loop's delay is measured from now on
  try {
    return await serveMetrics(at, () => engine.metrics());
  } catch (err) {
    throw new UsageError(`--metrics: cannot listen on ${modes["--metrics"]}: ${(err as Error).message}`);
  }
}

/** The receiver's options from the command line; checked, so a bad one exits 2 naming its flag. */
function serverOptions(modes: Record<string, string | boolean>, options: MailOptions): ServerOptions {
  const value = (flag: string) => (typeof modes[flag] === "string" ? (modes[flag] as string) : undefined);
  const number = (flag: string) => (value(flag) === undefined ? undefined : Number(value(flag)));
  const serve: ServerOptions = {
    maildir: options.maildir ?? DEFAULTS.maildir,
    listen: value("--listen"),
    hostname: value("--hostname") ?? options.helo,
    maxSize: number("--max-size"),
    maxRecipients: number("--max-recipients"),
    tlsCert: value("--tls-cert") ?? null,
    tlsKey: value("--tls-key") ?? null,
    ...(typeof options.log === "string" ? { log: appendLine(options.log) } : {}),
  };
  checkServerOptions(serve);
  return serve;
}

function appendLine(file: string): (line: string) => void {
  const stream = fs.createWriteStream(file, { flags: "a", mode: 0o600 });
  return (line) => stream.write(line + "\n");
}

/** --serve: the receiver until SIGINT or SIGTERM. */
async function serve(options: ServerOptions): Promise<number> {
  const server = await startServer(options).catch((err: NodeJS.ErrnoException) => {
    // An address that cannot be had is a configuration error: exit 2, naming the flag.
    if (err.syscall === "listen" || err.syscall === "getaddrinfo" || err.code === "ENOTFOUND") {
      throw new UsageError(`--listen: cannot listen on ${options.listen ?? "127.0.0.1:2525"}: ${err.message}`);
    }
    throw err;
  });
  process.stderr.write(`mudmail: receiving mail for ${path.join(options.maildir, "users")}/<address>/ on ${server.address.host}:${server.address.port}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => { process.off("SIGINT", stop); process.off("SIGTERM", stop); resolve(); };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
  });
  await server.close();
  return 0;
}

/**
 * --demo: the whole path on loopback, in a fresh spool: the receiver on a free port with a
 * demo user, a message queued through the engine, flushed through the relay at the receiver,
 * then the log lines and the mailbox it landed in.
 */
async function demo(modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const maildir = options.maildir ?? path.join(await fs.promises.mkdtemp(path.join(os.tmpdir(), "mudmail-demo-")), "maildir");
  const user = "demo@localhost";
  await new Spool(maildir).init();
  await fs.promises.mkdir(path.join(maildir, "users", user), { recursive: true, mode: 0o700 });
  const journal: string[] = [];
  const server = await startServer({ maildir, listen: "127.0.0.1:0", hostname: "localhost", log: (line) => journal.push(line) });
  const stored = new Promise<string[]>((resolve) => server.once("message", (m: { mailboxes: string[] }) => resolve(m.mailboxes)));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.address.port}`, tls: "may", helo: "localhost", log: (l) => lines.push(l) });
  try {
    const say = (text: string) => process.stdout.write(`${text}\n`);
    say(`mudmail demo: a receiver on 127.0.0.1:${server.address.port} with the user ${user}, the spool in ${maildir}`);
    const id = await engine.send({ from: "talker@localhost", to: user, subject: "Welcome to the talker", text: "Hello from mudmail!\n.\nThis line follows a line with a lone dot.\n" });
    say(`queued ${id}; flushing through the relay at the receiver...\n`);
    const summary = await engine.flush();
    await engine.stop();
    for (const l of lines) say(l);
    say(`\nmudmail: flush: ${summaryText(summary)}`);
    const [mailbox] = await Promise.race([stored, new Promise<string[]>((_, reject) => setTimeout(() => reject(new Error("the receiver stored nothing")), 10_000))]);
    say(`\nThe receiver's journal:`);
    for (const l of journal) say(`  ${l}`);
    say(`\nIt landed in ${mailbox}:\n`);
    say((await fs.promises.readFile(mailbox, "utf8")).replace(/\n$/, ""));
    return summary.sent === 1 ? 0 : 1;
  } finally {
    await engine.stop();
    await server.close();
  }
}

/** --dkim-keygen: a new private key (0600) and the TXT record to publish, with SPF and DMARC starters. */
async function dkimKeygen(modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const domain = options.dkimDomain;
  const selector = options.dkimSelector;
  if (!domain) throw new UsageError("--dkim-keygen needs --dkim-domain D");
  if (!selector) throw new UsageError("--dkim-keygen needs --dkim-selector S");
  const algorithm = typeof modes["--dkim-algorithm"] === "string" ? modes["--dkim-algorithm"] : "ed25519";
  if (algorithm !== "ed25519" && algorithm !== "rsa") throw new UsageError(`--dkim-algorithm: expected ed25519 or rsa, got ${JSON.stringify(algorithm)}`);
  const file = options.dkimKey ?? `${selector}.${domain}.${algorithm}.key`;
  const key = await generateDkimKey(algorithm, file, { domain, selector });
  process.stdout.write(`Wrote the private key to ${file} (mode 0600). Publish:\n\n`);
  printRecords(key, options, modes);
  return 0;
}

function printRecords(key: DkimKey, options: MailOptions, modes: Record<string, string | boolean>): void {
  const record = dnsRecord(key);
  const out: string[] = [`; DKIM (${key.algorithm}, selector ${key.selector})`, record.zone, `; ${record.note}`];
  const ip = typeof modes["--source-ip"] === "string" ? modes["--source-ip"] : null;
  if (ip) {
    const spf = spfRecord(key.domain, ip);
    out.push("", "; SPF: the address mail leaves from", spf.zone, `; ${spf.note}`);
  } else {
    out.push("", "; SPF: give --source-ip ADDRESS for a record naming the address mail leaves from");
  }
  const dmarc = dmarcRecord(key.domain);
  out.push("", "; DMARC starter", dmarc.zone, `; ${dmarc.note}`);
  process.stdout.write(out.join("\n") + "\n");
  void options;
}

/** --dkim-print-dns: the TXT record of each configured key. */
function printDkimDns(options: MailOptions): number {
  const keys = loadDkimKeys({ domain: options.dkimDomain, selector: options.dkimSelector, keyFile: options.dkimKey, keysFile: options.dkimKeys });
  if (keys.length === 0) throw new UsageError("--dkim-print-dns needs --dkim-domain, --dkim-selector and --dkim-key, or --dkim-keys");
  for (const key of keys) printRecords(key, options, {});
  return 0;
}

/** --check-domain: MX, SPF, DMARC, DKIM and PTR in one table; a published key that is not ours exits 2. */
async function checkDomainMode(domain: string, modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const keys = loadDkimKeys({ domain: options.dkimDomain, selector: options.dkimSelector, keyFile: options.dkimKey, keysFile: options.dkimKeys });
  const rows = await checkDomain(domain, {
    resolver: options.resolver ?? null,
    keys,
    sourceIp: typeof modes["--source-ip"] === "string" ? modes["--source-ip"] : null,
  });
  process.stdout.write(formatCheck(rows) + "\n");
  const mismatch = rows.find((r) => r.error);
  if (mismatch?.error) throw mismatch.error;
  return 0;
}

/** --vrfy, --expn, --help-server: one question to --relay, its reply printed as the server gave it. */
async function ask(mode: string, what: string, options: MailOptions): Promise<number> {
  if (!options.relay) throw new UsageError(`${mode} needs --relay HOST[:PORT]: the server to ask`);
  const { host, port } = parseHostPort(options.relay, "--relay", 25);
  if (options.tls === "dane") throw new UsageError("--tls dane is for MX delivery: it cannot be used with --relay");
  const client = { host, port, helo: options.helo, tls: options.tls ?? "may", tlsWrapper: options.tlsWrapper };
  const call = mode === "--vrfy" ? vrfy : mode === "--expn" ? expn : help;
  try {
    const reply = await call(what, client);
    const lines = reply.text.length ? reply.text : [""];
    process.stdout.write(lines.map((l, i) => `${reply.code}${i < lines.length - 1 ? "-" : " "}${l}`).join("\n") + "\n");
    return 0;
  } catch (err) {
    process.stderr.write(`mudmail: ${(err as Error).message}\n`);
    return 1;
  }
}

/* ------------------------------------------------------------------------------------ */
/* Queue control: postsuper's -d, -h, -H, -r; suspensions                                */

const CONTROL_MODES = { "--delete": "delete", "--hold": "hold", "--release": "release", "--requeue": "requeue" } as const;
/** How long an engine that holds the lock has to take a request (it watches .requests/; a host that only ticks takes it at its tick). */
const REQUEST_WAIT_MS = 10_000;

interface Answer { ok: boolean; result?: unknown; error?: string }

/**
 * A change to the spool, made by whoever may make it: asked of the live process that holds
 * the lock, or done here under the lock when none does (also when the holder went away
 * before it took the request). `by` is the holder's pid, or null when it was done here.
 */
async function byLockHolder<T>(options: MailOptions, request: Record<string, unknown>, direct: (spool: Spool, log: MailLog) => Promise<T>): Promise<{ value: T; by: number | null }> {
  const spool = new Spool(options.maildir ?? DEFAULTS.maildir);
  await spool.init();
  let holder = spool.holder();
  for (let attempt = 0; attempt < 3; attempt++) {
    if (holder === null) {
      try {
        spool.lock();
      } catch (err) {
        if (err instanceof SpoolError && err.code === "ELOCKED") {
          holder = spool.holder();
          continue;
        }
        throw err;
      }
      const log = new MailLog(options.log ?? null, options.syslogName ?? DEFAULTS.syslogName);
      try {
        return { value: await direct(spool, log), by: null };
      } finally {
        spool.unlock();
        await log.flush();
      }
    }
    const name = await spool.putRequest(request);
    let answer = await waitForAnswer(spool, name);
    if (!answer && !(await spool.withdrawRequest(name))) {
      // Taken, not answered yet: the engine is at it.
      answer = await waitForAnswer(spool, name);
      if (!answer) throw new Error(`the running mudmail (pid ${holder}) took the request but did not answer within ${REQUEST_WAIT_MS / 1000} s`);
    }
    if (answer) {
      if (!answer.ok) throw new Error(`the running mudmail (pid ${holder}): ${answer.error}`);
      return { value: answer.result as T, by: holder };
    }
    const before = holder;
    holder = spool.holder();
    if (holder === before) {
      throw new Error(`the running mudmail (pid ${holder}) did not take the request within ${REQUEST_WAIT_MS / 1000} s (it reads requests as it runs, and at each tick); nothing was done`);
    }
  }
  throw new Error(`the spool ${spool.dir} changed hands too often; nothing was done`);
}

async function waitForAnswer(spool: Spool, name: string): Promise<Answer | null> {
  const deadline = Date.now() + REQUEST_WAIT_MS;
  for (let delay = 10; Date.now() < deadline; delay = Math.min(100, delay * 2)) {
    const answer = (await spool.takeAnswer(name)) as Answer | null;
    if (answer) return answer;
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
  return null;
}

/** --delete, --hold, --release, --requeue ID|ALL: one line of what was done, one per message left alone; exit 1 when a named id is not in the queue. */
async function queueControl(verb: ControlVerb, target: string, options: MailOptions): Promise<number> {
  if (target !== "ALL" && !isQueueId(target)) throw new UsageError(`--${verb}: expected a queue id or ALL, got ${JSON.stringify(target)}`);
  const { value: result, by } = await byLockHolder<ControlResult>(options, { op: verb, target }, async (spool, log) => {
    const done = await spool.control(verb, target);
    for (const id of done.done) log.write("postsuper", `${id}: ${CONTROL_DONE[verb]}`);
    return done;
  });
  const n = result.done.length;
  const out = [`mudmail: --${verb}: ${n} message${n === 1 ? "" : "s"} ${CONTROL_DONE[verb]}${by ? ` by the running mudmail (pid ${by})` : ""}`];
  let missing = false;
  for (const { id, folder } of result.skipped) {
    if (folder === null) missing = true;
    const why = folder === null ? "no such message in the queue"
      : folder === "outgoing_active" ? "being delivered now; try again when it is done"
        : verb === "hold" && folder === "hold" ? "already on hold"
          : verb === "release" ? `not on hold (it is in ${folder}/)`
            : verb === "requeue" ? `not deferred (it is in ${folder}/)` : `left alone (it is in ${folder}/)`;
    out.push(`mudmail: --${verb}: ${id}: ${why}`);
  }
  process.stdout.write(out.join("\n") + "\n");
  return missing ? 1 : 0;
}

/** --suspend DOMAIN [--seconds N], --resume DOMAIN: a domain, or a provider of the policy (built-in or --policy's). */
async function suspension(mode: "--suspend" | "--resume", target: string, modes: Record<string, string | boolean>, options: MailOptions): Promise<number> {
  const key = target.toLowerCase().replace(/\.$/, "");
  const shaper = new Shaper(options.policy, { connections: options.destinationConcurrencyLimit ?? DEFAULTS.destinationConcurrencyLimit });
  if (!shaper.providerNames.includes(key) && !(isDomainName(key) && key.includes("."))) {
    throw new UsageError(`${mode}: expected a domain or a provider (${shaper.providerNames.join(", ")}), got ${JSON.stringify(target)}`);
  }
  if (mode === "--resume") {
    const { value: lifted, by } = await byLockHolder<unknown>(options, { op: "resume", key }, async (spool, log) => {
      shaper.load(await spool.readState("suspended"));
      const s = shaper.resume(key);
      if (!s) return null;
      await spool.writeState("suspended", shaper.state());
      log.write("qmgr", resumedLine(key, true));
      return s;
    });
    process.stdout.write(lifted ? `mudmail: --resume: ${key}: delivery resumed${by ? ` by the running mudmail (pid ${by})` : ""}\n` : `mudmail: --resume: ${key} was not suspended\n`);
    return 0;
  }
  const seconds = modes["--seconds"] === undefined ? 3600 : Number(modes["--seconds"]);
  if (!(seconds > 0)) throw new UsageError(`--seconds: expected a number of seconds above 0, got ${modes["--seconds"]}`);
  const reason = "by the operator (--suspend)";
  const { value: s, by } = await byLockHolder<Suspension>(options, { op: "suspend", key, seconds }, async (spool, log) => {
    const now = Date.now();
    shaper.load(await spool.readState("suspended"));
    const already = shaper.suspension(key, now) !== null;
    const begun = shaper.suspend(key, seconds, reason, now);
    await spool.writeState("suspended", shaper.state());
    if (!already) log.write("qmgr", suspendedLine(key, seconds, begun.until, reason));
    return begun;
  });
  process.stdout.write(`mudmail: --suspend: ${key}: no delivery until ${syslogDate(new Date(s.until))}${by ? ` (told the running mudmail, pid ${by})` : ""}\n`);
  return 0;
}

/** The flush summary, each count with its unit: "3 messages: 2 sent, ...; 4 recipients: 3 sent, ... (0.52 s)". */
export function summaryText(s: FlushSummary): string {
  const r = s.byRecipient;
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;
  return `${plural(s.messages + s.corrupt, "message")}: ${s.sent} sent, ${s.deferred} deferred, ${s.bounced} bounced, ${s.corrupt} corrupt; ` +
    `${plural(s.recipients, "recipient")}: ${r.sent} sent, ${r.deferred} deferred, ${r.bounced} bounced (${s.seconds.toFixed(2)} s)`;
}

/** The --flush progress line: messages done (sent, deferred, bounced), the rate, and what is left. */
export function progressText(p: MailEngine["progress"], seconds: number): string {
  const done = p.sent + p.deferred + p.bounced + p.corrupt;
  const rate = seconds > 0 ? done / seconds : 0;
  return `mudmail: flush: ${done} done: ${p.sent} sent, ${p.deferred} deferred, ${p.bounced} bounced; ${rate.toFixed(1)} msgs/s; ${p.left} left`;
}

/** How often the progress line is drawn again, at most. */
const PROGRESS_MS = 1000;

async function flushOnce(engine: MailEngine, force: boolean): Promise<number> {
  // On a terminal only: one line, drawn again in place (\r, erase) at most once a second.
  const started = Date.now();
  const live = process.stderr.isTTY ? setInterval(() => {
    process.stderr.write(`\r\x1b[K${progressText(engine.progress, (Date.now() - started) / 1000)}`);
  }, PROGRESS_MS) : null;
  live?.unref();
  const stopOnSignal = () => { void engine.stop(); };
  process.once("SIGINT", stopOnSignal);
  process.once("SIGTERM", stopOnSignal);
  try {
    const s = await engine.flush({ force });
    if (live) { clearInterval(live); process.stderr.write("\r\x1b[K"); }
    await engine.stop(); // the last log lines go out before the summary
    process.stdout.write(`mudmail: flush: ${summaryText(s)}\n`);
    return 0;
  } finally {
    if (live) clearInterval(live);
    process.off("SIGINT", stopOnSignal);
    process.off("SIGTERM", stopOnSignal);
  }
}

async function runDaemon(engine: MailEngine): Promise<number> {
  engine.on("error", () => undefined); // already logged
  engine.start();
  // The engine's own timer is unref'd (an embedder's process may exit); the daemon stays up.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off("SIGINT", stop);
      process.off("SIGTERM", stop);
      void engine.stop().then(resolve);
    };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
  });
  clearInterval(keepAlive);
  return 0;
}

async function listQueue(engine: MailEngine, options: MailOptions, json: boolean): Promise<number> {
  const entries = await engine.queue();
  if (json) {
    process.stdout.write(JSON.stringify(entries, null, 2) + "\n");
    return 0;
  }
  // Suspended destinations first, from the spool's state: what holds mail back, until when.
  const now = Date.now();
  const suspended = [...readSuspensions(await new Spool(options.maildir ?? DEFAULTS.maildir).readState("suspended"))].filter(([, s]) => s.until > now);
  let out = suspended.length === 0 ? "" : "-Suspended Destination-  -----Until-----  -Reason-------\n" + suspended.map(([key, s]) =>
    `${key.padEnd(24)} ${syslogDate(new Date(s.until))}  ${printable(s.reason, 200)}${s.domains.length > 0 ? ` (${s.domains.join(", ")})` : ""}\n`).join("") + "\n";
  if (entries.length === 0) {
    process.stdout.write(out + "Mail queue is empty\n");
    return 0;
  }
  // mailq's marks: * active, ! on hold; here also # corrupt (kept for a human, never retried).
  const mark = { queued: " ", active: "*", deferred: " ", hold: "!", corrupt: "#" } as const;
  out += "-Queue ID-        --Size-- ---Arrival Time--- -Sender/Recipient-------\n";
  let bytes = 0;
  for (const e of entries) {
    bytes += e.size;
    const d = new Date(e.queuedAt);
    const when = `${d.toString().slice(0, 10)} ${d.toTimeString().slice(0, 8)}`;
    out += `${(e.id + mark[e.state]).padEnd(17)} ${String(e.size).padStart(8)} ${when}  ${e.sender === null ? "?" : e.sender || "MAILER-DAEMON"}\n`;
    // One line of state: what it is, how old, how often tried, when next, and why not yet.
    const next = e.nextAttempt ? Date.parse(e.nextAttempt) - now : null;
    const facts = [
      e.state,
      `age ${formatAge(now - d.getTime())}`,
      ...(e.attempts ? [`attempts ${e.attempts}`] : []),
      ...(next !== null && e.state !== "hold" ? [next > 0 ? `next in ${formatAge(next)}` : "due now"] : []),
      ...(e.suspendedUntil ? [`suspended until ${syslogDate(new Date(e.suspendedUntil))}`] : []),
    ];
    out += `${" ".repeat(18)}(${facts.join(", ")}${e.lastError ? `: ${printable(e.lastError, 200)}` : ""})\n`;
    for (const r of e.recipients) out += `${" ".repeat(46)}${r}\n`;
    out += "\n";
  }
  out += `-- ${Math.ceil(bytes / 1024)} Kbytes in ${entries.length} Request${entries.length === 1 ? "" : "s"}.\n`;
  process.stdout.write(out);
  return 0;
}

function isMain(): boolean {
  if (!process.argv[1]) return false;
  try {
    return fs.realpathSync(process.argv[1]) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isMain()) {
  main(process.argv.slice(2)).then(
    (status) => { process.exitCode = status; },
    (err: Error) => {
      process.stderr.write(`mudmail: ${err.message}\n`);
      // A spool that cannot be used is a configuration error, like a bad flag.
      const unusableSpool = err instanceof SpoolError && err.code === "EUNSAFE";
      process.exitCode = err instanceof UsageError || unusableSpool || err instanceof DkimConfigError ? 2 : 1;
    },
  );
}
