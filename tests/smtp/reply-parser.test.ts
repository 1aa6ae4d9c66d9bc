// Unit tests of smtp-codes.ts's reply parser: whatever the packet boundaries, whatever the
// server sends (garbage, EOF mid-reply, overlong lines, too many lines), and the enhanced
// status code it takes from a reply.

import t from "tap";
import {
  CODE_GARBAGE, CODE_PREMATURE_EOF, MAX_REPLY_LINE, MAX_REPLY_LINES, ReplyParser, classify, makeReply, type Reply,
} from "../../smtp-codes.js";

const bytes = (s: string): Buffer => Buffer.from(s, "utf8");

/** Feeds each chunk in order to a fresh parser (or the one given); returns every reply. */
function feed(chunks: Array<string | Buffer>, parser = new ReplyParser()): Reply[] {
  const out: Reply[] = [];
  for (const c of chunks) out.push(...parser.push(typeof c === "string" ? bytes(c) : c));
  return out;
}

/** The reply we expect, written out by hand (not through makeReply). */
const R = (code: number, lines: string[], enhanced: string | null = null): Reply => ({ code, enhanced, lines });

t.test("ReplyParser: single-line reply", async (t) => {
  const p = new ReplyParser();
  t.same(p.push(bytes("220 mx.example.org ESMTP ready\r\n")), [R(220, ["mx.example.org ESMTP ready"])]);
  t.equal(p.midReply, false, "nothing pending after a complete reply");
  t.same(p.push(bytes("250 2.0.0 Ok: queued as 4F2\r\n")), [R(250, ["2.0.0 Ok: queued as 4F2"], "2.0.0")]);
  t.equal(p.end(), null, "EOF at a reply boundary is not an error");
});

t.test("ReplyParser: multi-line reply", async (t) => {
  const p = new ReplyParser();
  t.same(p.push(bytes("250-mx.example.org\r\n")), [], "a continuation line completes nothing");
  t.equal(p.midReply, true);
  t.same(p.push(bytes("250-PIPELINING\r\n250-SIZE 1000\r\n")), []);
  t.same(p.push(bytes("250 8BITMIME\r\n")), [R(250, ["mx.example.org", "PIPELINING", "SIZE 1000", "8BITMIME"])]);
  t.equal(p.midReply, false);
  t.same(feed(["250-a\r\n250 b\r\n"]), [R(250, ["a", "b"])]);
  t.same(feed(["250-\r\n250 \r\n"]), [R(250, ["", ""])], "empty texts after the separator");
});

t.test("ReplyParser: a bare code is a reply", async (t) => {
  t.same(feed(["250\r\n"]), [R(250, [""])]);
  t.same(feed(["250\n"]), [R(250, [""])]);
  t.same(feed(["250-first\r\n250\r\n"]), [R(250, ["first", ""])], "bare code ends a multi-line reply");
  t.same(feed(["354\r\n221\r\n"]), [R(354, [""]), R(221, [""])]);
});

t.test("ReplyParser: LF-only line ends", async (t) => {
  t.same(feed(["220 hi\n250-a\n250 b\n550 5.1.1 no\n"]), [
    R(220, ["hi"]),
    R(250, ["a", "b"]),
    R(550, ["5.1.1 no"], "5.1.1"),
  ]);
  t.same(feed(["250-a\r\n250 b\n"]), [R(250, ["a", "b"])], "mixed CRLF and LF in one reply");
});

t.test("ReplyParser: several replies in one push, in order", async (t) => {
  const replies = feed(["250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <x@y>: unknown\r\n354 End data with <CR><LF>.<CR><LF>\r\n"]);
  t.same(replies.map((r) => r.code), [250, 250, 550, 354]);
  t.same(replies.map((r) => r.enhanced), ["2.1.0", "2.1.5", "5.1.1", null]);
  t.same(replies[2].lines, ["5.1.1 <x@y>: unknown"]);
  t.same(replies[3].lines, ["End data with <CR><LF>.<CR><LF>"]);
});

/** A transcript with every shape at once: CRLF and LF, multi-line, bare code, UTF-8 text. */
const TRANSCRIPT =
  "220 mx.example.org ESMTP\r\n" +
  "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE\r\n250 8BITMIME\r\n" +
  "550 5.1.1 <x@y>: unknown\r\n" +
  "354 go ahead\n" +
  "250\r\n" +
  "250 2.0.0 Ok \u2713 caf\u00e9\r\n" +
  "451-4.3.0 one\n451 4.3.0 two\r\n";
const TRANSCRIPT_REPLIES: Reply[] = [
  R(220, ["mx.example.org ESMTP"]),
  R(250, ["mx.example.org", "PIPELINING", "SIZE", "8BITMIME"]),
  R(550, ["5.1.1 <x@y>: unknown"], "5.1.1"),
  R(354, ["go ahead"]),
  R(250, [""]),
  R(250, ["2.0.0 Ok \u2713 caf\u00e9"], "2.0.0"),
  R(451, ["4.3.0 one", "4.3.0 two"], "4.3.0"),
];

t.test("ReplyParser: the whole transcript in one push", async (t) => {
  const p = new ReplyParser();
  t.same(feed([bytes(TRANSCRIPT)], p), TRANSCRIPT_REPLIES);
  t.equal(p.end(), null);
});

t.test("ReplyParser: split at every byte position across two pushes", async (t) => {
  const all = bytes(TRANSCRIPT);
  const bad: Array<{ split: number; got: Reply[]; end: Reply | null }> = [];
  for (let i = 0; i <= all.length; i++) {
    const p = new ReplyParser();
    const got = feed([all.subarray(0, i), all.subarray(i)], p);
    const end = p.end();
    if (JSON.stringify(got) !== JSON.stringify(TRANSCRIPT_REPLIES) || end !== null) bad.push({ split: i, got, end });
  }
  t.same(bad, [], `all ${all.length + 1} splits give the same replies`);
});

t.test("ReplyParser: split at every pair of positions (three pushes)", async (t) => {
  const all = bytes("250-a\r\n250 b\r\n550 5.1.1 x\n");
  const want = [R(250, ["a", "b"]), R(550, ["5.1.1 x"], "5.1.1")];
  let bad = 0;
  for (let i = 0; i <= all.length; i++) {
    for (let j = i; j <= all.length; j++) {
      const got = feed([all.subarray(0, i), all.subarray(i, j), all.subarray(j)]);
      if (JSON.stringify(got) !== JSON.stringify(want)) bad++;
    }
  }
  t.equal(bad, 0);
});

t.test("ReplyParser: fed byte by byte (a copy is kept, not the caller's buffer)", async (t) => {
  const all = bytes(TRANSCRIPT);
  const p = new ReplyParser();
  const got: Reply[] = [];
  const scratch = Buffer.alloc(1);
  for (const b of all) {
    scratch[0] = b; // the same buffer every time, as a socket that reuses its buffer
    got.push(...p.push(scratch));
  }
  t.same(got, TRANSCRIPT_REPLIES);
  t.equal(p.end(), null);
  // Empty pushes are harmless.
  t.same(feed(["", "250 ok", "", "\r", "", "\n", ""]), [R(250, ["ok"])]);
});

t.test("ReplyParser: garbage gives 600 and the parser refuses further input", async (t) => {
  const cases: Array<[string, string[]]> = [
    ["plain words", ["hello\r\n"]],
    ["too short", ["25\r\n"]],
    ["four digits", ["2500 x\r\n"]],
    ["bad separator", ["250x\r\n"]],
    ["empty line", ["\r\n"]],
    ["1xx is not a reply", ["199 x\r\n"]],
    ["6xx is not a reply", ["650 x\r\n"]],
    ["mismatched codes in a multi-line reply", ["250-a\r\n", "251 b\r\n"]],
    ["mismatched codes in one push", ["250-a\r\n550 b\r\n"]],
    ["leading space", [" 250 ok\r\n"]],
  ];
  for (const [name, chunks] of cases) {
    const p = new ReplyParser();
    const got = feed(chunks, p);
    t.equal(got.length, 1, `${name}: one reply`);
    t.equal(got[0]?.code, CODE_GARBAGE, `${name}: code 600`);
    t.equal(got[0]?.enhanced, null, `${name}: no enhanced code`);
    t.equal(classify(got[0]), "protocol", `${name}: a protocol error`);
    t.same(p.push(bytes("250 ok\r\n")), [], `${name}: further input refused`);
    t.equal(p.end(), null, `${name}: no 621 after a 600`);
  }
  const p = new ReplyParser();
  const got = feed(["250 ok\r\nhello\r\n250 more\r\n"], p);
  t.same(got.map((r) => r.code), [250, CODE_GARBAGE], "replies before the garbage are kept, none after");
  t.same(p.push(bytes("250 again\r\n")), []);
});

t.test("ReplyParser: EOF mid-reply gives 621 with the partial lines", async (t) => {
  {
    const p = new ReplyParser();
    t.same(feed(["250-a\r\n250-b\r\n250 c"], p), []);
    t.equal(p.midReply, true);
    const eof = p.end();
    t.ok(eof, "a reply");
    t.equal(eof?.code, CODE_PREMATURE_EOF);
    t.equal(classify(eof!), "protocol");
    t.ok(eof!.lines.includes("a") && eof!.lines.includes("b"), "complete lines kept");
    t.match(eof!.lines[eof!.lines.length - 1], /c/, "the unfinished line kept");
    t.same(p.push(bytes("250 ok\r\n")), [], "nothing after EOF");
    t.equal(p.end(), null, "only one 621");
  }
  {
    const p = new ReplyParser();
    t.same(feed(["250-only a continuation\r\n"], p), []);
    const eof = p.end();
    t.equal(eof?.code, CODE_PREMATURE_EOF, "EOF after a continuation line");
    t.ok(eof?.lines.includes("only a continuation"));
  }
  {
    const p = new ReplyParser();
    feed(["25"], p);
    t.equal(p.end()?.code, CODE_PREMATURE_EOF, "EOF inside the code");
  }
  {
    const p = new ReplyParser();
    feed(["250 ok\r\n220 partial\r"], p);
    t.equal(p.end()?.code, CODE_PREMATURE_EOF, "EOF between CR and LF");
  }
  {
    const p = new ReplyParser();
    t.equal(p.end(), null, "fresh parser: clean boundary");
    const q = new ReplyParser();
    feed(["250-a\r\n250 b\r\n"], q);
    t.equal(q.end(), null, "after a complete multi-line reply: clean boundary");
  }
});

t.test("ReplyParser: line over MAX_REPLY_LINE in one push", async (t) => {
  const p = new ReplyParser();
  const got = p.push(bytes(`250 ${"x".repeat(MAX_REPLY_LINE + 10)}\r\n250 ok\r\n`));
  t.same(got.map((r) => r.code), [CODE_GARBAGE]);
  t.same(p.push(bytes("250 ok\r\n")), []);
  // Without any line end at all: the whole lot in one push.
  const q = new ReplyParser();
  t.same(q.push(Buffer.alloc(10 * MAX_REPLY_LINE, 0x78)).map((r) => r.code), [CODE_GARBAGE]);
  // A long line inside a multi-line reply.
  const r = new ReplyParser();
  t.same(feed(["250-ok\r\n", `250-${"y".repeat(MAX_REPLY_LINE * 2)}\r\n250 end\r\n`], r).map((x) => x.code), [CODE_GARBAGE]);
});

t.test("ReplyParser: a long line accumulated over many small pushes fails without hoarding", async (t) => {
  for (const size of [1, 7, 100, 1000]) {
    const p = new ReplyParser();
    const piece = Buffer.alloc(size, 0x78);
    p.push(bytes("250 "));
    let pushed = 4;
    let failedAt = -1;
    while (pushed < 20 * MAX_REPLY_LINE) {
      const got = p.push(piece);
      pushed += size;
      if (got.length > 0) {
        t.same(got.map((r) => r.code), [CODE_GARBAGE], `pieces of ${size}: a 600`);
        failedAt = pushed;
        break;
      }
    }
    t.ok(failedAt > MAX_REPLY_LINE, `pieces of ${size}: not before the limit (${failedAt})`);
    t.ok(failedAt <= MAX_REPLY_LINE + size, `pieces of ${size}: as soon as the pending line passes the limit (${failedAt})`);
    t.same(p.push(bytes("\r\n250 ok\r\n")), [], "input refused after the 600");
    t.equal(p.end(), null);
  }
});

t.test("ReplyParser: the limit does not depend on the line end", async (t) => {
  // A line of exactly MAX_REPLY_LINE octets is not over the limit; one more octet is.
  for (const [len, ok] of [[MAX_REPLY_LINE - 1, true], [MAX_REPLY_LINE, true], [MAX_REPLY_LINE + 1, false]] as const) {
    const line = `250 ${"z".repeat(len - 4)}`;
    for (const eol of ["\n", "\r\n"]) {
      const got = feed([line + eol]);
      t.equal(got[0]?.code, ok ? 250 : CODE_GARBAGE, `line of ${len} octets ending ${JSON.stringify(eol)}`);
    }
  }
});

t.test("ReplyParser: more than MAX_REPLY_LINES lines gives 600", async (t) => {
  {
    const text = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 last\r\n";
    const got = feed([text]);
    t.equal(got.length, 1);
    t.equal(got[0].code, 250, `${MAX_REPLY_LINES} lines are accepted`);
    t.equal(got[0].lines.length, MAX_REPLY_LINES);
  }
  {
    const text = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 last\r\n";
    t.same(feed([text]).map((r) => r.code), [CODE_GARBAGE], `${MAX_REPLY_LINES + 1} lines are not`);
  }
  {
    // An endless stream of continuation lines, line by line: the 600 comes as soon as
    // the reply passes the limit, not at the end of the flood.
    const p = new ReplyParser();
    let failedAt = -1;
    for (let i = 1; i <= 5 * MAX_REPLY_LINES; i++) {
      const got = p.push(bytes("250-more\r\n"));
      if (got.length > 0) {
        t.same(got.map((r) => r.code), [CODE_GARBAGE]);
        failedAt = i;
        break;
      }
    }
    t.equal(failedAt, MAX_REPLY_LINES + 1, "fails at the first line past the limit");
    t.same(p.push(bytes("250 end\r\n")), []);
  }
});

t.test("enhanced status code: only when its class matches the code", async (t) => {
  const one = (s: string) => feed([s])[0];
  t.equal(one("550 5.1.1 user unknown\r\n").enhanced, "5.1.1");
  t.equal(one("452 4.5.3 too many recipients\r\n").enhanced, "4.5.3");
  t.equal(one("250 2.0.0\r\n").enhanced, "2.0.0", "enhanced code alone on the line");
  t.equal(one("250 5.1.1 odd\r\n").enhanced, null, "class 5 on a 250");
  t.equal(one("550 2.0.0 odd\r\n").enhanced, null, "class 2 on a 550");
  t.equal(one("450 5.7.1 odd\r\n").enhanced, null, "class 5 on a 450");
  t.equal(one("354 3.0.0 go\r\n").enhanced, null, "there is no class 3");
  t.equal(one("550 5.1.1x\r\n").enhanced, null, "must be followed by space or end");
  t.equal(one("550 5.1234.1 x\r\n").enhanced, null, "at most three digits");
  t.equal(one("550 user 5.1.1\r\n").enhanced, null, "only at the start of the text");
  t.equal(one("550-5.1.1 first\r\n550 5.1.1 second\r\n").enhanced, "5.1.1", "from the first line of a multi-line reply");
  t.equal(one("550-first\r\n550 5.1.1 second\r\n").enhanced, null, "not from a later line");
  t.equal(makeReply(421, ["4.4.2 timeout"]).enhanced, "4.4.2");
  t.equal(makeReply(421, []).enhanced, null);
});
