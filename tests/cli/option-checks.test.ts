// Flags that are checked before anything runs: a combination that cannot work, a bad
// interface, DSN options of --send; each exits 2 naming the flag.

import t from "tap";
import { runCli, tempMaildir } from "../helpers/spool-files.js";

t.test("--disable-dns-lookups without --relay is a configuration error", async (t) => {
  const r = await runCli(["--flush", "--disable-dns-lookups", "--maildir", "/nonexistent/x"]);
  t.equal(r.code, 2);
  t.match(r.stderr, /--disable-dns-lookups needs --relay/);
  const bad = await runCli(["--flush", "--inet-interfaces", "eth0", "--maildir", "/nonexistent/x"]);
  t.equal(bad.code, 2);
  t.match(bad.stderr, /--inet-interfaces/);
});

t.test("--send --notify and --ret are checked", async (t) => {
  const maildir = await tempMaildir();
  for (const [args, pattern] of [[["--notify", "never,success"], /--notify: never stands alone/], [["--notify", "sometimes"], /--notify/], [["--ret", "body"], /--ret/]] as const) {
    const r = await runCli(["--send", "-f", "a@x.test", ...args, "b@x.test", "--maildir", maildir], { input: "hi\n" });
    t.equal(r.code, 2, args.join(" "));
    t.match(r.stderr, pattern);
  }
  const ok = await runCli(["--send", "-f", "a@x.test", "--notify", "success,failure", "--ret", "hdrs", "b@x.test", "--maildir", maildir], { input: "hi\n" });
  t.equal(ok.code, 0, ok.stderr);
  const id = ok.stdout.trim();
  const { readFile } = await import("node:fs/promises");
  const book = JSON.parse(await readFile(`${maildir}/outgoing/.${id}`, "utf8"));
  t.same(book.dsn, { notify: ["success", "failure"], ret: "hdrs" }, "kept in the bookkeeping, not in the message");
  t.notMatch(await readFile(`${maildir}/outgoing/${id}`, "utf8"), /NOTIFY|notify/);
});
