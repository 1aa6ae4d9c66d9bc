/*
 * NAME
 *   dkim.ts - DKIM signing (RFC 6376, rsa-sha256 and RFC 8463 ed25519-sha256), the DNS
 *   records to publish, and a deliverability check of a sending domain
 *
 * SYNOPSIS
 *   Keys (once, at start; synchronous, small files):
 *     const keys = loadDkimKeys({ domain, selector, keyFile, keysFile });   // DkimKey[]
 *     keysFor("sub.example.org", keys)           // the keys that sign that From domain
 *
 *   Signing a queue message (once per message), streaming:
 *     const sig = await dkimSignatureFor(chunks, keysFor(domain, keys));   // "DKIM-Signature: ...\r\n"
 *     const r = await signByFrom(chunks, keys); // picks the keys by the header From itself:
 *                                               // { fields, fromDomain, keys, skipped }
 *     chunks = prefix (the headers the engine adds, CRLF) then the raw content, as the
 *     engine sends it, NOT yet CRLF-normalised; the fields go in front of the prefix.
 *     With { wire: true } the chunks are the wire form instead (prefix, then the content
 *     stuffed, then CRLF.CRLF), as measureWire made it: no second stuffing pass.
 *
 *   The parts, for other callers:
 *     const h = new BodyHash(); h.push(bodyBytes) ...; h.digest()  // bh=, base64 sha256
 *     await signMessage(headerBlock, bodyHash, keys, { now, headers })  // the header field(s)
 *     const { headerBlock, bodyHash } = await hashMessage(chunks);
 *     relaxedHeader("Subject:  a\r\n\tb ")     // "subject:a b\r\n"
 *     fromDomain(headerBlock)                   // "example.org" or null
 *
 *   Keys and DNS records (--dkim-keygen, --dkim-print-dns):
 *     const key = await generateDkimKey("ed25519" | "rsa", file, { domain, selector });
 *     dnsRecord(key)          // { name: "S._domainkey.D", type: "TXT", value: "v=DKIM1; k=...; p=...", zone, note }
 *     spfRecord(domain, ip)   // { name: D, value: "v=spf1 ip4:IP -all", zone, note }
 *     dmarcRecord(domain)     // { name: "_dmarc.D", value: "v=DMARC1; p=none; rua=mailto:postmaster@D", zone, note }
 *
 *   Deliverability check (--check-domain D [--source-ip IP] [--resolver IP[:PORT]]):
 *     const rows = await checkDomain(domain, { resolver: "127.0.0.1:53", keys, sourceIp, dnsTimeout: 5 });
 *     process.stdout.write(formatCheck(rows));
 *
 * DESCRIPTION
 *   A signature covers the message as its recipient reads it: what the Stuffer of queue.ts
 *   puts on the wire (every line end CRLF, lines over 998 octets folded, dots stuffed) with
 *   the stuffing undone by the DotDecoder a receiver uses, the headers the engine adds
 *   included. So it stays valid through mudmail's CRLF normalisation, line folding (a
 *   dot-first line is folded one octet earlier on the wire), dot-stuffing and added Date,
 *   Message-ID and From, provided those are part of the chunks signed, byte for byte as sent.
 *
 *   Canonicalization is relaxed/relaxed. The body hash is streamed: BodyHash keeps only
 *   the count of line ends not yet known to be trailing empty lines, whether a run of
 *   white space is pending, and a 64 KiB output buffer; any chunking gives the same hash.
 *   The header block (everything before the first empty line, at most 1 MiB) is held
 *   whole: it is all that is signed beside the body hash.
 *
 *   Signed header fields (h=): From, To, Cc, Subject, Date, Message-ID, Reply-To,
 *   MIME-Version, Content-Type, Content-Transfer-Encoding, In-Reply-To, References; each
 *   as many times as it occurs (the verifier takes instances from the bottom up), and From
 *   once more, so that no From can be added later without breaking the signature
 *   (signByFrom signs no message with two From fields at all, and says why). The
 *   tags are v=1; a=; c=relaxed/relaxed; d=; s=; t=; bh=; h=; b=, folded at 78 columns.
 *   One field per key, RSA first: with an RSA and an Ed25519 key for a domain the message
 *   carries both (RFC 8463 section 4: verifiers that do not know Ed25519 use the RSA one).
 *   ed25519-sha256 is PureEd25519 over the SHA-256 digest of the canonicalized header data
 *   (RFC 8463 section 3); its p= is the raw 32-byte public key.
 *
 *   Keys: a PEM private key (PKCS#8 or PKCS#1), or for Ed25519 also the 32-byte seed in
 *   base64 as dkimpy's dknewkey writes it. RSA keys shorter than 2048 bits are refused
 *   (RFC 8301 allows 1024 but the large providers do not). The key table of --dkim-keys:
 *     { "example.org": { "selector": "s1", "key": "example.org.pem" },
 *       "talker.test": [ { "selector": "rsa1", "key": "/etc/mudmail/rsa.pem" },
 *                        { "selector": "ed1",  "key": "/etc/mudmail/ed.pem" } ] }
 *   Relative key paths are relative to the table's folder. keysFor(domain) picks the most
 *   specific configured domain that is the From domain or a parent of it; d= stays the
 *   configured domain (relaxed alignment).
 *
 *   checkDomain() asks DNS (through `resolver` when given) for the domain's MX, SPF (and
 *   evaluates it for the source address: ip4, ip6, a, mx, include, redirect, exists, at
 *   most 10 lookups), DMARC (at _dmarc.D, else at its parents), each configured key's TXT
 *   record at S._domainkey.D (and whether its p= is the public half of the private key),
 *   and the PTR of the source address with its forward confirmation.
 *
 * DIAGNOSTICS
 *   loadDkimKeys() and generateDkimKey() throw a DkimConfigError whose message names the
 *   flag and the file ("--dkim-key /etc/k.pem: RSA key of 1024 bits; ..."), with `flag`
 *   and `file` as fields: the command line exits 2 on it, as on a UsageError. checkDomain()
 *   throws one for a bad domain, source address or resolver; otherwise every outcome is a
 *   row: ok, missing or wrong, with what to publish. A row about a published key that does
 *   not match the private key carries `error`, a DkimConfigError naming the key's flag and
 *   file, for the command line to exit 2 with.
 *
 *   Signing succeeds when a field is returned: that means the message was hashed as it
 *   will be sent, not that the domain publishes the key (checkDomain says that).
 *   hashMessage() and the signing calls reject when the header block is longer than
 *   1 MiB (the caller logs it and sends the message unsigned).
 *
 * BUGS
 *   l= (body length) and x= (expiry) are never written. A d= or s= longer than about 70
 *   characters makes its line of the field longer than 78 columns (never than 998).
 *   fromDomain() takes the first address of the first From field and does not decode
 *   RFC 2047 or quoted local parts beyond skipping them. The SPF evaluation does not
 *   expand macros (%{...}) or follow ptr: such a record is reported as not evaluated.
 */

import {
  createHash, createPrivateKey, createPublicKey, generateKeyPair, sign as cryptoSign,
  type KeyObject,
} from "node:crypto";
import * as dns from "node:dns";
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { DotDecoder, Stuffer } from "./queue.js";

/* ------------------------------------------------------------------------------------ */
/* Keys                                                                                  */

export type DkimAlgorithm = "rsa-sha256" | "ed25519-sha256";

export interface DkimKey {
  /** d=: the configured signing domain, lower case, no trailing dot. */
  domain: string;
  /** s=: the selector; its record is at S._domainkey.D. */
  selector: string;
  algorithm: DkimAlgorithm;
  privateKey: KeyObject;
  /** Where the key came from, for messages: the file and the flag that named it. */
  file?: string;
  flag?: string;
}

/** A bad key, key file, key table, selector or domain: names the flag and the file. */
export class DkimConfigError extends Error {
  constructor(message: string, readonly flag: string, readonly file: string | null = null) {
    super(message);
    this.name = "DkimConfigError";
  }
}

export interface DkimKeyOptions {
  /** --dkim-domain D */
  domain?: string | null;
  /** --dkim-selector S */
  selector?: string | null;
  /** --dkim-key FILE: one private key for D and S. */
  keyFile?: string | null;
  /** --dkim-keys FILE: the JSON key table. */
  keysFile?: string | null;
}

/** RFC 8301 says 1024 at least; the large mailbox providers want 2048. */
export const MIN_RSA_BITS = 2048;

/**
 * The keys of --dkim-domain/--dkim-selector/--dkim-key and of --dkim-keys, checked and
 * parsed; [] when none is configured. Throws DkimConfigError.
 */
export function loadDkimKeys(opts: DkimKeyOptions): DkimKey[] {
  const keys: DkimKey[] = [];
  const { domain, selector, keyFile, keysFile } = opts;
  if (keyFile != null || domain != null || selector != null) {
    if (keyFile == null) {
      throw new DkimConfigError(`--dkim-key: needed with ${domain != null ? "--dkim-domain" : "--dkim-selector"} (the private key file to sign with)`, "--dkim-key");
    }
    if (domain == null) throw new DkimConfigError(`--dkim-domain: needed with --dkim-key ${keyFile}`, "--dkim-domain", keyFile);
    if (selector == null) throw new DkimConfigError(`--dkim-selector: needed with --dkim-key ${keyFile}`, "--dkim-selector", keyFile);
    const d = checkDomainName(domain, "--dkim-domain", keyFile);
    const s = checkSelector(selector, "--dkim-selector", keyFile);
    keys.push(readKey(keyFile, d, s, "--dkim-key", `--dkim-key ${keyFile}`));
  }
  if (keysFile != null) keys.push(...readKeyTable(keysFile));
  const seen = new Set<string>();
  for (const k of keys) {
    const name = `${k.selector}._domainkey.${k.domain}`;
    if (seen.has(name)) {
      const flag = k.flag ?? "--dkim-keys";
      throw new DkimConfigError(`${flag} ${k.file ?? ""}: a second key for ${name}; one selector holds one key`, flag, k.file ?? null);
    }
    seen.add(name);
  }
  return keys;
}

function readKeyTable(table: string): DkimKey[] {
  const where = `--dkim-keys ${table}`;
  let text: string;
  try {
    text = fs.readFileSync(table, "utf8");
  } catch (err) {
    throw new DkimConfigError(`${where}: cannot read: ${(err as Error).message}`, "--dkim-keys", table);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new DkimConfigError(`${where}: not JSON: ${(err as Error).message}`, "--dkim-keys", table);
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new DkimConfigError(`${where}: expected an object mapping From domains to { "selector": S, "key": FILE } or to a list of them`, "--dkim-keys", table);
  }
  const keys: DkimKey[] = [];
  for (const [domain, entry] of Object.entries(parsed as Record<string, unknown>)) {
    const d = checkDomainName(domain, "--dkim-keys", table);
    const entries = Array.isArray(entry) ? entry : [entry];
    if (entries.length === 0) throw new DkimConfigError(`${where}: ${JSON.stringify(domain)}: an empty list`, "--dkim-keys", table);
    for (const e of entries) {
      const { selector, key } = (e ?? {}) as { selector?: unknown; key?: unknown };
      if (typeof selector !== "string" || typeof key !== "string" || key === "") {
        throw new DkimConfigError(`${where}: ${JSON.stringify(domain)}: expected { "selector": S, "key": FILE }, got ${JSON.stringify(e)}`, "--dkim-keys", table);
      }
      const s = checkSelector(selector, "--dkim-keys", table);
      const file = path.resolve(path.dirname(table), key);
      keys.push(readKey(file, d, s, "--dkim-keys", `${where}: ${d}: key ${file}`));
    }
  }
  return keys;
}

/** Reads and checks one private key file. `where` starts every message. */
function readKey(file: string, domain: string, selector: string, flag: string, where: string): DkimKey {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (err) {
    throw new DkimConfigError(`${where}: cannot read the key: ${(err as Error).message}`, flag, file);
  }
  const privateKey = parsePrivateKey(bytes, (why) => new DkimConfigError(`${where}: ${why}`, flag, file));
  const algorithm = keyAlgorithm(privateKey, (why) => new DkimConfigError(`${where}: ${why}`, flag, file));
  return { domain, selector, algorithm, privateKey, file, flag };
}

/** PKCS#8 prefix of an Ed25519 private key: the 32-byte seed follows. */
const ED25519_PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

function parsePrivateKey(bytes: Buffer, fail: (why: string) => Error): KeyObject {
  const text = bytes.toString("latin1").trim();
  if (/^[A-Za-z0-9+/]{43}=$/.test(text)) {
    // A bare 32-byte Ed25519 seed in base64, as dkimpy's dknewkey and rspamd write it.
    const der = Buffer.concat([ED25519_PKCS8_PREFIX, Buffer.from(text, "base64")]);
    return createPrivateKey({ key: der, format: "der", type: "pkcs8" });
  }
  if (/-----BEGIN (?:RSA )?PUBLIC KEY-----/.test(text)) throw fail("a public key; give the private key (the public half goes in DNS)");
  if (!/-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----/.test(text)) throw fail("not a PEM private key (expected -----BEGIN PRIVATE KEY-----)");
  if (/ENCRYPTED/.test(text)) throw fail("an encrypted private key; mudmail needs it without a passphrase (mode 0600 protects it)");
  try {
    return createPrivateKey({ key: text, format: "pem" });
  } catch (err) {
    throw fail(`malformed private key: ${(err as Error).message}`);
  }
}

function keyAlgorithm(key: KeyObject, fail: (why: string) => Error): DkimAlgorithm {
  if (key.asymmetricKeyType === "ed25519") return "ed25519-sha256";
  if (key.asymmetricKeyType === "rsa") {
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    if (bits < MIN_RSA_BITS) {
      throw fail(`RSA key of ${bits} bits; DKIM keys must have ${MIN_RSA_BITS} bits or more (make one with --dkim-keygen --dkim-algorithm rsa)`);
    }
    return "rsa-sha256";
  }
  throw fail(`a ${key.asymmetricKeyType ?? "unknown"} key; DKIM signs with RSA (rsa-sha256) or Ed25519 (ed25519-sha256)`);
}

/** LDH labels: what a selector may be made of (RFC 6376 section 3.1: sub-domain *("." sub-domain)). */
const LABEL = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

function checkSelector(selector: string, flag: string, file: string | null): string {
  const labels = selector.split(".");
  if (selector === "" || selector.length > 200 || !labels.every((l) => LABEL.test(l))) {
    throw new DkimConfigError(
      `${flag}${file ? ` ${file}` : ""}: selector ${JSON.stringify(selector)} has characters DNS does not allow; use letters, digits and inner hyphens, labels separated by dots`,
      flag, file);
  }
  return selector;
}

function checkDomainName(domain: string, flag: string, file: string | null): string {
  const d = domain.replace(/\.$/, "").toLowerCase();
  const labels = d.split(".");
  if (d.length > 253 || labels.length < 2 || !labels.every((l) => LABEL.test(l))) {
    throw new DkimConfigError(`${flag}${file ? ` ${file}` : ""}: not a domain name: ${JSON.stringify(domain)} (write an IDN in its xn-- form)`, flag, file);
  }
  return d;
}

/**
 * The keys that sign mail whose header From has this domain: those of the most specific
 * configured domain that is the From domain or one of its parents; RSA first. [] when none.
 */
export function keysFor(fromDomain: string, keys: DkimKey[]): DkimKey[] {
  const from = fromDomain.replace(/\.$/, "").toLowerCase();
  let best = "";
  for (const k of keys) {
    if ((from === k.domain || from.endsWith(`.${k.domain}`)) && k.domain.length > best.length) best = k.domain;
  }
  if (best === "") return [];
  return rsaFirst(keys.filter((k) => k.domain === best));
}

function rsaFirst(keys: DkimKey[]): DkimKey[] {
  return [...keys.filter((k) => k.algorithm === "rsa-sha256"), ...keys.filter((k) => k.algorithm !== "rsa-sha256")];
}

/* ------------------------------------------------------------------------------------ */
/* Relaxed body canonicalization, streamed                                               */

const CR = 0x0d, LF = 0x0a, SP = 0x20, HTAB = 0x09;
/** The canonical bytes go to the hash in pieces this size. */
const OUT_SIZE = 64 * 1024;
const DOUBLE_SPACE = Buffer.from("  ");

/**
 * The body hash (bh=) under relaxed body canonicalization (RFC 6376 section 3.4.4),
 * fed the CRLF-normalised body in any chunking. White space runs become one SP, white
 * space at a line end goes, empty lines at the end go; an empty body hashes as empty.
 * Nothing is held but counts: the line ends not yet emitted (they may be trailing) and
 * whether white space is pending. A bare CR or LF is taken as a line end as well.
 */
export class BodyHash {
  private readonly hash = createHash("sha256");
  private readonly out = Buffer.allocUnsafe(OUT_SIZE);
  private used = 0;
  /** Line ends seen since the last non-white byte: emitted only if content follows. */
  private pendingLines = 0;
  /** A run of SP/HTAB since the last emitted byte of this line. */
  private pendingSpace = false;
  /** The last byte pushed was a CR: an LF first in the next chunk completes that line end. */
  private afterCR = false;
  /** Something other than white space and line ends was seen. */
  private content = false;
  private done = false;
  /** The last chunk ended with a line end (LF): the next one starts a line. */
  private atLineStart = true;

  /**
   * Canonicalizes in runs: the next line end, tab and double space are found with indexOf,
   * and what lies between them (words and the single spaces between them, already
   * canonical) goes to the hash whole, never byte by byte.
   */
  push(chunk: Buffer): void {
    if (this.done) throw new Error("BodyHash: push() after digest()");
    const n = chunk.length;
    // The next of each at or after i: -2 not looked for yet, -1 none left in this chunk.
    let nextCR = -2, nextLF = -2, nextTab = -2, nextDouble = -2;
    for (let i = 0; i < n;) {
      if (!this.afterCR && !this.pendingSpace && (i === 0 ? this.atLineStart : chunk[i - 1] === LF)) {
        // Whole lines already canonical (content, CRLF, no tab, no double or trailing space)
        // go to the hash as one run; the last one's CRLF waits, as any line end does.
        let p = i;
        let lastEnd = -1;
        for (;;) {
          if (nextLF !== -1 && nextLF < p) nextLF = chunk.indexOf(LF, p);
          const lf = nextLF;
          if (lf < p + 2 || chunk[lf - 1] !== CR) break;
          const last = chunk[lf - 2];
          if (last === SP || last === HTAB || last === CR) break;
          if (nextCR !== -1 && nextCR < p) nextCR = chunk.indexOf(CR, p);
          if (nextCR !== lf - 1) break;
          if (nextTab !== -1 && nextTab < p) nextTab = chunk.indexOf(HTAB, p);
          if (nextTab !== -1 && nextTab < lf) break;
          if (nextDouble !== -1 && nextDouble < p) nextDouble = chunk.indexOf(DOUBLE_SPACE, p);
          if (nextDouble !== -1 && nextDouble < lf) break;
          lastEnd = lf - 1;
          p = lf + 1;
        }
        if (lastEnd >= 0) {
          this.emit(chunk, i, lastEnd);
          this.pendingLines = 1;
          i = p;
          this.atLineStart = true;
          continue;
        }
      }
      const b = chunk[i];
      if (this.afterCR) {
        this.afterCR = false;
        if (b === LF) {
          i++;
          continue;
        }
      }
      if (b === CR || b === LF) {
        this.afterCR = b === CR;
        this.pendingLines++;
        this.pendingSpace = false;
        i++;
        continue;
      }
      if (b === SP || b === HTAB) {
        this.pendingSpace = true;
        i++;
        continue;
      }
      // Content, single spaces within it already canonical, up to the next line end, tab or
      // double space: emitted whole; spaces at its end join the white space that follows.
      if (nextCR !== -1 && nextCR < i) nextCR = chunk.indexOf(CR, i);
      if (nextLF !== -1 && nextLF < i) nextLF = chunk.indexOf(LF, i);
      if (nextTab !== -1 && nextTab < i) nextTab = chunk.indexOf(HTAB, i);
      if (nextDouble !== -1 && nextDouble < i) nextDouble = chunk.indexOf(DOUBLE_SPACE, i);
      let end = n;
      if (nextCR !== -1 && nextCR < end) end = nextCR;
      if (nextLF !== -1 && nextLF < end) end = nextLF;
      if (nextTab !== -1 && nextTab < end) end = nextTab;
      if (nextDouble !== -1 && nextDouble < end) end = nextDouble;
      let last = end;
      while (last > i && chunk[last - 1] === SP) last--;
      this.emit(chunk, i, last);
      if (last < end) this.pendingSpace = true;
      i = end;
    }
    if (n > 0) this.atLineStart = chunk[n - 1] === LF;
  }

  /** Content bytes [from, to): the line ends and the one space owed before them first. */
  private emit(chunk: Buffer, from: number, to: number): void {
    const room = () => OUT_SIZE - this.used;
    while (this.pendingLines > 0) {
      if (room() < 2) this.drain();
      this.out[this.used++] = CR;
      this.out[this.used++] = LF;
      this.pendingLines--;
    }
    if (this.pendingSpace) {
      if (room() < 1) this.drain();
      this.out[this.used++] = SP;
      this.pendingSpace = false;
    }
    if (to - from > room()) {
      this.drain();
      if (to - from > OUT_SIZE) {
        this.hash.update(chunk.subarray(from, to));
        this.content = true;
        return;
      }
    }
    chunk.copy(this.out, this.used, from, to);
    this.used += to - from;
    this.content = true;
  }

  private drain(): void {
    this.hash.update(this.out.subarray(0, this.used));
    this.used = 0;
  }

  /** bh=: base64 of the SHA-256 of the canonical body. Once. */
  digest(): string {
    if (this.done) throw new Error("BodyHash: digest() twice");
    this.done = true;
    // The last line with content ends with one CRLF, whether it had one or not.
    if (this.content) this.hash.update(this.out.subarray(0, this.used)).update("\r\n");
    return this.hash.digest("base64");
  }
}

/* ------------------------------------------------------------------------------------ */
/* Relaxed header canonicalization and the signature                                     */

/** The header fields signed when no list is given. */
export const DEFAULT_SIGNED_HEADERS: readonly string[] = [
  "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "MIME-Version",
  "Content-Type", "Content-Transfer-Encoding", "In-Reply-To", "References",
];

interface Field {
  /** Lower-case name, white space before the colon removed. */
  name: string;
  /** The whole field, folding kept, without its final CRLF; latin1, one char per byte. */
  raw: string;
}

/** Splits a CRLF header block into fields; a line starting with SP/HTAB continues the last. */
function parseFields(block: Buffer | string): Field[] {
  const text = typeof block === "string" ? block : block.toString("latin1");
  const fields: Field[] = [];
  for (const line of text.split("\r\n")) {
    if (line === "") continue;
    if ((line[0] === " " || line[0] === "\t") && fields.length > 0) {
      fields[fields.length - 1].raw += "\r\n" + line;
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) continue; // not a header field: nothing a verifier could select either
    fields.push({ name: line.slice(0, colon).replace(/[ \t]+$/, "").toLowerCase(), raw: line });
  }
  return fields;
}

/**
 * Relaxed header canonicalization (RFC 6376 section 3.4.2) of one field, folding and
 * all: "name:value\r\n", the name lower case, unfolded, white space runs one SP, none
 * around the colon or at the end. Strings are taken as latin1 (one char per byte).
 */
export function relaxedHeader(field: string | Buffer): string {
  const raw = typeof field === "string" ? field : field.toString("latin1");
  const colon = raw.indexOf(":");
  const name = raw.slice(0, colon).replace(/[ \t]+$/, "").toLowerCase();
  const value = raw.slice(colon + 1).replace(/\r\n$/, "").replace(/\r\n/g, "").replace(/[ \t]+/g, " ").replace(/^ | $/g, "");
  return `${name}:${value}\r\n`;
}

export interface SignOptions {
  /** t=; default now. */
  now?: Date;
  /** The header names to sign instead of DEFAULT_SIGNED_HEADERS (From is still over-signed). */
  headers?: readonly string[];
  /** The chunks are the wire form already (stuffed, CRLF, ending CRLF.CRLF): they are not stuffed again. */
  wire?: boolean;
}

/** Folding of the DKIM-Signature field: breaks only where FWS is allowed, at 78 columns. */
class Folder {
  private readonly lines: string[] = [];
  private line: string;

  constructor(start: string) {
    this.line = start;
  }

  /** Text that stays on one line, after `sep` (a space between tags, "" inside h=). */
  word(text: string, sep: string): void {
    if (this.line.length + sep.length + text.length > 78 && this.line.trim() !== "") {
      this.lines.push(this.line);
      this.line = " " + text;
    } else {
      this.line += sep + text;
    }
  }

  /** Base64 text: may break between any two characters. */
  chars(text: string): void {
    let rest = text;
    while (rest.length > 0) {
      let room = 78 - this.line.length;
      if (room <= 0) {
        this.lines.push(this.line);
        this.line = " ";
        room = 77;
      }
      this.line += rest.slice(0, room);
      rest = rest.slice(room);
    }
  }

  text(): string {
    return [...this.lines, this.line].join("\r\n");
  }
}

/**
 * The DKIM-Signature field(s) for a message: one per key, RSA first, each folded and
 * ending with CRLF, to put in front of the message. `headerBlock` is the header block as
 * sent (CRLF, the engine's added headers first, no empty line); `bodyHash` BodyHash's.
 */
export async function signMessage(headerBlock: Buffer, bodyHash: string, keys: DkimKey[], opts: SignOptions = {}): Promise<string> {
  if (keys.length === 0) return "";
  const fields = parseFields(headerBlock);
  const count = new Map<string, number>();
  for (const f of fields) count.set(f.name, (count.get(f.name) ?? 0) + 1);
  const h: string[] = [];
  const names = opts.headers ?? DEFAULT_SIGNED_HEADERS;
  // From is always signed (RFC 6376 5.4), and once more than it occurs.
  for (const name of names.some((n) => n.toLowerCase() === "from") ? names : ["From", ...names]) {
    const n = (count.get(name.toLowerCase()) ?? 0) + (name.toLowerCase() === "from" ? 1 : 0);
    for (let i = 0; i < n; i++) h.push(name);
  }
  // The signed header data: for each name of h=, the last instance not yet used (RFC 6376 5.4.2).
  const used = new Map<string, number>();
  let data = "";
  for (const name of h) {
    const lower = name.toLowerCase();
    const skip = used.get(lower) ?? 0;
    used.set(lower, skip + 1);
    let seen = 0;
    for (let i = fields.length - 1; i >= 0; i--) {
      if (fields[i].name !== lower) continue;
      if (seen++ === skip) {
        data += relaxedHeader(fields[i].raw);
        break;
      }
    }
  }
  const t = Math.floor((opts.now ?? new Date()).getTime() / 1000);
  let result = "";
  for (const key of rsaFirst(keys)) {
    const fold = new Folder("DKIM-Signature:");
    fold.word("v=1;", " ");
    fold.word(`a=${key.algorithm};`, " ");
    fold.word("c=relaxed/relaxed;", " ");
    fold.word(`d=${key.domain};`, " ");
    fold.word(`s=${key.selector};`, " ");
    fold.word(`t=${t};`, " ");
    fold.word("bh=", " ");
    fold.chars(bodyHash + ";");
    h.forEach((name, i) => fold.word(`${i === 0 ? "h=" : ""}${name}${i === h.length - 1 ? ";" : ":"}`, i === 0 ? " " : ""));
    fold.word("b=", " ");
    const unsigned = fold.text();
    // The field itself is signed last, b= empty, without its CRLF (RFC 6376 3.7).
    const signed = Buffer.from(data + relaxedHeader(unsigned).slice(0, -2), "latin1");
    const b = key.algorithm === "rsa-sha256"
      ? await signInPool("sha256", signed, key.privateKey)
      : await signInPool(null, createHash("sha256").update(signed).digest(), key.privateKey);
    fold.chars(b.toString("base64"));
    result += fold.text() + "\r\n";
  }
  return result;
}

/**
 * One signature, computed in libuv's thread pool (crypto.sign with a callback): an RSA-2048
 * signature is about 0.7 ms of CPU, and the thread that asked (the spool's worker) reads,
 * measures and hashes the next messages meanwhile.
 */
function signInPool(algorithm: string | null, data: Buffer, key: KeyObject): Promise<Buffer> {
  return new Promise((resolve, reject) => cryptoSign(algorithm, data, key, (err, signature) => (err ? reject(err) : resolve(signature))));
}

/* ------------------------------------------------------------------------------------ */
/* A queue message, streamed                                                             */

/** The header block of a message may be this long at most. */
export const MAX_HEADER_BLOCK = 1024 * 1024;

/**
 * Streams a message (the engine's prefix then the raw content, any line ends) through the
 * engine's stuffer and a receiver's un-stuffing, so that what is hashed is what the
 * recipient gets; keeps its header block (without the empty line) and hashes its body.
 * With `wire`, the chunks are already stuffed (measureWire's bytes) and go straight to the
 * un-stuffing. Rejects when the header block passes MAX_HEADER_BLOCK.
 */
export async function hashMessage(chunks: AsyncIterable<Buffer> | Iterable<Buffer>, options: { wire?: boolean } = {}): Promise<{ headerBlock: Buffer; bodyHash: string }> {
  const stuffer = options.wire ? null : new Stuffer();
  const decoder = new DotDecoder();
  const split = new Splitter();
  // The un-stuffing cuts the text at every dot-first line: pieces that small cost the body
  // hash more in calls than copying them together does. A gathering buffer is never reused
  // (the header block keeps views of what it was given).
  let gathered: Buffer | null = null;
  let used = 0;
  const pass = () => {
    if (used > 0) split.push(gathered!.subarray(0, used));
    gathered = null;
    used = 0;
  };
  const take = (piece: Buffer) => {
    if (piece.length >= SMALL_PIECE) {
      pass();
      split.push(piece);
      return;
    }
    if (gathered && used + piece.length > gathered.length) pass();
    gathered ??= Buffer.allocUnsafe(GATHERED);
    piece.copy(gathered, used);
    used += piece.length;
  };
  let ended = false;
  const received = (wire: Buffer) => {
    if (ended) throw new Error("DKIM: bytes after the end of the message's wire form");
    const { out, done, next } = decoder.push(wire);
    for (const piece of out) take(piece);
    ended = done;
    if (done && next < wire.length) throw new Error("DKIM: bytes after the end of the message's wire form");
  };
  for await (const chunk of chunks) received(stuffer ? stuffer.push(chunk) : chunk);
  if (stuffer) received(stuffer.end());
  if (!ended) throw new Error("DKIM: the message's wire form has no end (CRLF.CRLF)");
  pass();
  return split.end();
}

/** Pieces of the un-stuffed text shorter than this are gathered, GATHERED octets at a time. */
const SMALL_PIECE = 1024;
const GATHERED = 16 * 1024;

/** Header block apart from body, across chunk boundaries; input already CRLF. */
class Splitter {
  private readonly header: Buffer[] = [];
  private headerBytes = 0;
  private inBody = false;
  /** The empty line's CR was the last byte of a chunk: drop an LF first in the next. */
  private skipLF = false;
  private atLineStart = true;
  private readonly body = new BodyHash();

  push(chunk: Buffer): void {
    let rest = chunk;
    if (this.skipLF && rest.length > 0) {
      this.skipLF = false;
      if (rest[0] === LF) rest = rest.subarray(1);
    }
    if (this.inBody) {
      this.body.push(rest);
      return;
    }
    let atLineStart = this.atLineStart;
    for (let i = 0; i < rest.length; i++) {
      const b = rest[i];
      if (atLineStart && b === CR) {
        this.keep(rest.subarray(0, i));
        this.inBody = true;
        if (i + 1 < rest.length) this.body.push(rest.subarray(rest[i + 1] === LF ? i + 2 : i + 1));
        else this.skipLF = true;
        return;
      }
      atLineStart = b === LF;
    }
    this.atLineStart = atLineStart;
    this.keep(rest);
  }

  private keep(part: Buffer): void {
    this.headerBytes += part.length;
    if (this.headerBytes > MAX_HEADER_BLOCK) throw new Error(`DKIM: header block longer than ${MAX_HEADER_BLOCK} bytes; not signed`);
    if (part.length > 0) this.header.push(part);
  }

  end(): { headerBlock: Buffer; bodyHash: string } {
    return { headerBlock: Buffer.concat(this.header), bodyHash: this.body.digest() };
  }
}

/**
 * The DKIM-Signature field(s) for a queue message, signed with exactly these keys (pick
 * them with keysFor). `chunks`: the engine's prefix, then the raw content, as sent but not
 * yet normalised. "" without keys (nothing is read then).
 */
export async function dkimSignatureFor(chunks: AsyncIterable<Buffer> | Iterable<Buffer>, keys: DkimKey[], opts: SignOptions = {}): Promise<string> {
  if (keys.length === 0) return "";
  const { headerBlock, bodyHash } = await hashMessage(chunks, opts);
  return await signMessage(headerBlock, bodyHash, keys, opts);
}

export interface ByFromResult {
  /** The field(s) to put in front of the message; "" when not signed. */
  fields: string;
  /** The domain of the header From, or null when there is none (or more than one From field). */
  fromDomain: string | null;
  /** The keys it was signed with. */
  keys: DkimKey[];
  /** Why it was not signed (for the log), or null. */
  skipped: string | null;
}

/**
 * Like dkimSignatureFor, picking the keys by the header From (keysFor): a message whose
 * From domain has no key, or that has no From or more than one, is not signed, and
 * `skipped` says why, for the log line.
 */
export async function signByFrom(chunks: AsyncIterable<Buffer> | Iterable<Buffer>, keys: DkimKey[], opts: SignOptions = {}): Promise<ByFromResult> {
  const { headerBlock, bodyHash } = await hashMessage(chunks, opts);
  // RFC 5322 3.6 allows one From field; with more there is no one author to align the
  // signature with, and the large providers refuse such mail whether it is signed or not.
  const froms = parseFields(headerBlock).filter((f) => f.name === "from").length;
  if (froms > 1) {
    return { fields: "", fromDomain: null, keys: [], skipped: `not DKIM-signed: the message has ${froms} From: header fields (RFC 5322 allows one)` };
  }
  const domain = fromDomain(headerBlock);
  if (domain === null) return { fields: "", fromDomain: null, keys: [], skipped: "no From address in the header: not signed" };
  const chosen = keysFor(domain, keys);
  if (chosen.length === 0) {
    return { fields: "", fromDomain: domain, keys: [], skipped: `From domain ${domain} has no DKIM key: not signed` };
  }
  return { fields: await signMessage(headerBlock, bodyHash, chosen, opts), fromDomain: domain, keys: chosen, skipped: null };
}

/** The domain of the first address of the first From field, lower case; null if none. */
export function fromDomain(headerBlock: Buffer | string): string | null {
  const field = parseFields(headerBlock).find((f) => f.name === "from");
  if (!field) return null;
  let value = field.raw.slice(field.raw.indexOf(":") + 1).replace(/\r\n/g, "");
  value = value.replace(/"(?:[^"\\]|\\.)*"/g, '""'); // quoted strings: display names, local parts
  for (let i = 0; i < 5 && /\([^()]*\)/.test(value); i++) value = value.replace(/\([^()]*\)/g, " ");
  const angle = /<([^<>]*)>/.exec(value);
  const address = angle ? angle[1] : (value.split(/[,;\s]+/).find((w) => w.includes("@")) ?? "");
  const at = address.lastIndexOf("@");
  if (at < 0) return null;
  const domain = address.slice(at + 1).trim().replace(/\.$/, "").toLowerCase();
  return domain === "" ? null : domain;
}

/* ------------------------------------------------------------------------------------ */
/* New keys and the DNS records to publish                                               */

export interface DnsRecord {
  /** The owner name, without a trailing dot. */
  name: string;
  type: "TXT";
  /** The record's text, as one string. */
  value: string;
  /** A zone-file line: the text split into quoted strings of at most 255 bytes. */
  zone: string;
  /** What to know before publishing it. */
  note: string;
}

function zoneLine(name: string, value: string): string {
  const parts: string[] = [];
  for (let i = 0; i < value.length; i += 255) parts.push(`"${value.slice(i, i + 255).replace(/["\\]/g, "\\$&")}"`);
  return `${name}. IN TXT ${parts.length > 1 ? `( ${parts.join(" ")} )` : parts[0]}`;
}

/**
 * Writes a new private key (PKCS#8 PEM, mode 0600) to `file`, refusing to overwrite one,
 * and returns it as a DkimKey. RSA keys have 2048 bits unless `bits` says more.
 */
export async function generateDkimKey(
  algorithm: "ed25519" | "rsa",
  file: string,
  opts: { domain: string; selector: string; bits?: number },
): Promise<DkimKey> {
  if (algorithm !== "ed25519" && algorithm !== "rsa") {
    throw new DkimConfigError(`--dkim-algorithm: expected ed25519 or rsa, got ${JSON.stringify(algorithm)}`, "--dkim-algorithm");
  }
  const domain = checkDomainName(opts.domain, "--dkim-domain", file);
  const selector = checkSelector(opts.selector, "--dkim-selector", file);
  const bits = opts.bits ?? MIN_RSA_BITS;
  if (algorithm === "rsa" && !(Number.isInteger(bits) && bits >= MIN_RSA_BITS && bits <= 8192)) {
    throw new DkimConfigError(`--dkim-key ${file}: RSA keys have ${MIN_RSA_BITS} to 8192 bits, not ${bits}`, "--dkim-key", file);
  }
  // The file first: an existing key is never overwritten, and no key is made in vain.
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, "wx", 0o600);
  } catch (err) {
    const why = (err as NodeJS.ErrnoException).code === "EEXIST" ? "exists already; not overwritten (remove it first, or print its record with --dkim-print-dns)" : (err as Error).message;
    throw new DkimConfigError(`--dkim-key ${file}: ${why}`, "--dkim-key", file);
  }
  let pem: string;
  try {
    await handle.chmod(0o600); // whatever the umask
    pem = await new Promise<string>((resolve, reject) => {
      const done = (err: Error | null, _pub: string, priv: string) => (err ? reject(err) : resolve(priv));
      const encoding = { publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs8", format: "pem" } } as const;
      if (algorithm === "rsa") generateKeyPair("rsa", { modulusLength: bits, ...encoding }, done);
      else generateKeyPair("ed25519", encoding, done);
    });
    await handle.writeFile(pem);
    await handle.sync();
  } catch (err) {
    await handle.close();
    await fs.promises.unlink(file).catch(() => undefined);
    throw new DkimConfigError(`--dkim-key ${file}: cannot write the new key: ${(err as Error).message}`, "--dkim-key", file);
  }
  await handle.close();
  const privateKey = createPrivateKey(pem);
  return { domain, selector, algorithm: algorithm === "rsa" ? "rsa-sha256" : "ed25519-sha256", privateKey, file, flag: "--dkim-key" };
}

/** p=: base64 of the SubjectPublicKeyInfo (RSA) or of the raw 32-byte key (Ed25519, RFC 8463). */
export function publicKeyText(key: Pick<DkimKey, "algorithm" | "privateKey">): string {
  const pub = createPublicKey(key.privateKey);
  const der = pub.export({ type: "spki", format: "der" });
  return (key.algorithm === "ed25519-sha256" ? der.subarray(der.length - 32) : der).toString("base64");
}

/** The TXT record that publishes a key: S._domainkey.D "v=DKIM1; k=rsa|ed25519; p=...". */
export function dnsRecord(key: DkimKey): DnsRecord {
  const name = `${key.selector}._domainkey.${key.domain}`;
  const value = `v=DKIM1; k=${key.algorithm === "rsa-sha256" ? "rsa" : "ed25519"}; p=${publicKeyText(key)}`;
  const note = key.algorithm === "ed25519-sha256"
    ? "Ed25519 (RFC 8463): sign with an RSA key as well, since not every receiver checks Ed25519 signatures"
    : "a 2048-bit key does not fit one 255-byte TXT string: publish the quoted strings as one record";
  return { name, type: "TXT", value, zone: zoneLine(name, value), note };
}

/** An SPF record that lets this address (and nothing else) send for the domain. */
export function spfRecord(domain: string, address: string): DnsRecord {
  const family = net.isIP(address);
  if (family === 0) throw new DkimConfigError(`--source-ip: not an IP address: ${JSON.stringify(address)}`, "--source-ip");
  const d = checkDomainName(domain, "--dkim-domain", null);
  const value = `v=spf1 ${family === 4 ? "ip4" : "ip6"}:${address} -all`;
  return {
    name: d, type: "TXT", value, zone: zoneLine(d, value),
    note: `one SPF record per domain: if other hosts send mail for ${d} (a provider, a web server), add them (include:..., ip4:...) before -all, in the same record`,
  };
}

/** A DMARC record to start with: reports only (p=none). */
export function dmarcRecord(domain: string): DnsRecord {
  const d = checkDomainName(domain, "--dkim-domain", null);
  const value = `v=DMARC1; p=none; rua=mailto:postmaster@${d}`;
  return {
    name: `_dmarc.${d}`, type: "TXT", value, zone: zoneLine(`_dmarc.${d}`, value),
    note: "p=none only asks for reports (sent to postmaster@ the domain); once they show all your mail passes SPF or DKIM, move to p=quarantine, then p=reject",
  };
}

/* ------------------------------------------------------------------------------------ */
/* The deliverability check                                                              */

export type CheckStatus = "ok" | "missing" | "wrong";

export interface CheckRow {
  /** "MX", "SPF", "DMARC", "DKIM <selector>" (or "DKIM" when no key is configured), "PTR". */
  item: string;
  status: CheckStatus;
  /** What was found. */
  detail: string;
  /** What to do; "" when ok. */
  fix: string;
  /** Set when the row is a configuration error (a published key that is not ours). */
  error?: DkimConfigError;
}

export interface CheckOptions {
  /** IP[:PORT] or [IPv6]:PORT of the DNS server to ask; the system's by default. */
  resolver?: string | null;
  /** The configured keys; those for the domain (keysFor) are checked. */
  keys?: DkimKey[];
  /** The address mail is sent from: SPF is evaluated for it, its PTR looked up. */
  sourceIp?: string | null;
  /** Seconds per DNS query try (two tries); default 5. */
  dnsTimeout?: number;
}

type Lookup<T> = { ok: true; value: T } | { ok: false; code: string; absent: boolean };

class Dns {
  readonly resolver: dns.promises.Resolver;

  constructor(server: string | null | undefined, timeoutSeconds: number) {
    this.resolver = new dns.promises.Resolver({ timeout: Math.max(1, Math.round(timeoutSeconds * 1000)), tries: 2 });
    if (server) {
      const m = /^\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?$/.exec(server) ?? /^([0-9.]+)(?::(\d{1,5}))?$/.exec(server) ?? /^([0-9A-Fa-f:]+:[0-9A-Fa-f:.]*)()$/.exec(server);
      const host = m?.[1] ?? "";
      const port = m?.[2] ? Number(m[2]) : 53;
      if (!m || net.isIP(host) === 0 || !(port >= 1 && port <= 65535)) {
        throw new DkimConfigError(`--resolver: expected IP[:PORT], got ${JSON.stringify(server)}`, "--resolver");
      }
      this.resolver.setServers([net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`]);
    }
  }

  async ask<T>(query: () => Promise<T>): Promise<Lookup<T>> {
    try {
      return { ok: true, value: await query() };
    } catch (err) {
      const code = String((err as NodeJS.ErrnoException).code ?? "EUNKNOWN");
      return { ok: false, code, absent: code === "ENOTFOUND" || code === "ENODATA" || code === "NXDOMAIN" };
    }
  }

  /** TXT records of a name, each joined from its strings. */
  txt(name: string): Promise<Lookup<string[]>> {
    return this.ask(async () => (await this.resolver.resolveTxt(name)).map((parts) => parts.join("")));
  }

  async addresses(name: string, family: 4 | 6): Promise<Lookup<string[]>> {
    return this.ask(() => (family === 4 ? this.resolver.resolve4(name) : this.resolver.resolve6(name)));
  }
}

function lookupFailed(what: string, code: string): string {
  return `${what}: DNS lookup failed (${code})`;
}

const DNS_FIX = "check that the domain's name servers answer (or try again later)";

/** The deliverability check of a sending domain: one row per item, in a fixed order. */
export async function checkDomain(domain: string, opts: CheckOptions = {}): Promise<CheckRow[]> {
  const d = checkDomainName(domain, "--check-domain", null);
  if (opts.sourceIp != null && net.isIP(opts.sourceIp) === 0) {
    throw new DkimConfigError(`--source-ip: not an IP address: ${JSON.stringify(opts.sourceIp)}`, "--source-ip");
  }
  const r = new Dns(opts.resolver, opts.dnsTimeout ?? 5);
  const source = opts.sourceIp ?? null;
  const rows = await Promise.all([
    checkMx(r, d),
    checkSpf(r, d, source),
    checkDmarc(r, d),
    checkKeys(r, d, opts.keys ?? []),
    source === null ? Promise.resolve([]) : checkPtr(r, source, d),
  ]);
  return rows.flat();
}

async function checkMx(r: Dns, d: string): Promise<CheckRow> {
  const found = await r.ask(() => r.resolver.resolveMx(d));
  if (!found.ok) {
    if (found.absent) {
      return { item: "MX", status: "missing", detail: `no MX record for ${d}`, fix: `publish one: ${d}. IN MX 10 mail.${d}. (replies and bounces come back there; receivers check the sender's domain takes mail)` };
    }
    return { item: "MX", status: "wrong", detail: lookupFailed(d, found.code), fix: DNS_FIX };
  }
  const mx = found.value.sort((a, b) => a.priority - b.priority);
  if (mx.length === 0) return { item: "MX", status: "missing", detail: `no MX record for ${d}`, fix: `publish one: ${d}. IN MX 10 mail.${d}.` };
  if (mx.some((m) => m.exchange === "" || m.exchange === ".")) {
    return { item: "MX", status: "wrong", detail: `${d} publishes the null MX: it takes no mail, so replies and bounces are lost`, fix: `replace it with an MX for a host that takes mail for ${d}` };
  }
  return { item: "MX", status: "ok", detail: mx.map((m) => `${m.priority} ${m.exchange}`).join(", "), fix: "" };
}

async function checkSpf(r: Dns, d: string, source: string | null): Promise<CheckRow> {
  const suggestion = source ? spfRecord(d, source).zone : `${d}. IN TXT "v=spf1 mx -all"`;
  const found = await r.txt(d);
  if (!found.ok && !found.absent) return { item: "SPF", status: "wrong", detail: lookupFailed(d, found.code), fix: DNS_FIX };
  const spf = found.ok ? found.value.filter(isSpf) : [];
  if (spf.length === 0) return { item: "SPF", status: "missing", detail: `no TXT record starting with v=spf1 at ${d}`, fix: `publish ${suggestion}` };
  if (spf.length > 1) {
    return { item: "SPF", status: "wrong", detail: `${spf.length} SPF records at ${d}: receivers treat that as an error (permerror)`, fix: "merge them into one v=spf1 record" };
  }
  if (source === null) return { item: "SPF", status: "ok", detail: spf[0], fix: "" };
  const result = await evaluateSpf(r, d, source, { lookups: 0 }, 0);
  if (result === "pass") return { item: "SPF", status: "ok", detail: `${spf[0]} (passes for ${source})`, fix: "" };
  if (result === "unknown") return { item: "SPF", status: "ok", detail: `${spf[0]} (uses macros or ptr: not evaluated for ${source})`, fix: "" };
  const mechanism = `${net.isIPv6(source) ? "ip6" : "ip4"}:${source}`;
  if (result === "temperror") return { item: "SPF", status: "wrong", detail: `${spf[0]} (a lookup it needs failed)`, fix: DNS_FIX };
  if (result === "permerror") {
    return { item: "SPF", status: "wrong", detail: `${spf[0]} (permerror: a syntax error, a missing include, or more than 10 lookups)`, fix: `fix the record; it should give pass for ${source}, e.g. with ${mechanism}` };
  }
  return { item: "SPF", status: "wrong", detail: `${spf[0]} (${result} for ${source})`, fix: `add ${mechanism} to the record, before its all` };
}

function isSpf(text: string): boolean {
  return /^v=spf1(?: |$)/i.test(text);
}

type SpfResult = "pass" | "fail" | "softfail" | "neutral" | "none" | "permerror" | "temperror" | "unknown";

/** check_host() of RFC 7208, without macros and ptr (those give "unknown"). */
async function evaluateSpf(r: Dns, domain: string, ip: string, budget: { lookups: number }, depth: number): Promise<SpfResult> {
  if (depth > 10) return "permerror";
  const found = await r.txt(domain);
  if (!found.ok) return found.absent ? "none" : "temperror";
  const records = found.value.filter(isSpf);
  if (records.length === 0) return "none";
  if (records.length > 1) return "permerror";
  const family = net.isIPv6(ip) ? 6 : 4;
  const qualifier = (q: string): SpfResult => (q === "-" ? "fail" : q === "~" ? "softfail" : q === "?" ? "neutral" : "pass");
  const lookup = () => ++budget.lookups > 10;
  let redirect: string | null = null;
  for (const term of records[0].split(/\s+/).slice(1)) {
    if (term === "") continue;
    if (term.includes("%")) return "unknown";
    const modifier = /^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$/.exec(term);
    if (modifier) {
      if (modifier[1].toLowerCase() === "redirect") redirect = modifier[2];
      continue;
    }
    const m = /^([+?~-]?)([A-Za-z0-9]+)(?::([^/]*))?(?:\/(\d+))?(?:\/\/(\d+))?$/.exec(term);
    if (!m) return "permerror";
    const [, q, rawName, arg, cidr4, cidr6] = m;
    const name = rawName.toLowerCase();
    const target = arg || domain;
    let match: boolean;
    switch (name) {
      case "all":
        match = true;
        break;
      case "ip4":
      case "ip6": {
        if (!arg || net.isIP(arg) !== (name === "ip4" ? 4 : 6)) return "permerror";
        match = net.isIP(ip) === (name === "ip4" ? 4 : 6) && inSubnet(ip, arg, cidr4 ? Number(cidr4) : name === "ip4" ? 32 : 128);
        break;
      }
      case "a":
      case "mx": {
        if (lookup()) return "permerror";
        const prefix = family === 4 ? (cidr4 ? Number(cidr4) : 32) : (cidr6 ? Number(cidr6) : 128);
        let hosts = [target];
        if (name === "mx") {
          const mx = await r.ask(() => r.resolver.resolveMx(target));
          if (!mx.ok && !mx.absent) return "temperror";
          hosts = mx.ok ? mx.value.map((x) => x.exchange).filter((x) => x !== "" && x !== ".").slice(0, 10) : [];
        }
        match = false;
        for (const host of hosts) {
          const addrs = await r.addresses(host, family);
          if (!addrs.ok && !addrs.absent) return "temperror";
          if (addrs.ok && addrs.value.some((a) => inSubnet(ip, a, prefix))) match = true;
        }
        break;
      }
      case "include": {
        if (!arg) return "permerror";
        if (lookup()) return "permerror";
        const inner = await evaluateSpf(r, arg, ip, budget, depth + 1);
        if (inner === "temperror" || inner === "permerror" || inner === "unknown") return inner;
        if (inner === "none") return "permerror";
        match = inner === "pass";
        break;
      }
      case "exists": {
        if (!arg) return "permerror";
        if (lookup()) return "permerror";
        const addrs = await r.addresses(arg, 4);
        if (!addrs.ok && !addrs.absent) return "temperror";
        match = addrs.ok && addrs.value.length > 0;
        break;
      }
      case "ptr":
        return "unknown";
      default:
        return "permerror";
    }
    if (match) return qualifier(q);
  }
  if (redirect !== null) {
    if (lookup()) return "permerror";
    const result = await evaluateSpf(r, redirect, ip, budget, depth + 1);
    return result === "none" ? "permerror" : result;
  }
  return "neutral";
}

function inSubnet(ip: string, network: string, prefix: number): boolean {
  const type = net.isIPv6(network) ? "ipv6" : "ipv4";
  if ((net.isIPv6(ip) ? "ipv6" : "ipv4") !== type) return false;
  try {
    const list = new net.BlockList();
    list.addSubnet(network, prefix, type);
    return list.check(ip, type);
  } catch {
    return false;
  }
}

async function checkDmarc(r: Dns, d: string): Promise<CheckRow> {
  const starter = dmarcRecord(d);
  // The domain's own record, else its parents' (the organizational domain's policy applies).
  const labels = d.split(".");
  for (let i = 0; i <= labels.length - 2; i++) {
    const owner = labels.slice(i).join(".");
    const found = await r.txt(`_dmarc.${owner}`);
    if (!found.ok && !found.absent) return { item: "DMARC", status: "wrong", detail: lookupFailed(`_dmarc.${owner}`, found.code), fix: DNS_FIX };
    const records = found.ok ? found.value.filter((v) => /^v=DMARC1\s*(;|$)/i.test(v)) : [];
    if (records.length === 0) continue;
    if (records.length > 1) {
      return { item: "DMARC", status: "wrong", detail: `${records.length} DMARC records at _dmarc.${owner}: receivers ignore them all`, fix: "keep one" };
    }
    const tags = parseTags(records[0]);
    const p = tags.get("p")?.toLowerCase();
    if (p !== "none" && p !== "quarantine" && p !== "reject") {
      return { item: "DMARC", status: "wrong", detail: `${records[0]} (no valid p=)`, fix: `give it a policy: ${starter.zone}` };
    }
    const inherited = owner === d ? "" : ` (at _dmarc.${owner}, applies to ${d}${tags.has("sp") ? ` with sp=${tags.get("sp")}` : ""})`;
    return { item: "DMARC", status: "ok", detail: records[0] + inherited, fix: "" };
  }
  return { item: "DMARC", status: "missing", detail: `no TXT record starting with v=DMARC1 at _dmarc.${d}`, fix: `publish ${starter.zone} (${starter.note})` };
}

/** tag=value; pairs of a DKIM key record or a DMARC record, white space removed around them. */
function parseTags(text: string): Map<string, string> {
  const tags = new Map<string, string>();
  for (const part of text.split(";")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    tags.set(part.slice(0, eq).trim().toLowerCase(), part.slice(eq + 1).replace(/\s+/g, ""));
  }
  return tags;
}

async function checkKeys(r: Dns, d: string, keys: DkimKey[]): Promise<CheckRow[]> {
  if (keys.length === 0) {
    return [{ item: "DKIM", status: "missing", detail: "no DKIM key configured: no selector to look up", fix: `make one: --dkim-keygen --dkim-domain ${d} --dkim-selector S --dkim-key FILE, publish the record it prints, then sign with --dkim-key FILE` }];
  }
  const mine = keysFor(d, keys);
  if (mine.length === 0) {
    return [{ item: "DKIM", status: "missing", detail: `none of the configured keys signs for ${d} (${[...new Set(keys.map((k) => k.domain))].join(", ")})`, fix: `add a key for ${d}: --dkim-keygen --dkim-domain ${d} --dkim-selector S --dkim-key FILE` }];
  }
  return Promise.all(mine.map((key) => checkKey(r, key)));
}

async function checkKey(r: Dns, key: DkimKey): Promise<CheckRow> {
  const item = `DKIM ${key.selector}`;
  const record = dnsRecord(key);
  const found = await r.txt(record.name);
  if (!found.ok && !found.absent) return { item, status: "wrong", detail: lookupFailed(record.name, found.code), fix: DNS_FIX };
  const texts = found.ok ? found.value.filter((v) => /(^|;)\s*p\s*=/.test(v)) : [];
  if (texts.length === 0) return { item, status: "missing", detail: `no DKIM key record at ${record.name}`, fix: `publish ${record.zone}` };
  if (texts.length > 1) return { item, status: "wrong", detail: `${texts.length} key records at ${record.name}: verifiers may pick any`, fix: `keep one: ${record.zone}` };
  const tags = parseTags(texts[0]);
  const source = key.file ? `${key.flag ?? "--dkim-key"} ${key.file}` : "the configured private key";
  const wrong = (detail: string): CheckRow => ({
    item, status: "wrong", detail, fix: `publish ${record.zone}`,
    error: new DkimConfigError(`${source}: does not match the key published at ${record.name}: ${detail}`, key.flag ?? "--dkim-key", key.file ?? null),
  });
  if (tags.has("v") && tags.get("v") !== "DKIM1") return wrong(`v=${tags.get("v")}, expected DKIM1`);
  const k = (tags.get("k") ?? "rsa").toLowerCase();
  const want = key.algorithm === "rsa-sha256" ? "rsa" : "ed25519";
  if (k !== want) return wrong(`k=${k}, the key is ${want}`);
  const p = tags.get("p") ?? "";
  if (p === "") return wrong("p= is empty: the key is revoked");
  if (!samePublicKey(key, p)) return wrong(`p= is not the public half of ${source}`);
  const hashes = tags.get("h");
  if (hashes && !hashes.toLowerCase().split(":").includes("sha256")) return wrong(`h=${hashes} does not allow sha256`);
  const testing = (tags.get("t") ?? "").split(":").includes("y");
  return {
    item, status: "ok", detail: `${record.name}: k=${k}, matches ${source}${testing ? " (t=y: testing mode, receivers may ignore it)" : ""}`,
    fix: testing ? "remove t=y once signatures verify" : "",
  };
}

function samePublicKey(key: DkimKey, published: string): boolean {
  const ours = Buffer.from(publicKeyText(key), "base64");
  const theirs = Buffer.from(published, "base64");
  if (key.algorithm === "ed25519-sha256") return theirs.equals(ours);
  if (theirs.equals(ours)) return true;
  try {
    // Some publish the bare PKCS#1 RSAPublicKey instead of the SubjectPublicKeyInfo.
    const pub = createPublicKey({ key: theirs, format: "der", type: "pkcs1" });
    return pub.export({ type: "spki", format: "der" }).equals(ours);
  } catch {
    return false;
  }
}

async function checkPtr(r: Dns, ip: string, d: string): Promise<CheckRow> {
  const found = await r.ask(() => r.resolver.reverse(ip));
  if (!found.ok && !found.absent) return { item: "PTR", status: "wrong", detail: lookupFailed(`PTR of ${ip}`, found.code), fix: DNS_FIX };
  const names = found.ok ? found.value : [];
  const fix = `ask whoever owns ${ip} (the hosting provider) for a PTR to a name that resolves back to it, e.g. mail.${d}, and use that name as --helo`;
  if (names.length === 0) return { item: "PTR", status: "missing", detail: `no PTR record for ${ip}`, fix };
  const family = net.isIPv6(ip) ? 6 : 4;
  for (const name of names) {
    const addrs = await r.addresses(name, family);
    if (addrs.ok && addrs.value.some((a) => inSubnet(ip, a, family === 4 ? 32 : 128))) {
      return { item: "PTR", status: "ok", detail: `${ip} -> ${name} -> ${ip}`, fix: "" };
    }
  }
  return {
    item: "PTR", status: "wrong", detail: `${ip} -> ${names.join(", ")}, which does not resolve back to ${ip}`,
    fix: `add ${names[0]}. IN ${family === 4 ? "A" : "AAAA"} ${ip}, or ${fix.slice(0, 1).toLowerCase()}${fix.slice(1)}`,
  };
}

/** The check as one short table: item, status, what was found; the fix below what is not ok. */
export function formatCheck(rows: CheckRow[]): string {
  const width = Math.max(5, ...rows.map((r) => r.item.length)) + 2;
  const lines = [`${"ITEM".padEnd(width)}${"STATUS".padEnd(9)}DETAIL`];
  for (const row of rows) {
    lines.push(`${row.item.padEnd(width)}${row.status.padEnd(9)}${row.detail}`);
    if (row.fix) lines.push(`${"".padEnd(width + 9)}fix: ${row.fix}`);
  }
  return lines.join("\n") + "\n";
}
