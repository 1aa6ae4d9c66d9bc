// Test helper: a command run with a terminal (a pty) as its standard output and error, as a
// person at a terminal runs it: runInPty(cmd, args, { timeoutMs }) resolves with the exit code
// and every byte the command wrote to the terminal (escape sequences and \r kept). Debian's
// Python (/usr/bin/python3, NOTES.md) opens the pty; the wait is bounded by daemon.ts's run().

import { run } from "./daemon.js";

export const PYTHON = "/usr/bin/python3";

const SCRIPT = `
import os, pty, subprocess, sys
master, slave = pty.openpty()
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
os.close(slave)
out = bytearray()
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
sys.stdout.buffer.write(bytes(out))
sys.exit(child.wait())
`;

export async function runInPty(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<{ code: number | null; screen: string }> {
  const r = await run(PYTHON, ["-c", SCRIPT, cmd, ...args], { timeoutMs: opts.timeoutMs ?? 60_000 });
  return { code: r.code, screen: r.stdout };
}
