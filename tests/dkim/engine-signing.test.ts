// DKIM through the engine: what leaves mudmail verifies with an independent implementation
// (dkimpy), through our CRLF normalisation, dot-stuffing and added headers; a retry sends
// the same signature; mail from other domains, or with two From fields, goes unsigned, and the
// log says so.

import t from "tap";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { MailEngine } from "../../mail.js";
import { dnsRecord, generateDkimKey } from "../../dkim.js";
import { startServer } from "../../receiver.js";
import { startScriptedServer } from "../helpers/scripted-server.js";
import { dkimpyVerify, requireDkimpy } from "../helpers/dkim-verifiers.js";
import { dropQueueFile, makeSpool, queueFile, runCli, tempMaildir } from "../helpers/spool-files.js";

const MESSAGE = "From: Talker <talker@talker.example>\nTo: bob@x.test\nSubject: signed\n\n.dot line\nbare LF body\r\ncaf\u00e9\n";

t.test("the engine signs once; dkimpy verifies what the server received, also after a retry", async (t) => {
  if (!requireDkimpy(t)) return;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-engine-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const rsa = await generateDkimKey("rsa", path.join(dir, "rsa.key"), { domain: "talker.example", selector: "r1" });
  const ed = await generateDkimKey("ed25519", path.join(dir, "ed.key"), { domain: "talker.example", selector: "e1" });
  const table = path.join(dir, "keys.json");
  await fs.writeFile(table, JSON.stringify({ "talker.example": [{ selector: "r1", key: "rsa.key" }, { selector: "e1", key: "ed.key" }] }));
  let refuse = true;
  const server = await startScriptedServer({ onData: () => (refuse ? "451 4.3.0 try again" : undefined) });
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  await dropQueueFile(maildir, `${now}.1`, queueFile("talker@talker.example", ["bob@x.test"], MESSAGE));
  await dropQueueFile(maildir, `${now}.2`, queueFile("other@elsewhere.example", ["bob@x.test"], "From: other@elsewhere.example\nSubject: not ours\n\nhi\n"));
  const lines: string[] = [];
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, dkimKeys: table, log: (l) => lines.push(l), fsync: false });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { deferred: 2 }, "the first attempt is refused after the data");
  refuse = false;
  t.match(await engine.flush({ force: true }), { sent: 2 });
  const signed = server.sessions.flatMap((s) => s.unaccepted.concat(s.messages)).filter((m) => m.from === "talker@talker.example");
  t.equal(signed.length, 2, "two attempts of the signed message reached the server");
  const signatures = signed.map((m) => m.data.toString("latin1").match(/^DKIM-Signature:[^]*?(?=\r\n[^ \t])/gm) ?? []);
  t.equal(signatures[0].length, 2, "dual signing: RSA and Ed25519");
  t.same(signatures[1], signatures[0], "the retry carries the very same signatures (signed once)");
  const wire = path.join(dir, "received.eml");
  await fs.writeFile(wire, signed[1].data);
  const txt = { [dnsRecord(rsa).name]: dnsRecord(rsa).value, [dnsRecord(ed).name]: dnsRecord(ed).value };
  const [verdicts] = await dkimpyVerify([{ file: wire }], txt);
  t.same(verdicts.map((v) => [v.algorithm, v.ok]), [["rsa-sha256", true], ["ed25519-sha256", true]], `dkimpy verifies both: ${JSON.stringify(verdicts)}`);
  const tampered = path.join(dir, "tampered.eml");
  await fs.writeFile(tampered, Buffer.from(signed[1].data.toString("latin1").replace("bare LF body", "bare LF bodY"), "latin1"));
  const [bad] = await dkimpyVerify([{ file: tampered }], txt);
  t.ok(bad.every((v) => !v.ok), "one changed body byte breaks both");
  const other = server.messages.find((m) => m.from === "other@elsewhere.example")!;
  t.notMatch(other.data.toString(), /DKIM-Signature/, "mail From another domain is not signed");
  t.ok(lines.some((l) => /From domain elsewhere\.example has no DKIM key: not signed/.test(l)), "and the log says so");
});

t.test("a message with two From: fields goes out unsigned, and the log says why", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-two-from-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const key = path.join(dir, "ed.key");
  await generateDkimKey("ed25519", key, { domain: "talker.example", selector: "e1" });
  const receiverDir = path.join(dir, "receiver");
  const mailbox = path.join(receiverDir, "users", "bob@x.test");
  await fs.mkdir(mailbox, { recursive: true });
  const receiver = await startServer({ maildir: receiverDir, listen: "127.0.0.1:0", log: () => undefined });
  t.teardown(() => receiver.close());
  const maildir = await tempMaildir();
  t.teardown(() => fs.rm(path.dirname(maildir), { recursive: true, force: true }));
  await makeSpool(maildir);
  const now = Math.floor(Date.now() / 1000);
  const twoFrom = await dropQueueFile(maildir, `${now}.1`, queueFile("talker@talker.example", ["bob@x.test"],
    "From: talker@talker.example\nFrom: mallory@talker.example\nSubject: two authors\n\nhi\n"));
  await dropQueueFile(maildir, `${now}.2`, queueFile("talker@talker.example", ["bob@x.test"], "From: talker@talker.example\nSubject: one author\n\nhi\n"));
  const lines: string[] = [];
  const engine = new MailEngine({
    maildir, relay: `127.0.0.1:${receiver.address.port}`, fsync: false, log: (l) => lines.push(l),
    dkimDomain: "talker.example", dkimSelector: "e1", dkimKey: key,
  });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { sent: 2, deferred: 0, bounced: 0 });
  const stored = (await fs.readFile(path.join(mailbox, "mail"), "latin1")).split(/^(?=From )/m);
  const two = stored.find((m) => m.includes("Subject: two authors"));
  const one = stored.find((m) => m.includes("Subject: one author"));
  t.ok(two && one, "both messages were delivered");
  t.notMatch(two, /^DKIM-Signature:/m, "the one with two From fields unsigned");
  t.match(two, /^From: talker@talker\.example\nFrom: mallory@talker\.example\n/m, "with both its From fields as queued");
  t.match(one, /^DKIM-Signature: v=1; a=ed25519-sha256;/m, "the same engine signs a message with one From");
  t.ok(lines.some((l) => l.endsWith(`${twoFrom}: not DKIM-signed: the message has 2 From: header fields (RFC 5322 allows one)`)),
    `the log says why:\n${lines.join("\n")}`);
});

t.test("DKIM key problems exit 2 naming the flag and the file", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-cli-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const missing = await runCli(["--flush", "--relay", "127.0.0.1:1", "--maildir", path.join(dir, "m"), "--dkim-domain", "a.example", "--dkim-selector", "s", "--dkim-key", path.join(dir, "none.key")]);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /--dkim-key .*none\.key/);
  await fs.writeFile(path.join(dir, "garbage.key"), "not a key\n");
  const garbage = await runCli(["--flush", "--relay", "127.0.0.1:1", "--maildir", path.join(dir, "m"), "--dkim-domain", "a.example", "--dkim-selector", "s", "--dkim-key", path.join(dir, "garbage.key")]);
  t.equal(garbage.code, 2);
  t.match(garbage.stderr, /--dkim-key .*garbage\.key/);
  const selector = await runCli(["--dkim-keygen", "--dkim-domain", "a.example", "--dkim-selector", "bad selector!", "--dkim-key", path.join(dir, "x.key")]);
  t.equal(selector.code, 2);
  t.match(selector.stderr, /--dkim-selector/);
  const made = await runCli(["--dkim-keygen", "--dkim-domain", "a.example", "--dkim-selector", "s2026", "--dkim-algorithm", "rsa", "--dkim-key", path.join(dir, "s.key")]);
  t.equal(made.code, 0, made.stderr);
  t.match(made.stdout, /s2026\._domainkey\.a\.example\. IN TXT (\( )?"v=DKIM1; k=rsa; p=/);
  t.match(made.stdout, /_dmarc\.a\.example\. IN TXT "v=DMARC1; p=none/);
  t.equal((await fs.stat(path.join(dir, "s.key"))).mode & 0o777, 0o600, "the key is 0600");
  const again = await runCli(["--dkim-print-dns", "--dkim-domain", "a.example", "--dkim-selector", "s2026", "--dkim-key", path.join(dir, "s.key")]);
  t.equal(again.code, 0);
  const record = (out: string) => out.split("\n").find((l) => l.includes("._domainkey."));
  t.ok(record(again.stdout), "a record is printed");
  t.equal(record(again.stdout), record(made.stdout), "--dkim-print-dns prints the same key");
});

t.test("lines folded on the wire are hashed as folded: a dot-first line at the 998-octet limit verifies, small or streamed", async (t) => {
  if (!requireDkimpy(t)) return;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "mudmail-dkim-fold-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const rsa = await generateDkimKey("rsa", path.join(dir, "rsa.key"), { domain: "talker.example", selector: "r1" });
  const table = path.join(dir, "keys.json");
  await fs.writeFile(table, JSON.stringify({ "talker.example": [{ selector: "r1", key: "rsa.key" }] }));
  const server = await startScriptedServer({});
  t.teardown(() => server.close());
  const maildir = await tempMaildir();
  await makeSpool(maildir);
  // Stuffed, a dot-first line is one octet longer on the wire: at 998 octets it is folded
  // there, and the signature must cover the folded line the recipient gets.
  const awkward = [997, 998, 999, 1996, 1997].map((n) => "." + "x".repeat(n - 1)).join("\n") + "\n..two dots\n.\n";
  const small = `From: talker@talker.example\nTo: bob@x.test\nSubject: small\n\n${awkward}`;
  const large = `From: talker@talker.example\nTo: bob@x.test\nSubject: large\n\n${(awkward + "filler line of plain text\n".repeat(100)).repeat(160)}`;
  t.ok(Buffer.byteLength(large) > 256 * 1024, "the large one is streamed from its file, not prepared whole");
  const now = Math.floor(Date.now() / 1000);
  await dropQueueFile(maildir, `${now}.1`, queueFile("talker@talker.example", ["bob@x.test"], small));
  await dropQueueFile(maildir, `${now}.2`, queueFile("talker@talker.example", ["bob@x.test"], large));
  const engine = new MailEngine({ maildir, relay: `127.0.0.1:${server.port}`, dkimKeys: table, log: () => {}, fsync: false });
  t.teardown(() => engine.stop());
  t.match(await engine.flush(), { sent: 2 });
  const txt = { [dnsRecord(rsa).name]: dnsRecord(rsa).value };
  for (const subject of ["small", "large"]) {
    const received = server.messages.find((m) => m.data.includes(`Subject: ${subject}\r\n`));
    if (!received) {
      t.fail(`the ${subject} message reached the server`);
      continue;
    }
    t.match(received.data.toString("latin1"), /\r\n \r?\n?x/, `${subject}: a long line was folded on the wire`);
    const file = path.join(dir, `${subject}.eml`);
    await fs.writeFile(file, received.data);
    const [verdicts] = await dkimpyVerify([{ file }], txt);
    t.same(verdicts.map((v) => v.ok), [true], `${subject}: dkimpy verifies it: ${JSON.stringify(verdicts)}`);
  }
});
