// SMTP smuggling and envelope injection are impossible through the engine: whatever a queue file
// holds, the wire is CRLF-only, dot-stuffed, one end of data per message (checked against the
// scripted server and a real Postfix that refuses bare newlines), and envelope addresses with
// CR, LF, NUL, spaces or brackets never reach the wire.

import * as fs from "node:fs";
import * as path from "node:path";
import t from "tap";
import { MailError } from "../../mail.js";
import { OPENSSL } from "../helpers/certs.js";
import { requirePostfix, requireTool } from "../helpers/postfix.js";
import { RawClient } from "../helpers/smtp-raw.js";
import { fromTestHeader, normaliseLineEnds, queueFile, testMessage, testNumber } from "../helpers/spool-files.js";
import { FLUSH_MS, rig, postfixWith, postfixEngine } from "../helpers/security-rig.js";
import { bounded, newQueueId } from "../helpers/engine-rig.js";

t.test("smuggling and injection", async (t) => {
  if (!requireTool(t, OPENSSL)) return;

  /* 10 --------------------------------------------------------------------------------- */
  const HEAD = (n: number) => [
    `X-Mudmail-Test: ${n}`, "From: talker@test.example", `To: user${n}@test.example`, `Subject: smuggling ${n}`,
    "Date: Mon, 23 Nov 2026 12:00:00 +0000", `Message-ID: <smuggle.${n}@test.example>`,
  ].join("\r\n") + "\r\n\r\n";
  const SMUGGLE = "MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@test.example>\r\nDATA\r\nFrom: ceo@test.example\r\n\r\nsmuggled\r\n";
  const smugglingBodies: Array<[string, string]> = [
    ["\\n.\\n in the body", `before\n.\nMAIL FROM:<evil@attacker.example>\nRCPT TO:<victim@test.example>\nDATA\nsmuggled\n.\nafter\n`],
    ["\\r\\n.\\r\\n inside the body", `before\r\n.\r\n${SMUGGLE}.\r\nafter\r\n`],
    ["\\r.\\r", `before\r.\r${SMUGGLE.replace(/\r\n/g, "\r")}after\r`],
    ["\\n.\\r\\n", `before\n.\r\n${SMUGGLE}after\r\n`],
    ["\\r\\n.\\r (no LF)", `before\r\n.\r${SMUGGLE}after\r\n`],
    ["\\r\\n.\\n", `before\r\n.\n${SMUGGLE}after\r\n`],
    ["lone CR", `one\rtwo\r\nthree\r\r\nfour\r\n`],
    ["lone LF", `one\ntwo\r\nthree\n\nfour\n`],
    ["NUL bytes", `nul\0here\r\n\0\r\n.\0\r\nend\r\n`],
    ["no newline at the end", `last line without a newline`],
    ["ends in a lone dot without newline", `text\r\n.`],
    ["ends in \\r\\n.\\r", `text\r\n.\r`],
    ["dot lines", `.\r\n..\r\n...\r\n. \r\n.x\r\n`],
  ];
  /** Queue files for the smuggling tests; `atStart`: the message lines start with ".\n". */
  const smugglingFiles = (): Array<{ n: number; what: string; content: Buffer; messagePart: Buffer }> => {
    const files = smugglingBodies.map(([what, body], i) => {
      const n = 100 + i;
      const messagePart = Buffer.from(HEAD(n) + body, "latin1");
      return { n, what, messagePart, content: Buffer.concat([Buffer.from(`sender@test.example\nuser${n}@test.example\n`), messagePart]) };
    });
    const n = 100 + smugglingBodies.length;
    const atStart = Buffer.from(`.\n${HEAD(n).replace(/\r\n/g, "\n")}body after a dot line at the very start\n`, "latin1");
    files.push({ n, what: ".\\n at the very start", messagePart: atStart, content: Buffer.concat([Buffer.from(`sender@test.example\nuser${n}@test.example\n`), atStart]) });
    return files;
  };
  /** The content as it must arrive: every CR, LF or CRLF one CRLF, a CRLF at the end. */
  const onTheWire = (part: Buffer): Buffer => {
    let text = part.toString("latin1").replace(/\r\n|\r|\n/g, "\r\n");
    if (!text.endsWith("\r\n")) text += "\r\n";
    return Buffer.from(text, "latin1");
  };

  t.test("smuggling: whatever a queue file holds, the wire is CRLF-only, dot-stuffed, one end of data per message", async (t) => {
    await t.test("the scripted server counts and checks bytes", async (t) => {
      const r = await rig(t, {});
      const files = smugglingFiles();
      for (const f of files) r.drop(f.content);
      const s = await r.flush();
      t.match(s, { sent: files.length, deferred: 0, bounced: 0, corrupt: 0 }, "every file sent");
      t.equal(r.server.messages.length, files.length, "exactly one message per queue file");
      t.same(r.server.sessions.flatMap((x) => x.unaccepted), [], "no half message");
      const commands = r.server.sessions.flatMap((x) => x.commands);
      t.same(commands.filter((c) => /evil|victim/i.test(c)), [], "no smuggled command was read as a command");
      t.equal(commands.filter((c) => /^MAIL /i.test(c)).length, files.length, "one MAIL per file");
      for (const f of files) {
        const got = r.server.messages.filter((m) => m.to.includes(`user${f.n}@test.example`));
        t.equal(got.length, 1, `${f.what}: one message`);
        const m = got[0];
        if (!m) continue;
        const raw = m.raw.toString("latin1");
        t.notMatch(raw, /\r(?!\n)|(?<!\r)\n/, `${f.what}: no bare CR or LF on the wire`);
        t.equal(raw.split("\r\n.\r\n").length - 1, 1, `${f.what}: exactly one CRLF.CRLF`);
        t.ok(raw.endsWith("\r\n.\r\n"), `${f.what}: and it is the end`);
        const expected = onTheWire(f.messagePart);
        if (f.what.startsWith(".\\n")) t.ok(m.data.subarray(m.data.length - expected.length).equals(expected), `${f.what}: content intact (after the headers the engine added)`);
        else t.ok(m.data.equals(expected), `${f.what}: the content equals the file's with line ends normalised`);
      }
    });

    await t.test("a real Postfix with smtpd_forbid_bare_newline = yes", async (t) => {
      if (!requirePostfix(t)) return;
      // Postfix 3.7.10+: "yes" is an alias of "normalize" (bare LF taken as CRLF, only the
      // End-of-DATA must be CRLF.CRLF); "reject" refuses any bare LF. Exclusions default to
      // $mynetworks, which is loopback here: emptied so that the check applies to us.
      const pf = await postfixWith(t, { mainCf: { smtpd_forbid_bare_newline: "reject", smtpd_forbid_bare_newline_exclusions: "" } });
      const e = postfixEngine(t, pf, { tls: "none" });
      const files = smugglingFiles();
      for (const f of files) {
        const id = newQueueId();
        fs.writeFileSync(path.join(e.maildir, "..", id), f.content);
        fs.renameSync(path.join(e.maildir, "..", id), path.join(e.maildir, "outgoing", id));
      }
      const s = await bounded(e.engine.flush(), FLUSH_MS, "flush to Postfix");
      t.match(s, { sent: files.length, deferred: 0, bounced: 0 }, `Postfix accepted every file (${e.lines.filter((l) => /status=(deferred|bounced)/.test(l)).join(" | ")})`);
      const stored = await pf.waitForMessages(files.length, 20_000);
      await new Promise((resolve) => setTimeout(resolve, 300));
      const all = await pf.readMessages();
      t.equal(all.length, files.length, "exactly one stored message per queue file, nothing smuggled");
      const log = await pf.log();
      t.notMatch(log, /bare <?LF>?|bare newline/i, "Postfix saw no bare newline");
      // The control: this Postfix does refuse a bare LF (so its silence above means something).
      const raw = await RawClient.connect(pf.port);
      t.teardown(() => raw.destroy());
      await raw.reply();
      await raw.command("EHLO raw.test");
      await raw.command("MAIL FROM:<sender@test.example>");
      await raw.command("RCPT TO:<control@test.example>");
      t.match((await raw.command("DATA"))[0], /^354 /, "control: DATA");
      raw.write("Subject: control\r\n\r\nbare\nnewline\r\n.\r\n");
      const refused = await raw.reply().catch((err: Error) => [`(${err.message})`]);
      t.match(refused[0], /^5\d\d .*bare/i, `control: Postfix refuses a bare LF (${refused[0]})`);
      raw.destroy();
      t.notMatch(log, /evil@attacker|victim@test\.example/, "no smuggled envelope in Postfix's log");
      for (const f of files) {
        const copy = stored.find((m) => testNumber(m) === f.n);
        t.ok(copy, `${f.what}: stored`);
        if (!copy) continue;
        const want = fromTestHeader(normaliseLineEnds(onTheWire(f.messagePart).toString("latin1")));
        const got = fromTestHeader(copy.toString("latin1"));
        t.equal(got, want, `${f.what}: stored content equals the file's with line ends normalised`);
      }
    });
  });

  /* 11 --------------------------------------------------------------------------------- */
  t.test("injection: envelope addresses with CR, LF, NUL, spaces or brackets never reach the wire", async (t) => {
    const r = await rig(t, {});
    const body = testMessage(200);
    const bad: Array<[string, string]> = [
      ["CR in the sender", `evil@test.example\rRCPT TO:<victim@test.example>\nuser@test.example\n${body}`],
      ["CR in a recipient", `sender@test.example\nuser@test.example\rRCPT TO:<victim@test.example>\n${body}`],
      ["CRLF-broken sender", `<evil@test.example\n>victim@test.example\n${body}`],
      ["NUL in the sender", `ev\0il@test.example\nuser@test.example\n${body}`],
      ["NUL in a recipient", `sender@test.example\nvic\0tim@test.example\n${body}`],
      ["space outside quotes in the sender", `evil victim@test.example\nuser@test.example\n${body}`],
      ["space outside quotes in a recipient (a token without @)", `sender@test.example\nRCPT victim@test.example\n${body}`],
      ["< inside the sender", `evil<victim@test.example\nuser@test.example\n${body}`],
      ["> inside a recipient", `sender@test.example\nevil>victim@test.example\n${body}`],
      ["<> nested in a recipient", `sender@test.example\n<evil<victim>@test.example>\n${body}`],
      ["TAB in a recipient", `sender@test.example\n"x"@test.example\tvictim\n${body}`],
      ["DEL in a sender", `evil\x7fvictim@test.example\nuser@test.example\n${body}`],
    ];
    const ids = bad.map(([, content]) => r.drop(Buffer.from(content, "latin1")));
    const good = r.drop(queueFile("sender@test.example", ['"quoted local"@test.example'], testMessage(201)));
    const s = await r.flush();
    t.equal(s.corrupt, bad.length, `every bad file is corrupt (${s.corrupt} of ${bad.length})`);
    t.same(r.files("corrupt").sort(), ids.slice().sort(), "all of them in corrupt/");
    t.notOk(r.files("corrupt").includes(good), "the control message is not corrupt");
    t.equal(r.errors.filter((e) => e.code === "ECORRUPT").length, bad.length, "an ECORRUPT error event for each");
    const commands = r.server.sessions.flatMap((x) => x.commands);
    t.same(commands.filter((c) => /victim|evil/i.test(c)), [], "no MAIL or RCPT with the injected text");
    t.same(commands.filter((c) => /[\0\r\x7f]/.test(c)), [], "no control byte in any command");
    t.equal(r.server.messages.length, 1, "only the control message arrived");
    t.same(r.server.messages[0]?.to, ['"quoted local"@test.example'], "a space inside quotes is fine");

    await t.test("engine.send() rejects such addresses with a MailError", async (t) => {
      const cases: Array<[string, { from: string; to: string | string[] }]> = [
        ["CRLF in from", { from: "evil@test.example\r\nRCPT TO:<victim@test.example>", to: "user@test.example" }],
        ["LF in from", { from: "evil@test.example\nRCPT TO:<victim@test.example>", to: "user@test.example" }],
        ["CR in from", { from: "evil@test.example\rX", to: "user@test.example" }],
        ["NUL in from", { from: "ev\0il@test.example", to: "user@test.example" }],
        ["CRLF in to", { from: "sender@test.example", to: "user@test.example\r\nRCPT TO:<victim@test.example>" }],
        ["LF in to", { from: "sender@test.example", to: ["user@test.example\nDATA"] }],
        ["NUL in to", { from: "sender@test.example", to: ["vic\0tim@test.example"] }],
        ["space in from", { from: "evil victim@test.example", to: "user@test.example" }],
        ["< in to", { from: "sender@test.example", to: ["evil<victim@test.example"] }],
        ["> in to", { from: "sender@test.example", to: ["evil>victim@test.example"] }],
        ["> in from", { from: "evil>victim@test.example", to: "user@test.example" }],
      ];
      const before = r.files("outgoing").length;
      for (const [what, m] of cases) {
        const err = await r.engine.send({ ...m, subject: "x", text: "x" }).then(() => null, (e: unknown) => e);
        t.ok(err instanceof MailError, `${what}: rejected with a MailError (${err instanceof Error ? err.message : String(err)})`);
      }
      t.equal(r.files("outgoing").length, before, "nothing was queued");
    });
  });
});
