// The shape of the code as a newcomer and a host program meet it: no module imports one that
// imports it back, the receiver stands apart from the engine, and the library entry offers
// what a host calls and nothing else (its runtime exports and its published types).

import t from "tap";
import { EventEmitter } from "node:events";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import ts from "typescript";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Each root module's imports of other root modules ("./queue.js" -> "queue"). */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of fs.readdirSync(root).filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts"))) {
    const text = fs.readFileSync(path.join(root, file), "utf8");
    const imports = [...text.matchAll(/^(?:import|export)\b[^;]*?from "\.\/([\w-]+)\.js"/gms)].map((m) => m[1]);
    graph.set(file.replace(/\.ts$/, ""), [...new Set(imports)]);
  }
  return graph;
}

function reachable(graph: Map<string, string[]>, from: string): Set<string> {
  const seen = new Set<string>();
  const walk = (n: string) => { for (const m of graph.get(n) ?? []) if (!seen.has(m)) { seen.add(m); walk(m); } };
  walk(from);
  return seen;
}

t.test("no module imports one that imports it back", async (t) => {
  const graph = importGraph();
  t.ok(graph.size >= 10, `${graph.size} modules read`);
  const cycles = [...graph.keys()].filter((m) => reachable(graph, m).has(m));
  t.same(cycles, [], "modules on an import cycle");
  t.notOk(reachable(graph, "receiver").has("mail"), "the receiver never imports the engine");
  t.notOk(reachable(graph, "mail").has("cli"), "the engine never imports the command line");
  t.same(graph.get("queue"), [], "the spool stands on nothing of ours");
});

const PUBLIC_VALUES = ["MailEngine", "MailError", "SmtpSession", "SpoolError", "UsageError", "VERSION", "expn", "help", "sendmail", "smtpTransactions", "startServer", "vrfy"];
const PUBLIC_TYPES = [
  "Answer", "ClientOptions", "FlushSummary", "Loser", "MailEngineEvents", "MailErrorDetails", "MailOptions", "Metrics", "Outcome", "Policy", "QueueEntry",
  "SendMessage", "SendmailOptions", "SendmailResult", "ServerHandle", "ServerOptions", "Status", "StoredMessage", "TlsMode",
];
const ENGINE_MEMBERS = ["constructor", "flush", "metrics", "progress", "queue", "send", "start", "stop", "tick"];

t.test("dist/index.js exports what a host calls, and no command line", async (t) => {
  const entry = path.join(root, "dist/index.js");
  t.ok(fs.existsSync(entry), "built (npm test's pretest runs build.mjs)");
  const library = await import(pathToFileURL(entry).href);
  t.same(Object.keys(library).sort(), PUBLIC_VALUES, "runtime exports");
  t.same(Object.getOwnPropertyNames(library.MailEngine.prototype).sort(), ENGINE_MEMBERS, "MailEngine's own members");
  // A CommonJS host (a Ranvier bundle) loads the package with require(): Node 20.19+ takes an ES module.
  const required = createRequire(path.join(root, "package.json"))("mudmail") as Record<string, unknown>;
  t.same(Object.keys(required).filter((k) => k !== "__esModule" && k !== "module.exports").sort(), PUBLIC_VALUES, "require(\"mudmail\") gives the same exports");
});

t.test("the published types list only what a host calls", async (t) => {
  const program = ts.createProgram([path.join(root, "dist/index.d.ts")], { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, types: ["node"], skipLibCheck: true });
  const checker = program.getTypeChecker();
  const source = program.getSourceFile(path.join(root, "dist/index.d.ts"))!;
  const moduleSymbol = checker.getSymbolAtLocation(source)!;
  const exported = checker.getExportsOfModule(moduleSymbol).map((s) => s.getName()).sort();
  t.same(exported, [...PUBLIC_VALUES, ...PUBLIC_TYPES].sort(), "exported names");
  const resolve = (name: string) => {
    const symbol = checker.getExportsOfModule(moduleSymbol).find((s) => s.getName() === name)!;
    return checker.getDeclaredTypeOfSymbol(symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol);
  };
  const declared = resolve("MailEngine");
  const inherited = new Set(Object.getOwnPropertyNames(EventEmitter.prototype));
  const own = declared.getProperties().map((p) => p.getName()).filter((n) => !inherited.has(n) && !n.startsWith("__@") && n !== "#private");
  t.same(own.sort(), ENGINE_MEMBERS.filter((m) => m !== "constructor"), "MailEngine's members beyond EventEmitter's (the rest is #private)");
  const sessionType = resolve("SmtpSession");
  t.same(sessionType.getProperties().map((p) => p.getName()).filter((n) => n !== "#private").sort(),
    ["close", "closed", "command", "data", "ehlo", "expn", "extensions", "helo", "help", "mail", "noop", "options", "quit", "rcpt", "rset", "secure", "vrfy"],
    "SmtpSession's members");
});
