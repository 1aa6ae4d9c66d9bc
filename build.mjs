// build.mjs - bundles mudmail with esbuild, no runtime dependencies (node: built-ins stay
// external), and writes its TypeScript declarations with tsc:
//   dist/mail.js     the command line (cli.ts; node dist/mail.js, with a shebang)
//   dist/index.js    the library entry ("mudmail"): mail.ts, which never runs a command line
//   dist/index.d.ts  its types, for embedders (the declarations themselves in dist/types/)
// Both carry the spool's worker thread (spool-worker.ts) inside them as one script, so a host
// that bundles mudmail needs no file beside its bundle.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { chmodSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const common = { bundle: true, platform: "node", target: "node20", format: "esm", sourcemap: true, logLevel: "warning" };
rmSync("dist", { recursive: true, force: true });
const worker = await build({
  entryPoints: ["spool-worker.ts"], bundle: true, platform: "node", target: "node20", format: "cjs", write: false,
  // Names kept: a profile of the worker thread (bench --cpu-prof) must say which function ran.
  minifyWhitespace: true, minifySyntax: true,
  logLevel: "warning", define: { "import.meta.url": '"file:///mudmail-spool-worker"' },
});
const withWorker = { ...common, define: { MUDMAIL_SPOOL_WORKER: JSON.stringify(worker.outputFiles[0].text) } };
await build({ ...withWorker, entryPoints: ["cli.ts"], outfile: "dist/mail.js", banner: { js: "#!/usr/bin/env node" } });
await build({ ...withWorker, entryPoints: ["mail.ts"], outfile: "dist/index.js" });
chmodSync("dist/mail.js", 0o755);
// Type-check everything and emit the .d.ts files.
execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json"], { stdio: "inherit" });
writeFileSync("dist/index.d.ts", 'export * from "./types/mail.js";\n');
