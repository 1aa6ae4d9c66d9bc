// fs-calls: which node:fs functions this thread calls. Every function of node:fs and
// node:fs/promises is wrapped (a worker thread has modules of its own, so its calls are not
// seen), and `import * as fs` namespaces are told of the wrappers, so our modules' calls are
// seen as much as a test's own.

import fs from "node:fs";
import { syncBuiltinESMExports } from "node:module";

/** Records every call of a function of node:fs or node:fs/promises made on this thread. */
export function watchFs(): { calls: string[]; restore(): void } {
  const calls: string[] = [];
  const undo: Array<() => void> = [];
  const wrap = (owner: Record<string, unknown>, label: string) => {
    for (const name of Object.keys(owner)) {
      const original = owner[name];
      // Functions only, and not the classes (Stats, ReadStream, ...): those are not calls.
      if (typeof original !== "function" || /^[A-Z]/.test(name)) continue;
      owner[name] = function (this: unknown, ...args: unknown[]) {
        calls.push(`${label}${name}`);
        return (original as (...a: unknown[]) => unknown).apply(this, args);
      };
      undo.push(() => { owner[name] = original; });
    }
  };
  wrap(fs as unknown as Record<string, unknown>, "fs.");
  wrap(fs.promises as unknown as Record<string, unknown>, "fs.promises.");
  // `import * as fs` namespaces (ours) see the wrappers only once told to.
  syncBuiltinESMExports();
  return {
    calls,
    restore: () => {
      for (const u of undo) u();
      syncBuiltinESMExports();
    },
  };
}

