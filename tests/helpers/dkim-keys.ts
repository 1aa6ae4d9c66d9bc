// Test helper for the tests of dkim.ts (tests/dkim/): a temp dir (removed at exit) and the keys
// made in it once per process by generateDkimKey (RSA and Ed25519 for example.org, Ed25519 for
// other.test), their TXT records (TXT), the key sets to sign with (SETS), sha256() in base64,
// and expectConfigError() (a DkimConfigError naming the flag and the file).

import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Test } from "tap";
import { DkimConfigError, dnsRecord, generateDkimKey, type DkimKey } from "../../dkim.js";
import { removeAtExit } from "./daemon.js";

export const sha256 = (data: string | Buffer) => createHash("sha256").update(data).digest("base64");
export const EMPTY_HASH = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

export async function tempDir(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-"));
}

export const work = await tempDir();
removeAtExit(work);

// Two keys for example.org (dual signing) and one for another domain, made by generateDkimKey.
export const RSA = await generateDkimKey("rsa", path.join(work, "rsa.pem"), { domain: "example.org", selector: "rsa2026" });
export const ED = await generateDkimKey("ed25519", path.join(work, "ed.pem"), { domain: "example.org", selector: "ed2026" });
export const OTHER = await generateDkimKey("ed25519", path.join(work, "other.pem"), { domain: "other.test", selector: "s1" });
export const TXT: Record<string, string> = Object.fromEntries([RSA, ED, OTHER].map((k) => [dnsRecord(k).name, dnsRecord(k).value]));
export const SETS: Array<[string, DkimKey[]]> = [["rsa-sha256", [RSA]], ["ed25519-sha256", [ED]], ["dual", [RSA, ED]]];

export async function expectConfigError(t: Test, fn: () => unknown, flag: string, file: string | null, pattern: RegExp, what: string): Promise<void> {
  try {
    await fn();
    t.fail(`${what}: no error`);
  } catch (err) {
    t.ok(err instanceof DkimConfigError, `${what}: a DkimConfigError`);
    const e = err as DkimConfigError;
    t.equal(e.flag, flag, `${what}: names ${flag}`);
    t.equal(e.file, file, `${what}: names the file`);
    t.match(e.message, pattern, `${what}: ${e.message}`);
    t.ok(e.message.includes(flag), `${what}: the message names the flag`);
    if (file) t.ok(e.message.includes(file), `${what}: the message names the file`);
  }
}
