// Proves the test harness works: smtp-sink and a private Postfix instance both take a message
// from a tiny inline SMTP client, and Postfix delivers it into the instance's Maildir.
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
} from "./helpers/postfix.js";

interface Reply {
  code: number;
  lines: string[];
}

/** Minimal line-oriented SMTP client: every wait is bounded by `timeoutMs`. */
async function smtpClient(host: string, port: number, timeoutMs = 10000) {
  const sock = net.connect({ host, port });
  sock.setNoDelay(true);
  sock.setEncoding("latin1");
  let buf = "";
  let closed: Error | undefined;
  let wake: (() => void) | undefined;
  sock.on("data", (d: string) => {
    buf += d;
    wake?.();
  });
  sock.on("error", (e) => {
    closed = e;
    wake?.();
  });
  sock.on("close", () => {
    closed ??= new Error("connection closed");
    wake?.();
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`connect ${host}:${port} timed out`)), timeoutMs);
    sock.once("connect", () => {
      clearTimeout(timer);
      resolve();
    });
    sock.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });

  async function read(): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    const lines: string[] = [];
    for (;;) {
      const i = buf.indexOf("\r\n");
      if (i >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        lines.push(line);
        if (/^\d{3}( |$)/.test(line)) return { code: Number(line.slice(0, 3)), lines };
        if (!/^\d{3}-/.test(line)) throw new Error(`bad SMTP reply line: ${JSON.stringify(line)}`);
        continue;
      }
      if (closed) throw new Error(`no reply: ${closed.message}; got ${JSON.stringify(lines)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`SMTP reply timed out after ${timeoutMs} ms; got ${JSON.stringify(lines)}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        wake = () => {
          clearTimeout(timer);
          wake = undefined;
          resolve();
        };
      });
    }
  }
  async function cmd(line: string): Promise<Reply> {
    sock.write(line + "\r\n");
    return read();
  }
  return {
    read,
    cmd,
    async data(message: string): Promise<Reply> {
      // dot-stuff, CRLF line ends, end with <CRLF>.<CRLF>
      const body = message.replace(/\r?\n/g, "\r\n").replace(/^\./gm, "..");
      sock.write(body + (body.endsWith("\r\n") ? "" : "\r\n") + ".\r\n");
      return read();
    },
    close() {
      sock.destroy();
    },
  };
}

/** One whole transaction; returns every reply so the test can assert each stage. */
async function sendOne(host: string, port: number, message: string) {
  const c = await smtpClient(host, port);
  try {
    const greeting = await c.read();
    const ehlo = await c.cmd("EHLO client.test.example");
    const mail = await c.cmd("MAIL FROM:<a@test.example>");
    const rcpt = await c.cmd("RCPT TO:<b@test.example>");
    const data = await c.cmd("DATA");
    const dot = await c.data(message);
    const quit = await c.cmd("QUIT");
    return { greeting, ehlo, mail, rcpt, data, dot, quit };
  } finally {
    c.close();
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
  const c = await smtpClient(b.host, b.port);
  t.teardown(() => c.close());
  t.equal((await c.read()).code, 220);
  t.equal((await c.cmd("EHLO client.test.example")).code, 250);
  t.equal((await c.cmd("MAIL FROM:<a@test.example>")).code, 250);
  t.equal((await c.cmd("RCPT TO:<x@other.example>")).code, 250, "its own domain accepted");
  t.equal((await c.cmd("DATA")).code, 354);
  t.equal((await c.data("Subject: to other\n\nhi\n")).code, 250);
  t.equal((await c.cmd("QUIT")).code, 221);
  const got = await b.waitForMessages(1, 20000);
  t.match(got[0].toString("latin1"), /^Delivered-To: x@other\.example$/m, "delivered by instance b");
  t.same(await a.readMessages(), [], "instance a got nothing");
});
