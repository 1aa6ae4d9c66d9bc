// compose.ts's messageIdOf, which the cleanup log line (Postfix's message-id=) reads: the
// header block only, folded values unfolded, whatever the line ends. A guard for the faster
// version (it stops converting at the header block's end; the old one read all 100 KB of a
// message as text and split it): the answers must not change.

import t from "tap";
import { messageIdOf } from "../../compose.js";

const id = (text: string) => messageIdOf(Buffer.from(text, "latin1"));

t.test("messageIdOf reads the header block, never the body", async (t) => {
  t.equal(id("Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n"), "<a@b>", "CRLF");
  t.equal(id("subject: x\nmessage-id:<a@b>\n\nbody\n"), "<a@b>", "LF, any case, no space");
  t.equal(id("Message-ID:\r\n <folded@b>\r\nTo: c\r\n\r\n"), "<folded@b>", "a folded value, unfolded");
  t.equal(id("Subject: x\n\nMessage-ID: <in-body@b>\n"), null, "after the empty line (LF) it is body");
  t.equal(id("Subject: x\r\n\r\nMessage-ID: <in-body@b>\r\n"), null, "after the empty line (CRLF) it is body");
  t.equal(id("\nMessage-ID: <in-body@b>\n"), null, "no header block at all");
  t.equal(id("Subject: x\nMessage-ID: <last@b>"), "<last@b>", "a header block without an end");
  const big = Buffer.concat([Buffer.from("Subject: big\n\n"), Buffer.alloc(200 * 1024, "Message-ID: <no@b>\n")]);
  t.equal(messageIdOf(big), null, "200 KB of body lines that look like the field are not read as one");
});
