// build.mjs - bundles mudmail with esbuild, no runtime dependencies (node: built-ins stay
// external), and writes its TypeScript declarations with tsc:
//   dist/mail.js     the command line (cli.ts; node dist/mail.js, with a shebang)
//   dist/index.js    the library entry ("mudmail"): mail.ts, which never runs a command line
//   dist/index.d.ts  its types, for embedders (the declarations themselves in dist/types/)
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { chmodSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const common = { bundle: true, platform: "node", target: "node20", format: "esm", sourcemap: true, logLevel: "warning" };
rmSync("dist", { recursive: true, force: true });
await build({ ...common, entryPoints: ["cli.ts"], outfile: "dist/mail.js", banner: { js: "#!/usr/bin/env node" } });
await build({ ...common, entryPoints: ["mail.ts"], outfile: "dist/index.js" });
chmodSync("dist/mail.js", 0o755);
// Type-check everything and emit the .d.ts files.
execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json"], { stdio: "inherit" });
writeFileSync("dist/index.d.ts", 'export * from "./types/mail.js";\n');
