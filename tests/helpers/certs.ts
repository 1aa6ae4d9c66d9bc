// Test helper: the suite's one certificate maker. Throw-away TLS keys and certificates, made with
// Debian's /usr/bin/openssl (run by daemon.ts's run()) into a temp dir (removed at process exit),
// once per test process.
//
//   ca          a CA ("mudmail test CA"); give its certificate to the client as tlsCa
//   server      signed by the CA, for DNS:localhost and IP:127.0.0.1: verifies with the CA
//   wrongName   signed by the CA, for DNS:wrong.example only: the chain verifies, the name does not
//   selfSigned  for DNS:localhost and IP:127.0.0.1 but signed by itself, NOT by the CA
//   issueCert(names, { days }) one more, signed by the CA, for these DNS names (MX hosts, mta-sts.DOMAIN);
//               days < 0 makes one that has expired; `chainFile` holds it and the CA (for DANE-TA)
//   tlsaData(pem, selector, mtype)  a TLSA record's association data for a certificate (RFC 6698)
//
// RSA 2048 keys: every TLS stack here (node, Postfix 3.7's smtpd_tls_cert_file) takes them.
// Key files are mode 0600 (Postfix reads its key as root before it drops privileges).

import { createHash, X509Certificate } from "node:crypto";
import { existsSync, rmSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { run } from "./daemon.js";

export const OPENSSL = "/usr/bin/openssl";

export interface KeyPair {
  /** PEM text of the private key. */
  key: string;
  /** PEM text of the certificate. */
  cert: string;
  keyFile: string;
  certFile: string;
  /** The certificate, then the CA's (issueCert only): a server that sends its chain. */
  chainFile?: string;
}

export interface TestCerts {
  dir: string;
  ca: { cert: string; certFile: string };
  server: KeyPair;
  wrongName: KeyPair;
  selfSigned: KeyPair;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await run(OPENSSL, args, { cwd, timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")} failed (exit ${r.code}, signal ${r.signal})\n${r.stderr}`);
}

const DAYS = "2";

async function signedBy(dir: string, name: string, subject: string, san: string, days = DAYS): Promise<KeyPair> {
  const keyFile = path.join(dir, `${name}.key`);
  const csrFile = path.join(dir, `${name}.csr`);
  const certFile = path.join(dir, `${name}.crt`);
  const extFile = path.join(dir, `${name}.ext`);
  await fs.writeFile(extFile, [
    "basicConstraints = critical, CA:FALSE",
    "keyUsage = critical, digitalSignature, keyEncipherment",
    "extendedKeyUsage = serverAuth",
    `subjectAltName = ${san}`,
    "",
  ].join("\n"));
  await openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", keyFile, "-out", csrFile, "-subj", subject], dir);
  await openssl(["x509", "-req", "-in", csrFile, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
    "-out", certFile, "-days", days, "-sha256", "-extfile", extFile], dir);
  return read(keyFile, certFile);
}

async function read(keyFile: string, certFile: string): Promise<KeyPair> {
  await fs.chmod(keyFile, 0o600);
  return { key: await fs.readFile(keyFile, "utf8"), cert: await fs.readFile(certFile, "utf8"), keyFile, certFile };
}

async function make(): Promise<TestCerts> {
  if (!existsSync(OPENSSL)) throw new Error(`${OPENSSL} is missing: scripts/pretest.sh should install the openssl package`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-certs-"));
  process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
  await fs.chmod(dir, 0o755);
  await openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", DAYS,
    "-sha256", "-subj", "/O=mudmail tests/CN=mudmail test CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], dir);
  await fs.chmod(path.join(dir, "ca.key"), 0o600);
  const caFile = path.join(dir, "ca.crt");
  const server = await signedBy(dir, "server", "/O=mudmail tests/CN=localhost", "DNS:localhost, IP:127.0.0.1");
  const wrongName = await signedBy(dir, "wrong", "/O=mudmail tests/CN=wrong.example", "DNS:wrong.example");
  await openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "self.key", "-out", "self.crt", "-days", DAYS,
    "-sha256", "-subj", "/O=mudmail tests/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "-addext", "basicConstraints=critical,CA:FALSE"], dir);
  const selfSigned = await read(path.join(dir, "self.key"), path.join(dir, "self.crt"));
  return { dir, ca: { cert: await fs.readFile(caFile, "utf8"), certFile: caFile }, server, wrongName, selfSigned };
}

let made: Promise<TestCerts> | null = null;

/** The test certificates of this process (made on first use, in about a second). */
export function testCerts(): Promise<TestCerts> {
  made ??= make();
  return made;
}

let issued = 0;

/** A certificate from the test CA for these DNS names; `days` below 0 has expired already. */
export async function issueCert(names: string[], opts: { days?: number } = {}): Promise<KeyPair> {
  const certs = await testCerts();
  const name = `issued-${++issued}`;
  const pair = await signedBy(certs.dir, name, `/O=mudmail tests/CN=${names[0]}`, names.map((n) => `DNS:${n}`).join(", "), String(opts.days ?? DAYS));
  const chainFile = path.join(certs.dir, `${name}.chain.crt`);
  await fs.writeFile(chainFile, pair.cert + certs.ca.cert);
  return { ...pair, chainFile };
}

/** TLSA association data: selector 0 the whole certificate, 1 its key (SPKI); matching type 0 exact, 1 SHA-256, 2 SHA-512. */
export function tlsaData(pem: string, selector: number, mtype: number): Buffer {
  const cert = new X509Certificate(pem);
  const selected = selector === 0 ? cert.raw : cert.publicKey.export({ type: "spki", format: "der" });
  return mtype === 0 ? selected : createHash(mtype === 1 ? "sha256" : "sha512").update(selected).digest();
}
