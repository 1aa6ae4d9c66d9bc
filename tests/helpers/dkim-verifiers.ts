/**
 * dkim-verifiers: independent DKIM verifiers for the tests of dkim.ts.
 *
 * - dkimpyVerify(): Python's dkimpy (Debian python3-dkim, python3-nacl for Ed25519), run with
 *   Debian's interpreter /usr/bin/python3 (the python3 first on PATH may be another one
 *   without Debian's modules). The key records come from a `dnsfunc` that answers from a
 *   plain { "s._domainkey.d": "v=DKIM1; ..." } table, so no DNS is involved. dkimpy's
 *   verify() raises on some broken signatures instead of returning False: both count as a
 *   failed verification, with the reason kept.
 * - Files given with { wire: true } hold what the engine wrote after DATA (dot-stuffed,
 *   ending CRLF.CRLF): Python undoes the stuffing and drops the terminator as a receiving
 *   MTA does (RFC 5321 4.5.2), so the verifier sees what a mailbox would store.
 * - opendkimVerify(): OpenDKIM's opendkim-testmsg (Debian opendkim-tools). It has no option
 *   for a key file or a DNS server: libopendkim asks the libc resolver, which reads
 *   /etc/resolv.conf and always uses port 53. So the test DNS server listens on port 53 of
 *   a loopback address of its own (127.53.x.y; all of 127/8 is loopback), and the tool runs
 *   in a private mount namespace (`unshare -m`, root only) where a resolv.conf naming that
 *   address is bind-mounted over /etc/resolv.conf; the machine's own file is never touched.
 *   Debian's libopendkim checks RFC 5322 header counts (exactly one Date and From, at most
 *   one To, Cc, Subject, ...): messages for it must keep to them.
 */
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { startDnsServer, type DnsServer, type Zone } from "./dns-server.js";
import { needFile, requireAll, run } from "./daemon.js";
import type { Test } from "tap";

export const PYTHON = "/usr/bin/python3";
export const DKIMPY = "/usr/lib/python3/dist-packages/dkim/__init__.py";
export const NACL = "/usr/lib/python3/dist-packages/nacl/__init__.py";
export const OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg";
export const UNSHARE = "/usr/bin/unshare";

export interface Verdict {
  /** True only when verify() returned True. */
  ok: boolean;
  domain: string;
  selector: string;
  algorithm: string;
  /** dkimpy's exception, or "verify() returned False". */
  error: string | null;
}

const PY = String.raw`
import sys, json, re
import dkim
zone = json.load(open(sys.argv[1]))
def dnsfunc(name, timeout=5):
    v = zone.get(name.decode('ascii').rstrip('.').lower())
    return None if v is None else v.encode('ascii')
out = []
for spec in sys.argv[2:]:
    mode, path = spec.split(':', 1)
    data = open(path, 'rb').read()
    if mode == 'wire':
        if not data.endswith(b'\r\n.\r\n') and data != b'.\r\n':
            raise SystemExit('wire file does not end with CRLF.CRLF: ' + path)
        data = data[:-3]
        data = re.sub(rb'(?m)^\.', b'', data)
    results = []
    parsed = dkim.DKIM(data)
    sigs = [v for (k, v) in parsed.headers if k.lower() == b'dkim-signature']
    for i, sig in enumerate(sigs):
        tags = dict((m.group(1).decode(), re.sub(rb'\s+', b'', m.group(2)).decode()) for m in re.finditer(rb'(?:^|;)\s*([a-z]+)\s*=([^;]*)', sig))
        verdict = {'domain': tags.get('d', ''), 'selector': tags.get('s', ''), 'algorithm': tags.get('a', ''), 'ok': False, 'error': None}
        try:
            ok = dkim.DKIM(data, minkey=1024).verify(idx=i, dnsfunc=dnsfunc)
            verdict['ok'] = bool(ok)
            if not ok:
                verdict['error'] = 'verify() returned False'
        except Exception as e:
            verdict['error'] = type(e).__name__ + ': ' + str(e)
        results.append(verdict)
    out.append(results)
print(json.dumps(out))
`;

/**
 * Verifies every DKIM-Signature of each file with dkimpy; one list of verdicts per file,
 * in the order of the signatures in the message.
 */
export async function dkimpyVerify(
  files: Array<{ file: string; wire?: boolean }>,
  txt: Record<string, string>,
  timeoutMs = 30000,
): Promise<Verdict[][]> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkimpy-"));
  try {
    const zone = path.join(dir, "zone.json");
    await fs.writeFile(zone, JSON.stringify(Object.fromEntries(Object.entries(txt).map(([k, v]) => [k.toLowerCase(), v]))));
    const args = ["-c", PY, zone, ...files.map((f) => `${f.wire ? "wire" : "plain"}:${f.file}`)];
    const result = await run(PYTHON, args, { timeoutMs });
    if (result.code !== 0) throw new Error(`dkimpy failed (exit ${result.code}): ${result.stderr}`);
    return JSON.parse(result.stdout) as Verdict[][];
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** Which of dkimpy's pieces are missing (empty when it can run). */
/** dkimpy and Debian's Python to run it (python3-dkim, python3-nacl): fails under CI when missing, skips elsewhere. */
export function requireDkimpy(t: Test): boolean {
  return requireAll(t, [needFile(PYTHON), needFile(DKIMPY), needFile(NACL)]);
}

/** A DNS server on port 53 of its own loopback address, and a resolv.conf naming it. */
export interface PrivateResolver {
  dns: DnsServer;
  resolvConf: string;
  close(): Promise<void>;
}

/**
 * Why opendkim-testmsg cannot be pointed at a local key here, or null when it can: it
 * needs the tool, root (for the mount namespace and port 53) and unshare(1).
 */
export async function opendkimUnavailable(): Promise<string | null> {
  const missing = [OPENDKIM_TESTMSG, UNSHARE].filter((p) => !existsSync(p));
  if (missing.length > 0) return `missing ${missing.join(", ")}`;
  if (process.getuid?.() !== 0) return "opendkim-testmsg reads keys only through the libc resolver (/etc/resolv.conf, port 53): pointing it at the test DNS server needs root for a private mount namespace";
  const probe = await run(UNSHARE, ["-m", "/bin/true"], { timeoutMs: 10000 });
  if (probe.code !== 0) return `unshare -m is not permitted here (${probe.stderr.trim() || `exit ${probe.code}`}): no private /etc/resolv.conf for opendkim-testmsg`;
  return null;
}

export async function startPrivateResolver(zone: Zone): Promise<PrivateResolver> {
  let dns: DnsServer | null = null;
  let lastError: unknown = null;
  for (let attempt = 0; attempt < 20 && dns === null; attempt++) {
    const host = `127.53.${1 + Math.floor(Math.random() * 250)}.${1 + Math.floor(Math.random() * 250)}`;
    try {
      dns = await startDnsServer(zone, { host, port: 53 });
    } catch (err) {
      lastError = err;
    }
  }
  if (dns === null) throw new Error(`no loopback address with a free port 53: ${String(lastError)}`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-resolv-"));
  const resolvConf = path.join(dir, "resolv.conf");
  await fs.writeFile(resolvConf, `nameserver ${dns.host}\noptions timeout:2 attempts:1\n`);
  const server = dns;
  return {
    dns: server,
    resolvConf,
    async close() {
      await server.close();
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}

/** opendkim-testmsg in verify mode on a message file; ok when it exits 0 (every check passed). */
export async function opendkimVerify(file: string, resolver: PrivateResolver): Promise<{ ok: boolean; stderr: string }> {
  const script = `mount --bind "$1" /etc/resolv.conf && exec ${OPENDKIM_TESTMSG}`;
  const result = await run(UNSHARE, ["-m", "/bin/sh", "-c", script, "sh", resolver.resolvConf], { stdinFile: file, timeoutMs: 30000 });
  return { ok: result.code === 0, stderr: result.stderr.trim() };
}
