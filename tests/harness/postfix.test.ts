// Proves the test harness works: smtp-sink and a private Postfix instance both take a message
// from the raw client of tests/helpers/smtp-raw.ts, and Postfix delivers it into the instance's Maildir.
import t from "tap";
import net from "node:net";
import { randomBytes } from "node:crypto";
import {
  SMTP_SINK,
  freePort,
  requirePostfix,
  requireTool,
  startPostfix,
  startSmtpSink,
} from "../helpers/postfix.js";
import { RawClient } from "../helpers/smtp-raw.js";

interface Reply {
  code: number;
  lines: string[];
}

const WAIT_MS = 10000;

/** The next reply of the raw client, with its code. */
async function next(c: RawClient, command?: string): Promise<Reply> {
  const lines = command === undefined ? await c.reply(WAIT_MS) : await c.command(command, WAIT_MS);
  return { code: Number(lines[lines.length - 1].slice(0, 3)), lines };
}

/** The message dot-stuffed, with CRLF line ends, ended with <CRLF>.<CRLF>. */
function dataOf(message: string): string {
  const body = message.replace(/\r?\n/g, "\r\n").replace(/^\./gm, "..");
  return body + (body.endsWith("\r\n") ? "" : "\r\n") + ".\r\n";
}

/** One whole transaction; returns every reply so the test can assert each stage. */
async function sendOne(host: string, port: number, message: string) {
  const c = await RawClient.connect(port, host, WAIT_MS);
  try {
    const greeting = await next(c);
    const ehlo = await next(c, "EHLO client.test.example");
    const mail = await next(c, "MAIL FROM:<a@test.example>");
    const rcpt = await next(c, "RCPT TO:<b@test.example>");
    const data = await next(c, "DATA");
    c.write(dataOf(message));
    const dot = await next(c);
    const quit = await next(c, "QUIT");
    return { greeting, ehlo, mail, rcpt, data, dot, quit };
  } finally {
    c.destroy();
  }
}

function makeMessage() {
  const subject = `harness ${randomBytes(8).toString("hex")}`;
  const body = `Hello from the mudmail harness test ${randomBytes(8).toString("hex")}.\n.leading dot line\n`;
  const message =
    `From: <a@test.example>\nTo: <b@test.example>\nSubject: ${subject}\n` +
    `Message-ID: <${randomBytes(8).toString("hex")}@test.example>\n\n${body}`;
  return { subject, body, message };
}

t.test("freePort gives a bindable loopback port", async (t) => {
  const port = await freePort();
  t.ok(port > 0 && port < 65536, `port ${port}`);
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(port, "127.0.0.1", resolve);
  });
  await new Promise<void>((resolve) => srv.close(() => resolve()));
});

t.test("smtp-sink takes a message", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink();
  t.teardown(() => sink.stop());
  const { message } = makeMessage();
  const r = await sendOne(sink.host, sink.port, message);
  t.equal(r.greeting.code, 220, "greeting");
  t.equal(r.ehlo.code, 250, "EHLO");
  t.ok(r.ehlo.lines.some((l) => /^250[ -]PIPELINING/i.test(l)), "PIPELINING announced by default");
  t.equal(r.mail.code, 250, "MAIL");
  t.equal(r.rcpt.code, 250, "RCPT");
  t.equal(r.data.code, 354, "DATA");
  t.equal(r.dot.code, 250, "250 after the dot");
  t.equal(r.quit.code, 221, "QUIT");
});

t.test("smtp-sink without pipelining, with dumps", async (t) => {
  if (!requireTool(t, SMTP_SINK)) return;
  const sink = await startSmtpSink({ pipelining: false, dump: true });
  t.teardown(() => sink.stop());
  const { message, subject } = makeMessage();
  const r = await sendOne(sink.host, sink.port, message);
  t.notOk(r.ehlo.lines.some((l) => /PIPELINING/i.test(l)), "no PIPELINING with pipelining: false");
  t.equal(r.dot.code, 250, "250 after the dot");
  t.ok(sink.dumpDir, "dumpDir set");
  const { readdir, readFile } = await import("node:fs/promises");
  const deadline = Date.now() + 5000;
  let files: string[] = [];
  while (Date.now() < deadline) {
    files = await readdir(sink.dumpDir!);
    if (files.length) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  t.equal(files.length, 1, "one dump file");
  const dumped = await readFile(`${sink.dumpDir}/${files[0]}`, "latin1");
  t.match(dumped, `Subject: ${subject}`, "dump has the Subject");
});

t.test("private Postfix delivers into its Maildir", async (t) => {
  if (!requirePostfix(t)) return;
  const pf = await startPostfix();
  t.teardown(() => pf.stop());
  t.comment(`startPostfix took ${pf.startMs} ms (port ${pf.port})`);
  t.equal(pf.domain, "test.example");
  const { message, subject, body } = makeMessage();
  const r = await sendOne(pf.host, pf.port, message);
  t.equal(r.greeting.code, 220, "greeting");
  t.equal(r.ehlo.code, 250, "EHLO");
  t.equal(r.mail.code, 250, "MAIL");
  t.equal(r.rcpt.code, 250, `RCPT: ${r.rcpt.lines.join(" ")}`);
  t.equal(r.data.code, 354, "DATA");
  t.equal(r.dot.code, 250, `250 after the dot: ${r.dot.lines.join(" ")}`);
  t.equal(r.quit.code, 221, "QUIT");
  const msgs = await pf.waitForMessages(1, 20000);
  t.equal(msgs.length, 1, "one message delivered");
  const text = msgs[0].toString("latin1");
  t.match(text, `Subject: ${subject}`, "Subject delivered");
  t.match(text, body.split("\n")[0], "body delivered");
  t.match(text, "\n.leading dot line\n", "dot-stuffing undone");
  t.match(text, /^Delivered-To: b@test\.example$/m, "virtual transport delivered it");
});

t.test("two private Postfix instances at once, with another domain", async (t) => {
  if (!requirePostfix(t)) return;
  const [a, b] = await Promise.all([startPostfix(), startPostfix({ domain: "other.example" })]);
  t.teardown(() => Promise.all([a.stop(), b.stop()]).then(() => {}));
  t.not(a.port, b.port, "different ports");
  t.not(a.maildir, b.maildir, "different maildirs");
  const c = await RawClient.connect(b.port, b.host, WAIT_MS);
  t.teardown(() => c.destroy());
  t.equal((await next(c)).code, 220);
  t.equal((await next(c, "EHLO client.test.example")).code, 250);
  t.equal((await next(c, "MAIL FROM:<a@test.example>")).code, 250);
  t.equal((await next(c, "RCPT TO:<x@other.example>")).code, 250, "its own domain accepted");
  t.equal((await next(c, "DATA")).code, 354);
  c.write(dataOf("Subject: to other\n\nhi\n"));
  t.equal((await next(c)).code, 250);
  t.equal((await next(c, "QUIT")).code, 221);
  const got = await b.waitForMessages(1, 20000);
  t.match(got[0].toString("latin1"), /^Delivered-To: x@other\.example$/m, "delivered by instance b");
  t.same(await a.readMessages(), [], "instance a got nothing");
});
