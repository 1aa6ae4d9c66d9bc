/*
 * NAME
 *   options.ts - what the engine is told: MailOptions, their defaults and checks, UsageError
 *
 * SYNOPSIS
 *   const o = checkOptions({ relay: "smtp.example.org:587" });  // all options resolved
 *   parseHostPort("[::1]:2525", "--relay", 25);                   // { host: "::1", port: 2525 }
 *   credentialsOf(o);                                             // AUTH's user, password, token
 *
 * DESCRIPTION
 *   Every flag of SPEC section 3 has its option here in camelCase, with Postfix's default.
 *   The engine and the command line check what they are given with this one code, so a bad
 *   value is refused with the same words, naming the flag, wherever it came from.
 *
 * DIAGNOSTICS
 *   checkOptions() throws a UsageError (a MailError, code EUSAGE) naming the flag and the
 *   value; the command line prints it and exits 2.
 */

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import { MailError, STAGE_TIMEOUTS } from "./smtp-codes.js";
import { addressProblem } from "./queue.js";
import type { Credentials, TlsMode } from "./smtp-connection.js";
import { PolicyError, checkPolicy, type Policy } from "./policy.js";

/** Every flag of SPEC section 3 in camelCase; later issues give the rest their behaviour. */
export interface MailOptions {
  maildir?: string;
  relay?: string | null;
  port?: number;
  resolver?: string | null;
  maxConnections?: number;
  helo?: string;
  /** none, may, encrypt, verify, or dane (Postfix's level: DANE where TLSA records are published, else may). */
  tls?: TlsMode | "dane";
  tlsCa?: string | null;
  /** MTA-STS (RFC 8461) for MX delivery; false is --no-mta-sts. */
  mtaSts?: boolean;
  /** TLS reports (RFC 8460): the organisation and the contact address the reports name. */
  tlsRptOrg?: string | null;
  tlsRptContact?: string | null;
  /** Seconds between TLS reports (a day); an embedding option, shorter in tests. */
  tlsRptInterval?: number;
  /** Implicit TLS from the first byte (SMTPS, port 465); a relay on port 465 implies it. */
  tlsWrapper?: boolean;
  /** USER:PASS for SMTP AUTH to the relay (MUDMAIL_AUTH on the command line). */
  auth?: string | null;
  /** An OAuth 2.0 bearer token for AUTH XOAUTH2 (MUDMAIL_XOAUTH2 on the command line). */
  xoauth2Token?: string | null;
  /** A file to append log lines to, or a function that takes each line; default stderr. */
  log?: string | ((line: string) => void) | null;
  connectTimeout?: number;
  heloTimeout?: number;
  mailTimeout?: number;
  rcptTimeout?: number;
  dataInitTimeout?: number;
  dataXferTimeout?: number;
  dataDoneTimeout?: number;
  quitTimeout?: number;
  minBackoff?: number;
  maxBackoff?: number;
  maxQueueLifetime?: number;
  fallbackRelay?: string | null;
  inetInterfaces?: string[] | null;
  bestMxRelay?: string | null;
  ignoreMxLookupError?: boolean;
  disableDnsLookups?: boolean;
  skipQuitResponse?: boolean;
  notifyClasses?: string[];
  postmaster?: string | null;
  debugPeer?: string[];
  delayWarning?: number | null;
  /** Recipients per transaction (smtp_destination_recipient_limit). */
  recipientLimit?: number;
  /** Connections per destination (default_destination_concurrency_limit): the policy's default for "connections". */
  destinationConcurrencyLimit?: number;
  /** Per-destination and per-provider limits and reply rules (--policy FILE: the same JSON). */
  policy?: Policy | null;
  /** The name log lines go under, "<name>/smtp[pid]" (Postfix's syslog_name). */
  syslogName?: string;
  /** Seconds between ticks when the engine keeps its own timer. */
  tickInterval?: number;
  /** fsync queue files when they are written (default true). */
  fsync?: boolean;
  /** Seconds a DNS query may take per try (two tries); an embedding option, no flag. */
  dnsTimeout?: number;
  /** DKIM signing: one key (--dkim-domain, --dkim-selector, --dkim-key) or a key table (--dkim-keys). */
  dkimDomain?: string | null;
  dkimSelector?: string | null;
  dkimKey?: string | null;
  dkimKeys?: string | null;
}

export type Resolved = Required<Omit<MailOptions, "log">> & { log: MailOptions["log"] };

export const DEFAULTS: Resolved = {
  maildir: "./maildir", relay: null, port: 25, resolver: null, maxConnections: 5,
  helo: os.hostname(), tls: "may", tlsCa: null, mtaSts: true, tlsRptOrg: null, tlsRptContact: null, tlsRptInterval: 86_400, tlsWrapper: false, auth: null, xoauth2Token: null, log: null,
  connectTimeout: STAGE_TIMEOUTS.connect, heloTimeout: STAGE_TIMEOUTS.helo, mailTimeout: STAGE_TIMEOUTS.mail,
  rcptTimeout: STAGE_TIMEOUTS.rcpt, dataInitTimeout: STAGE_TIMEOUTS.dataInit, dataXferTimeout: STAGE_TIMEOUTS.dataXfer,
  dataDoneTimeout: STAGE_TIMEOUTS.dataDone, quitTimeout: STAGE_TIMEOUTS.quit,
  minBackoff: 300, maxBackoff: 4000, maxQueueLifetime: 432000,
  fallbackRelay: null, inetInterfaces: null, bestMxRelay: null, ignoreMxLookupError: false,
  disableDnsLookups: false, skipQuitResponse: true, notifyClasses: ["resource", "software"],
  postmaster: null, debugPeer: [], delayWarning: null,
  recipientLimit: 50, destinationConcurrencyLimit: 20, tickInterval: 60, fsync: true, dnsTimeout: 5,
  dkimDomain: null, dkimSelector: null, dkimKey: null, dkimKeys: null, policy: null, syslogName: "mudmail",
};

/** A bad option or argument: names the flag; exits 2 from the command line. */
export class UsageError extends MailError {
  constructor(message: string) {
    super(message, "EUSAGE");
    this.name = "UsageError";
  }
}

export function checkOptions(input: MailOptions): Resolved {
  const o = { ...DEFAULTS } as Resolved;
  for (const [key, value] of Object.entries(input)) if (value !== undefined) (o as Record<string, unknown>)[key] = value;
  const positive = (key: keyof MailOptions, flag: string, max = 1e9) => {
    const v = o[key] as unknown;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0 || v > max) {
      throw new UsageError(`${flag}: expected a positive number${max < 1e9 ? ` up to ${max}` : ""}, got ${JSON.stringify(v)}`);
    }
  };
  positive("maxConnections", "--max-connections", 1000);
  if (!Number.isInteger(o.maxConnections)) throw new UsageError(`--max-connections: expected a whole number, got ${o.maxConnections}`);
  positive("port", "--port", 65535);
  for (const [key, flag] of TIMEOUT_FLAGS) positive(key, flag);
  positive("minBackoff", "--min-backoff");
  positive("maxBackoff", "--max-backoff");
  positive("maxQueueLifetime", "--max-queue-lifetime");
  positive("recipientLimit", "recipientLimit");
  positive("destinationConcurrencyLimit", "destinationConcurrencyLimit");
  positive("tickInterval", "tickInterval");
  positive("dnsTimeout", "dnsTimeout");
  if (o.maxBackoff < o.minBackoff) throw new UsageError(`--max-backoff (${o.maxBackoff}) is less than --min-backoff (${o.minBackoff})`);
  if (!["none", "may", "encrypt", "verify", "dane"].includes(o.tls)) throw new UsageError(`--tls: expected none, may, encrypt, verify or dane, got ${JSON.stringify(o.tls)}`);
  if (o.tls === "dane" && o.relay) throw new UsageError("--tls dane is for MX delivery: it cannot be used with --relay");
  positive("tlsRptInterval", "tlsRptInterval");
  if (o.tlsRptContact != null && addressProblem(o.tlsRptContact.replace(/^mailto:/i, ""))) throw new UsageError(`--tls-rpt-contact: ${addressProblem(o.tlsRptContact.replace(/^mailto:/i, ""))}`);
  if (o.tlsRptOrg != null && (o.tlsRptOrg.trim() === "" || /[\x00-\x1f]/.test(o.tlsRptOrg))) throw new UsageError(`--tls-rpt-org: not a name: ${JSON.stringify(o.tlsRptOrg)}`);
  for (const [key, flag] of [["relay", "--relay"], ["fallbackRelay", "--fallback-relay"], ["bestMxRelay", "--best-mx-relay"]] as const) {
    if (o[key] != null) parseHostPort(String(o[key]), flag, 25);
  }
  if (o.resolver != null) parseHostPort(o.resolver, "--resolver", 53, true);
  for (const entry of o.inetInterfaces ?? []) {
    if (!["all", "loopback-only"].includes(entry) && !net.isIP(entry)) {
      throw new UsageError(`--inet-interfaces: expected all, loopback-only or IP addresses, got ${JSON.stringify(entry)}`);
    }
  }
  if (o.delayWarning != null) positive("delayWarning", "--delay-warning");
  if (!o.helo || /[\s<>\x00-\x1f]/.test(o.helo)) throw new UsageError(`--helo: not a host name: ${JSON.stringify(o.helo)}`);
  if (o.postmaster != null && addressProblem(o.postmaster)) throw new UsageError(`--postmaster: ${addressProblem(o.postmaster)}`);
  const classes = ["bounce", "delay", "protocol", "resource", "software", "policy"];
  for (const c of o.notifyClasses) if (!classes.includes(c)) throw new UsageError(`--notify-classes: unknown class ${JSON.stringify(c)} (expected ${classes.join(", ")})`);
  if (o.auth != null && !o.auth.includes(":")) throw new UsageError("--auth: expected USER:PASS");
  if ((o.auth != null || o.xoauth2Token != null) && !o.relay) throw new UsageError("--auth needs --relay: credentials go to a relay, never to MX hosts");
  if (o.xoauth2Token != null && !o.auth) throw new UsageError("XOAUTH2 needs the user name: --auth USER: or MUDMAIL_AUTH=USER: with the token in MUDMAIL_XOAUTH2");
  // With credentials, the default is to check the relay's certificate (SPEC section 3).
  if ((o.auth != null || o.xoauth2Token != null) && input.tls === undefined) o.tls = "verify";
  if (o.tlsCa != null) {
    try {
      fs.accessSync(o.tlsCa, fs.constants.R_OK);
    } catch (err) {
      throw new UsageError(`--tls-ca: cannot read ${o.tlsCa}: ${(err as Error).message}`);
    }
  }
  if (o.policy != null) {
    try {
      checkPolicy(o.policy);
    } catch (err) {
      if (err instanceof PolicyError) throw new UsageError(`--policy: ${err.message}`);
      throw err;
    }
  }
  if (typeof o.syslogName !== "string" || !/^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$/.test(o.syslogName)) {
    throw new UsageError(`--syslog-name: expected a name of letters, digits, ".", "_", "-" or "/", got ${JSON.stringify(o.syslogName)}`);
  }
  if (o.disableDnsLookups && !o.relay) throw new UsageError("--disable-dns-lookups needs --relay: without DNS, mail can only go to a relay");
  return o;
}

const TIMEOUT_FLAGS: ReadonlyArray<readonly [keyof MailOptions, string]> = [
  ["connectTimeout", "--connect-timeout"], ["heloTimeout", "--helo-timeout"], ["mailTimeout", "--mail-timeout"],
  ["rcptTimeout", "--rcpt-timeout"], ["dataInitTimeout", "--data-init-timeout"], ["dataXferTimeout", "--data-xfer-timeout"],
  ["dataDoneTimeout", "--data-done-timeout"], ["quitTimeout", "--quit-timeout"],
];

/** HOST[:PORT] or [IPv6]:PORT. */
export function parseHostPort(text: string, flag: string, defaultPort: number, ipOnly = false): { host: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s\[\]]+))(?::(\d{1,5}))?$/.exec(text) ?? /^([0-9A-Fa-f:]+:[0-9A-Fa-f:]*)$/.exec(text);
  if (!m) throw new UsageError(`${flag}: expected HOST[:PORT], got ${JSON.stringify(text)}`);
  const host = m[1] ?? m[2];
  const port = m[3] ? Number(m[3]) : defaultPort;
  if (!(port >= 1 && port <= 65535)) throw new UsageError(`${flag}: port out of range in ${JSON.stringify(text)}`);
  if (ipOnly && !net.isIP(host)) throw new UsageError(`${flag}: expected an IP address, got ${JSON.stringify(host)}`);
  if (!ipOnly && !net.isIP(host) && !/^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$/.test(host)) {
    throw new UsageError(`${flag}: not a host name: ${JSON.stringify(host)}`);
  }
  return { host, port };
}

/* ------------------------------------------------------------------------------------ */
/* Errors and outcomes                                                                   */

/** AUTH to the relay, from --auth (USER:PASS) and the XOAUTH2 token; null without a relay or credentials. */
export function credentialsOf(o: Resolved): Credentials | null {
  const { auth, xoauth2Token } = o;
  if (!o.relay || (auth == null && xoauth2Token == null)) return null;
  const colon = (auth ?? "").indexOf(":");
  return {
    user: colon >= 0 ? auth!.slice(0, colon) : (auth ?? ""),
    password: colon >= 0 ? auth!.slice(colon + 1) : "",
    token: xoauth2Token,
  };
}
