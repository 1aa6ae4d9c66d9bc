// build.mjs - bundles the engine with esbuild, no runtime dependencies (node: built-ins stay
// external), and writes its TypeScript declarations with tsc:
//   dist/mail.js    the command line (node dist/mail.js, with a shebang); importable too
//   dist/index.js   the library entry ("mudmail"): the same code without the CLI, so a
//                   program that bundles it never runs mudmail's command line by accident
//   dist/*.d.ts     types for embedders
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { chmodSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const common = { entryPoints: ["mail.ts"], bundle: true, platform: "node", target: "node20", format: "esm", sourcemap: true, logLevel: "warning" };
rmSync("dist", { recursive: true, force: true });
await build({ ...common, outfile: "dist/mail.js", banner: { js: "#!/usr/bin/env node" }, define: { MUDMAIL_CLI: "true" } });
await build({ ...common, outfile: "dist/index.js", define: { MUDMAIL_CLI: "false" } });
chmodSync("dist/mail.js", 0o755);
// Type-check everything and emit the .d.ts files next to the bundles.
execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json"], { stdio: "inherit" });
writeFileSync("dist/index.d.ts", 'export * from "./mail.js";\n');
