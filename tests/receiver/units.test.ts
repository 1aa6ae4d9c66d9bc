// Units of receiver.ts: the DATA decoder (queue.ts's DotDecoder, the receiver's framing) and
// the mbox encoder at every chunk boundary, paths, and the server's options.

import t from "tap";
import fs from "node:fs/promises";
import { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { MboxEncoder, parsePath, startServer, journalFileName, asctime } from "../../receiver.js";
import { DotDecoder } from "../../queue.js";
import { UsageError } from "../../mail.js";

/* ------------------------------------------------------------------------------------ */
/* Units: the DATA decoder, the mbox encoder, paths, options                             */

function decodeAll(chunks: Buffer[]): { content: string; rest: string; done: boolean } {
  const d = new DotDecoder();
  const content: Buffer[] = [];
  for (let k = 0; k < chunks.length; k++) {
    const r = d.push(chunks[k]);
    content.push(...r.out);
    if (r.done) {
      const rest = Buffer.concat([chunks[k].subarray(r.next), ...chunks.slice(k + 1)]);
      const text = Buffer.concat(content).toString("latin1");
      if (d.size !== Buffer.byteLength(text, "latin1")) throw new Error("size disagrees with the content");
      return { content: text, rest: rest.toString("latin1"), done: true };
    }
  }
  return { content: Buffer.concat(content).toString("latin1"), rest: "", done: false };
}

/** Every way of cutting the input in two, and one byte at a time, must give the same result. */
function everySplit(input: string): Buffer[][] {
  const bytes = Buffer.from(input, "latin1");
  const ways: Buffer[][] = [[bytes]];
  for (let i = 1; i < bytes.length; i++) ways.push([bytes.subarray(0, i), bytes.subarray(i)]);
  ways.push([...bytes].map((b) => Buffer.from([b])));
  return ways;
}

t.test("DotDecoder: only CRLF.CRLF ends DATA, dot-stuffing removed, across every chunk boundary", async (t) => {
  const cases: Array<[string, string, string, string]> = [
    ["end right away", ".\r\n", "", ""],
    ["one line, then the next command", "a\r\n.\r\nQUIT\r\n", "a\r\n", "QUIT\r\n"],
    ["stuffed dots", "..x\r\n..\r\n...\r\n.\r\n", ".x\r\n.\r\n..\r\n", ""],
    ["LF . LF is content", "a\n.\nb\r\n.\r\n", "a\n.\nb\r\n", ""],
    ["CRLF . CR x: the CR is content", "a\r\n.\rb\r\n.\r\n", "a\r\n\rb\r\n", ""],
    ["LF . CRLF is content", "a\n.\r\nb\r\n.\r\n", "a\n.\r\nb\r\n", ""],
    ["CRLF . LF is content", "a\r\n.\nb\r\n.\r\n", "a\r\n\nb\r\n", ""],
    ["CR CR LF ends a line", "a\r\r\n.\r\n", "a\r\r\n", ""],
    ["CR . CR LF is content", "a\r.\r\nb\r\n.\r\n", "a\r.\r\nb\r\n", ""],
    ["8-bit passes", "caf\xc3\xa9 \xff\r\n.\r\n", "caf\xc3\xa9 \xff\r\n", ""],
  ];
  for (const [name, input, content, rest] of cases) {
    let ok = true;
    for (const chunks of everySplit(input)) {
      const r = decodeAll(chunks);
      if (!r.done || r.content !== content || r.rest !== rest) {
        t.same(r, { content, rest, done: true }, `${name}: split ${chunks.map((c) => c.length).join("+")}`);
        ok = false;
        break;
      }
    }
    if (ok) t.pass(`${name}: ${JSON.stringify(input)} -> ${JSON.stringify(content)}`);
  }
  const open = decodeAll([Buffer.from("a\n.\n\r\n.\rb\n.\r\n")]);
  t.equal(open.done, false, "the smuggling sequences alone never end the message");
});

function encodeAll(chunks: Buffer[]): string {
  const e = new MboxEncoder();
  const out: Buffer[] = [];
  for (const c of chunks) out.push(...e.push(c));
  out.push(...e.end());
  return Buffer.concat(out).toString("latin1");
}

t.test("MboxEncoder: CRLF to LF, mboxrd >From quoting, across every chunk boundary", async (t) => {
  const cases: Array<[string, string, string]> = [
    ["From lines", "From x\r\n>From y\r\n>>From z\r\n", ">From x\n>>From y\n>>>From z\n"],
    ["near misses", "From\r\n>From\r\nFro\r\nx From y\r\n From y\r\n>>\r\nfrom y\r\n", "From\n>From\nFro\nx From y\n From y\n>>\nfrom y\n"],
    ["a bare LF starts a line", "a\nFrom b\r\n", "a\n>From b\n"],
    ["a bare CR does not", "a\rFrom b\r\n", "a\rFrom b\n"],
    ["CR CR LF", "a\r\r\nb\r\n", "a\r\nb\n"],
    ["8-bit", "caf\xc3\xa9\r\n\xffFrom\r\n", "caf\xc3\xa9\n\xffFrom\n"],
    ["the first line too", "From the start\r\n", ">From the start\n"],
  ];
  for (const [name, input, want] of cases) {
    let ok = true;
    for (const chunks of everySplit(input)) {
      const got = encodeAll(chunks);
      if (got !== want) {
        t.equal(got, want, `${name}: split ${chunks.map((c) => c.length).join("+")}`);
        ok = false;
        break;
      }
    }
    if (ok) t.pass(`${name}: ${JSON.stringify(input)} -> ${JSON.stringify(want)}`);
  }
  const many = ">".repeat(200_000);
  const input = Buffer.from(`${many}From x\r\n${many}\r\n`);
  const chunks = [input.subarray(0, 70_000), input.subarray(70_000, 200_003), input.subarray(200_003)];
  t.equal(encodeAll(chunks), `>${many}From x\n${many}\n`, "200,000 '>' before From: quoted once, held as a count");
});

t.test("parsePath: brackets, null path, source route, the talker's bare address, parameters", async (t) => {
  t.same(parsePath("<a@b.test>"), { address: "a@b.test", params: [] });
  t.same(parsePath(" <a@b.test> SIZE=10 BODY=8BITMIME"), { address: "a@b.test", params: ["SIZE=10", "BODY=8BITMIME"] });
  t.same(parsePath("<>"), { address: "", params: [] });
  t.same(parsePath("<@r1.test,@r2.test:a@b.test>"), { address: "a@b.test", params: [] });
  t.same(parsePath(' <"a b>c"@b.test>'), { address: '"a b>c"@b.test', params: [] });
  t.same(parsePath(" joe@blow.com"), { address: "joe@blow.com", params: [] });
  t.equal(parsePath(""), null);
  t.equal(parsePath("<a@b.test"), null);
  t.equal(parsePath("<a@b.test>SIZE=1"), null);
  t.equal(parsePath("<a<b@c>"), null);
});

t.test("options: --max-recipients 100..1000, --listen, TLS files, a port in use", async (t) => {
  const maildir = path.join(await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-receiver-")), "maildir");
  for (const n of [99, 1001, 150.5, 0]) {
    await t.rejects(startServer({ maildir, listen: "127.0.0.1:0", maxRecipients: n }), { name: "UsageError", message: /^--max-recipients: / }, `${n}`);
  }
  const ok = await startServer({ maildir, listen: "127.0.0.1:0", maxRecipients: 1000, log: () => undefined });
  t.ok(ok.address.port > 0, "1000 is allowed; port 0 picks a free port");
  await t.rejects(startServer({ maildir, listen: "nonsense port", log: () => undefined }), { message: /^--listen: / });
  await t.rejects(startServer({ maildir, listen: "127.0.0.1:70000", log: () => undefined }), { message: /^--listen: / });
  await t.rejects(startServer({ maildir, listen: "127.0.0.1:0", tlsCert: "/nonexistent" }), { message: "--tls-cert and --tls-key go together" });
  await t.rejects(startServer({ maildir, listen: "127.0.0.1:0", tlsCert: "/nonexistent/c", tlsKey: "/nonexistent/k" }), { message: /^--tls-cert: cannot read/ });
  await t.rejects(startServer({ maildir, listen: "127.0.0.1:0", maxSize: -1 }), { message: /^--max-size: / });
  await t.rejects(startServer({ maildir, listen: "127.0.0.1:0", hostname: "bad host" }), { message: /^--hostname: / });
  const err = await startServer({ maildir, listen: "127.0.0.1:0", maxRecipients: 99 }).catch((e) => e);
  t.ok(err instanceof UsageError, "a UsageError, so the CLI exits 2");
  await t.rejects(startServer({ maildir, listen: `127.0.0.1:${ok.address.port}`, log: () => undefined }), { code: "EADDRINUSE" });
  await ok.close();
  for (const folder of ["users", "journal", "tmp"]) t.ok(existsSync(path.join(maildir, folder)), `${folder}/ created`);
  t.equal(journalFileName(new Date(2003, 2, 12, 19, 30)), "2003_03_12_19", "the seed's journal file name");
  t.equal(asctime(new Date(2026, 10, 3, 7, 8, 9)), "Tue Nov  3 07:08:09 2026", "asctime(3)");
});
