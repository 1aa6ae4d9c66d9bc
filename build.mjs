// build.mjs - bundles the engine into dist/mail.js (one file: the CLI, with a shebang, and
// the library entry) and writes its TypeScript declarations with tsc. No runtime dependencies
// go in: node: built-ins stay external.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { chmodSync, rmSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
rmSync("dist", { recursive: true, force: true });
await build({
  entryPoints: ["mail.ts"],
  outfile: "dist/mail.js",
  bundle: true,
  platform: "node",
  target: "node20",
  format: "esm",
  banner: { js: "#!/usr/bin/env node" },
  sourcemap: true,
  logLevel: "warning",
});
chmodSync("dist/mail.js", 0o755);
// Type-check everything and emit the .d.ts files next to the bundle.
execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json"], { stdio: "inherit" });
