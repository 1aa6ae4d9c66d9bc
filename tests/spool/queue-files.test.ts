// Unit tests of queue.ts's queue-file parser: files that parse, files larger than CHUNK,
// corrupt files and their reasons, a missing file (a file-system error), addressProblem and
// splitRecipients.

import t from "tap";
import { CHUNK, WHOLE, CorruptMessageError, Spool, addressProblem, splitRecipients, type QueuedMessage } from "../../queue.js";
import { latin1, tempSpool, collect, prng } from "../helpers/queue-units.js";

/* ------------------------------------------------------------------------------------ */
/* Queue-file parsing                                                                    */

/** Drops a file into outgoing/ and opens it there. */
async function parse(spool: Spool, content: string | Buffer): Promise<QueuedMessage> {
  const id = await spool.create(content);
  return spool.open(id, "outgoing");
}

t.test("queue files that parse", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const body = "Subject: hi\n\nbody\n";

  const lf = await parse(spool, "a@b.org\nr@x.org\n" + body);
  t.equal(lf.sender, "a@b.org");
  t.same(lf.recipients, ["r@x.org"]);
  t.equal(lf.head.toString(), body);
  t.equal(lf.size, body.length);
  t.equal(lf.contentOffset, "a@b.org\nr@x.org\n".length);
  t.equal(lf.whole, true);
  t.equal(lf.folder, "outgoing");
  t.equal(lf.arrival, Number(lf.id.split(".")[0]) * 1000, "arrival from the id's seconds");
  t.equal((await collect(spool.content(lf))).toString(), body);

  const cases: Array<[string, string, string, string[], string?]> = [
    ["CRLF line ends", "a@b.org\r\nr@x.org\r\nSubject: hi\r\n\r\nbody\r\n", "a@b.org", ["r@x.org"], "Subject: hi\r\n\r\nbody\r\n"],
    ["CRLF, two recipients", "<a@b.org>\r\nr1@x.org, r2@x.org\r\n\r\nbody\r\n", "a@b.org", ["r1@x.org", "r2@x.org"], "\r\nbody\r\n"],
    ["LF sender line, CRLF recipient line", "a@b.org\nr@x.org\r\nbody\r\n", "a@b.org", ["r@x.org"], "body\r\n"],
    ["CRLF, null sender", "\r\nr@x.org\r\nbody\r\n", "", ["r@x.org"], "body\r\n"],
    ["angle brackets", "<a@b.org>\n<r@x.org>\n" + body, "a@b.org", ["r@x.org"], body],
    ["null sender, empty line", "\nr@x.org\n" + body, "", ["r@x.org"], body],
    ["null sender <>", "<>\nr@x.org\n" + body, "", ["r@x.org"], body],
    ["sender with spaces around", "  a@b.org \nr@x.org\n" + body, "a@b.org", ["r@x.org"], body],
    ["commas, spaces and tabs", "a@b.org\nr1@x.org,r2@x.org  r3@x.org\t r4@x.org ,<r5@x.org>,, \t\n" + body, "a@b.org",
      ["r1@x.org", "r2@x.org", "r3@x.org", "r4@x.org", "r5@x.org"], body],
    ["quoted local part with a space", 'a@b.org\n"john doe"@example.org, r@x.org\n' + body, "a@b.org", ['"john doe"@example.org', "r@x.org"], body],
    ["quoted local part with comma and escaped quote", 'a@b.org\n"a,b \\" c"@x.org\n' + body, "a@b.org", ['"a,b \\" c"@x.org'], body],
    ["duplicates dropped", "a@b.org\nr@x.org, <r@x.org> r@x.org s@x.org r@x.org\n" + body, "a@b.org", ["r@x.org", "s@x.org"], body],
    ["address literal", "a@b.org\nuser@[127.0.0.1]\n" + body, "a@b.org", ["user@[127.0.0.1]"], body],
    ["IPv6 literal", "a@b.org\n<user@[IPv6:2001:db8::1]>\n" + body, "a@b.org", ["user@[IPv6:2001:db8::1]"], body],
    ["no message lines, no newline", "a@b.org\nr@x.org", "a@b.org", ["r@x.org"], ""],
    ["no message lines", "a@b.org\nr@x.org\n", "a@b.org", ["r@x.org"], ""],
    ["UTF-8 addresses", "a@b.org\nj\u00f6rg@b\u00fccher.example\n" + body, "a@b.org", ["j\u00f6rg@b\u00fccher.example"], body],
    ["special atom characters", "a@b.org\nfirst.last+tag!#$%&'*/=?^_`{|}~-@sub-domain.x.org\n" + body, "a@b.org",
      ["first.last+tag!#$%&'*/=?^_`{|}~-@sub-domain.x.org"], body],
  ];
  for (const [name, content, sender, recipients, head] of cases) {
    try {
      const msg = await parse(spool, content);
      t.equal(msg.sender, sender, `${name}: sender`);
      t.same(msg.recipients, recipients, `${name}: recipients`);
      t.equal(msg.head.toString(), head, `${name}: message lines`);
      t.equal(msg.size, Buffer.byteLength(head ?? ""), `${name}: size`);
      t.equal(msg.whole, true, `${name}: whole`);
      t.equal((await collect(spool.content(msg))).toString(), head, `${name}: content()`);
    } catch (err) {
      t.fail(`${name}: rejected: ${(err as Error).message}`);
    }
  }
});

t.test("queue files larger than CHUNK, and than WHOLE", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const rnd = prng(3);
  const make = (n: number) => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(rnd() * 256);
    return b;
  };
  const env = latin1("a@b.org\nr@x.org\n");
  for (const total of [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, WHOLE - 1, WHOLE, WHOLE + 1, 5 * CHUNK + 77]) {
    const content = make(total - env.length);
    const msg = await parse(spool, Buffer.concat([env, content]));
    t.equal(msg.size, content.length, `file of ${total}: size`);
    t.equal(msg.whole, total <= WHOLE, `file of ${total}: whole ${total <= WHOLE}`);
    t.ok(content.subarray(0, msg.head.length).equals(msg.head), `file of ${total}: head is the start of the content`);
    t.ok((await collect(spool.content(msg))).equals(content), `file of ${total}: content() yields the exact bytes`);
  }
  // An envelope that does not fit in the first read.
  const many = Array.from({ length: 9000 }, (_, i) => `r${i}@x.org`);
  const content = make(3 * CHUNK);
  const msg = await parse(spool, Buffer.concat([latin1(`a@b.org\n${many.join(", ")}\n`), content]));
  t.equal(msg.recipients.length, 9000, "a recipient line longer than CHUNK");
  t.same(msg.recipients.slice(-2), ["r8998@x.org", "r8999@x.org"]);
  t.equal(msg.size, content.length);
  t.ok((await collect(spool.content(msg))).equals(content), "content() after a long envelope");
});

t.test("queue files that are corrupt", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  const body = "\nSubject: x\n\nbody\n";
  const cases: Array<[string, string | Buffer, RegExp]> = [
    ["empty file", "", /empty/],
    ["only a sender line", "a@b.org\n", /recipient/],
    ["only a sender, no newline", "a@b.org", /recipient/],
    ["empty recipient line", "a@b.org\n\nSubject: x\n\nbody\n", /no recipients/],
    ["recipient line of separators", "a@b.org\n , ,\t\nbody\n", /no recipients/],
    ["recipient without @", "a@b.org\nnobody" + body, /bad recipient "nobody".*addr@domain/],
    ["recipient with \\x01", "a@b.org\nr\x01@x.org" + body, /bad recipient.*control/],
    ["recipient with CR inside", "a@b.org\nr\rx@x.org" + body, /bad recipient.*control/],
    ["recipient with NUL", "a@b.org\nr\0@x.org" + body, /bad recipient.*control/],
    ["recipient with DEL", "a@b.org\nr\x7f@x.org" + body, /bad recipient.*control/],
    ["sender with a control character", "a\x01@b.org\nr@x.org" + body, /bad sender.*control/],
    ["space in an unquoted local part (sender)", "john doe@b.org\nr@x.org" + body, /bad sender.*" " not allowed/],
    ["space in an unquoted local part (recipient in <>)", "a@b.org\n<john doe@x.org>" + body, /bad recipient.*" " not allowed/],
    ["space in an unquoted local part (recipient)", "a@b.org\njohn doe@x.org" + body, /bad recipient "john"/],
    ["< inside an address", "a@b.org\na<b@x.org" + body, /unbalanced/],
    ["> inside an address", "a@b.org\na>b@x.org" + body, /bad recipient.*">" not allowed/],
    ["< inside an address in <>", "a@b.org\n<a<b@x.org>" + body, /bad recipient.*"<" not allowed/],
    ["unbalanced < in the sender", "<a@b.org\nr@x.org" + body, /bad sender.*unbalanced angle/],
    ["unbalanced > in the sender", "a@b.org>\nr@x.org" + body, /bad sender.*unbalanced angle/],
    ["unbalanced quotes (recipient)", 'a@b.org\n"john@x.org' + body, /unbalanced quotes/],
    ["unbalanced quotes (sender)", '"john@b.org\nr@x.org' + body, /bad sender.*quoted/],
    ["quote inside a quoted local part", 'a@b.org\n"jo"hn"@x.org' + body, /unbalanced quotes|quoted/],
    ["double dot in the local part", "a@b.org\na..b@x.org" + body, /bad recipient.*(double dot|empty atom)/],
    ["leading dot in the local part", "a@b.org\n.a@x.org" + body, /bad recipient.*(leading|empty atom)/],
    ["trailing dot in the local part", "a@b.org\na.@x.org" + body, /bad recipient.*(trailing|empty atom)/],
    ["domain starting with a hyphen", "a@b.org\na@-x.org" + body, /bad recipient.*bad domain/],
    ["domain ending with a hyphen", "a@b.org\na@x-.org" + body, /bad recipient.*bad domain/],
    ["double dot in the domain", "a@b.org\na@x..org" + body, /bad recipient.*bad domain/],
    ["trailing dot in the domain", "a@b.org\na@x.org." + body, /bad recipient.*bad domain/],
    ["underscore in the domain", "a@b.org\na@x_y.org" + body, /bad recipient.*bad domain/],
    ["empty domain", "a@b.org\na@" + body, /bad recipient.*empty domain/],
    ["empty local part", "a@b.org\n@x.org" + body, /bad recipient.*empty local part/],
    ["bad address literal", "a@b.org\na@[1.2.3]" + body, /bad recipient.*address literal/],
    ["one bad among good", "a@b.org\nr@x.org, bad@, s@x.org" + body, /bad recipient "bad@"/],
    ["address too long", `a@b.org\n${"l".repeat(100)}@${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(60)}.${"g".repeat(60)}.org` + body, /bad recipient.*(320|longer)/],
  ];
  for (const [name, content, reason] of cases) {
    const id = await spool.create(content);
    try {
      const msg = await spool.open(id, "outgoing");
      t.fail(`${name}: accepted as ${JSON.stringify({ sender: msg.sender, recipients: msg.recipients })}`);
    } catch (err) {
      t.ok(err instanceof CorruptMessageError, `${name}: CorruptMessageError`);
      const e = err as CorruptMessageError;
      t.equal(e.queueId, id, `${name}: names the queue id`);
      t.match(e.reason, reason, `${name}: reason says what is wrong (${e.reason})`);
      t.match(e.message, id, `${name}: message carries the id`);
    }
  }
});

t.test("open() of a missing file is a file-system error, not a corrupt message", async (t) => {
  const spool = await tempSpool(t, { fsync: false });
  let caught: unknown = null;
  await spool.open("1700000000.0").catch((err: unknown) => { caught = err; });
  t.ok(caught, "rejected");
  t.notOk(caught instanceof CorruptMessageError, "not a CorruptMessageError (nothing to quarantine)");
  t.equal((caught as NodeJS.ErrnoException | null)?.code, "ENOENT");
});

t.test("addressProblem", async (t) => {
  const good = [
    "a@b.org", "<a@b.org>", "first.last@sub.example.org", '"john doe"@example.org', '"a\\"b"@x.org', '""@x.org',
    "user@[127.0.0.1]", "user@[IPv6:::1]", "x@localhost", "j\u00f6rg@b\u00fccher.example", "a+b@x-y.org", "1@2.3",
  ];
  for (const a of good) t.equal(addressProblem(a), null, `${a} is fine`);
  const bad: Array<[string, RegExp]> = [
    ["", /addr@domain/],
    ["<>", /addr@domain/],
    ["nobody", /addr@domain/],
    ["<a@b.org", /unbalanced angle/],
    ["a@b.org>", /unbalanced angle/],
    ["a\x01@b.org", /control/],
    ["a@b.org\r", /control/],
    ["a\0@b.org", /control/],
    ["a b@x.org", /" " not allowed/],
    ["a<b@x.org", /"<" not allowed/],
    ["a>b@x.org", /">" not allowed/],
    ["a,b@x.org", /"," not allowed/],
    ["a..b@x.org", /empty atom/],
    [".a@x.org", /empty atom/],
    ["a.@x.org", /empty atom/],
    ["@x.org", /empty local part/],
    ["a@", /empty domain/],
    ["a@-x.org", /bad domain/],
    ["a@x..org", /bad domain/],
    ["a@x.org.", /bad domain/],
    ["a@x y.org", /bad domain/],
    ["a@[300.1.1]", /address literal/],
    ['"john@x.org', /quoted/],
    ['"jo"hn"@x.org', /quoted/],
    [`a@${"d".repeat(64)}.org`, /bad domain/],
    [`${"l".repeat(300)}@${"d".repeat(30)}.org`, /320/],
  ];
  for (const [a, re] of bad) {
    const p = addressProblem(a);
    t.ok(p !== null, `${JSON.stringify(a)} is refused`);
    t.match(p ?? "", re, `${JSON.stringify(a)}: ${p}`);
  }
});

t.test("splitRecipients", async (t) => {
  t.same(splitRecipients(""), []);
  t.same(splitRecipients(" , \t,"), []);
  t.same(splitRecipients("a@x.org"), ["a@x.org"]);
  t.same(splitRecipients("a@x.org,b@x.org"), ["a@x.org", "b@x.org"]);
  t.same(splitRecipients("a@x.org b@x.org\tc@x.org , d@x.org"), ["a@x.org", "b@x.org", "c@x.org", "d@x.org"]);
  t.same(splitRecipients('"john doe"@x.org, "a,b"@x.org'), ['"john doe"@x.org', '"a,b"@x.org'], "quotes protect commas and spaces");
  t.same(splitRecipients('"a\\"b c"@x.org d@x.org'), ['"a\\"b c"@x.org', "d@x.org"], "escaped quote inside quotes");
  t.same(splitRecipients("<a b@x.org>, <c@x.org>"), ["<a b@x.org>", "<c@x.org>"], "angle brackets protect too");
  t.same(splitRecipients("<a@x.org><b@x.org>"), ["<a@x.org><b@x.org>"], "no separator, one token");
  t.equal(splitRecipients('"john@x.org'), null, "unbalanced quote");
  t.equal(splitRecipients("<a@x.org"), null, "unbalanced bracket");
  t.equal(splitRecipients("a@x.org, <b@x.org"), null);
});
