// Unit tests of smtp-codes.ts's tables and functions: the reply classification, the
// command/reply table, DSN status, reply text and the EHLO extension parser.

import t from "tap";
import {
  CODE_GARBAGE, CODE_PREMATURE_EOF, COMMAND_REPLIES, ReplyParser, classify, dsnStatus, expectedReply, makeReply, parseEhlo, replyText, type Reply,
} from "../../smtp-codes.js";

/** The first reply a fresh parser makes of this text. */
const parse = (text: string): Reply => new ReplyParser().push(Buffer.from(text, "utf8"))[0];

t.test("classify", async (t) => {
  const c = (code: number) => classify(makeReply(code, ["x"]));
  t.equal(c(220), "ok");
  t.equal(c(250), "ok");
  t.equal(c(354), "ok");
  t.equal(c(334), "ok");
  t.equal(c(421), "temporary");
  t.equal(c(450), "temporary");
  t.equal(c(500), "permanent");
  t.equal(c(554), "permanent");
  t.equal(c(CODE_GARBAGE), "protocol");
  t.equal(c(CODE_PREMATURE_EOF), "protocol");
  t.equal(c(199), "protocol");
});

t.test("expectedReply", async (t) => {
  const e = (cmd: string, code: number) => expectedReply(cmd, makeReply(code, ["x"]));
  t.equal(e("RCPT", 250), true);
  t.equal(e("RCPT", 251), true, "251 to RCPT is expected");
  t.equal(e("RCPT", 354), false, "354 to RCPT is a protocol error");
  t.equal(e("RCPT", 252), false);
  t.equal(e("RCPT", 220), false);
  t.equal(e("DATA", 354), true);
  t.equal(e("DATA", 250), false, "DATA never succeeds at once");
  t.equal(e("DOT", 250), true);
  t.equal(e("DOT", 354), false);
  t.equal(e("MAIL", 250), true);
  t.equal(e("MAIL", 251), false);
  t.equal(e("CONNECT", 220), true);
  t.equal(e("CONNECT", 250), false);
  t.equal(e("EHLO", 250), true);
  t.equal(e("QUIT", 221), true);
  t.equal(e("QUIT", 250), false);
  t.equal(e("STARTTLS", 220), true);
  t.equal(e("AUTH", 334), true);
  t.equal(e("AUTH", 235), true);
  t.equal(e("AUTH", 250), false);
  t.equal(e("VRFY", 252), true);
  t.equal(e("HELP", 214), true);
  for (const cmd of Object.keys(COMMAND_REPLIES)) {
    for (const code of [400, 421, 450, 451, 452, 454, 499, 500, 501, 502, 503, 550, 552, 554, 599]) {
      if (!e(cmd, code)) t.fail(`${code} to ${cmd} should be expected (negative replies always are)`);
    }
    t.equal(e(cmd, CODE_GARBAGE), false, `600 to ${cmd} is not expected`);
    t.equal(e(cmd, CODE_PREMATURE_EOF), false, `621 to ${cmd} is not expected`);
  }
  t.equal(e("XYZZY", 250), true, "unknown command: any 2xx");
  t.equal(e("XYZZY", 354), false, "unknown command: not 3xx");
  t.equal(e("XYZZY", 550), true, "unknown command: negative replies");
});

t.test("dsnStatus", async (t) => {
  t.equal(dsnStatus(makeReply(550, ["5.1.1 unknown"])), "5.1.1");
  t.equal(dsnStatus(makeReply(451, ["4.3.0 later"])), "4.3.0");
  t.equal(dsnStatus(makeReply(250, ["ok"])), "2.0.0");
  t.equal(dsnStatus(makeReply(550, ["no"])), "5.0.0");
  t.equal(dsnStatus(makeReply(450, ["later"])), "4.0.0");
  t.equal(dsnStatus(makeReply(421, [""])), "4.0.0");
  t.equal(dsnStatus(makeReply(250, ["5.1.1 odd"])), "2.0.0", "a mismatched enhanced code is not used");
  t.match(dsnStatus(makeReply(CODE_GARBAGE, ["junk"])), /^[245]\.\d{1,3}\.\d{1,3}$/, "a 600 still has a DSN status");
  t.match(dsnStatus(makeReply(CODE_PREMATURE_EOF, ["eof"])), /^[245]\.\d{1,3}\.\d{1,3}$/);
});

t.test("replyText", async (t) => {
  t.equal(replyText(makeReply(250, ["2.0.0 Ok: queued as X"])), "250 2.0.0 Ok: queued as X");
  t.equal(replyText(makeReply(550, ["5.1.1 one", "5.1.1 two"])), "550 5.1.1 one 5.1.1 two", "lines joined by spaces");
  t.equal(replyText(makeReply(250, [""])), "250", "bare code");
  t.equal(replyText(makeReply(CODE_GARBAGE, ["Improperly-formatted smtp reply: x"])), "Improperly-formatted smtp reply: x", "no pseudo-code");
  t.equal(replyText(parse("250-a\r\n250 b\r\n")), "250 a b");
});

t.test("parseEhlo", async (t) => {
  const ehlo = (s: string) => parseEhlo(parse(s));
  const full = ehlo(
    "250-mx.example.org Hello client.example [192.0.2.1]\r\n" +
      "250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n" +
      "250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n",
  );
  t.same(full, {
    pipelining: true, size: 10240000, eightBitMime: true, smtpUtf8: true, startTls: true,
    dsn: true, enhancedStatusCodes: true, chunking: true, auth: ["PLAIN", "LOGIN"],
  });

  const bare = ehlo("250 mx.example.org\r\n");
  t.same(bare, {
    pipelining: false, size: null, eightBitMime: false, smtpUtf8: false, startTls: false,
    dsn: false, enhancedStatusCodes: false, chunking: false, auth: [],
  }, "greeting only: nothing offered");

  t.equal(ehlo("250-mx\r\n250 SIZE\r\n").size, 0, "SIZE without a value: 0 (no limit announced)");
  t.equal(ehlo("250-mx\r\n250 SIZE 0\r\n").size, 0);
  t.equal(ehlo("250-mx\r\n250 SIZE 52428800\r\n").size, 52428800);
  t.equal(ehlo("250-mx\r\n250 SIZE=1000\r\n").size, 1000, "old SIZE=n form");
  t.equal(ehlo("250-mx\r\n250 SIZE lots\r\n").size, 0, "a non-number is no limit, not NaN");
  t.equal(ehlo("250-mx\r\n250 PIPELINING\r\n").size, null, "no SIZE: null");

  const lower = ehlo("250-mx\r\n250-pipelining\r\n250-size 2048\r\n250-8bitmime\r\n250-Auth plain cram-md5\r\n250 starttls\r\n");
  t.equal(lower.pipelining, true, "case-insensitive PIPELINING");
  t.equal(lower.size, 2048, "case-insensitive SIZE");
  t.equal(lower.eightBitMime, true, "case-insensitive 8BITMIME");
  t.equal(lower.startTls, true);
  t.same(lower.auth, ["PLAIN", "CRAM-MD5"], "mechanisms upper-cased");

  t.same(ehlo("250-mx\r\n250 AUTH=LOGIN PLAIN\r\n").auth, ["LOGIN", "PLAIN"], "old AUTH= form");
  t.same(ehlo("250-mx\r\n250 AUTH\r\n").auth, [], "AUTH without mechanisms");

  const greet = ehlo("250-PIPELINING SIZE 1000 8BITMIME AUTH PLAIN\r\n250 DSN\r\n");
  t.equal(greet.pipelining, false, "the greeting line is not an extension");
  t.equal(greet.size, null);
  t.equal(greet.eightBitMime, false);
  t.same(greet.auth, []);
  t.equal(greet.dsn, true);
  t.equal(ehlo("250 PIPELINING\r\n").pipelining, false, "single-line reply: only the greeting");

  t.equal(ehlo("250-mx\r\n250-XFOO bar\r\n250-   PIPELINING  \r\n250 \r\n").pipelining, true, "spaces and unknown keywords tolerated");
});
