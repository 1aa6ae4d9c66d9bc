// The engine's events as a host program sees them (tests/helpers/engine-rig.ts): every field of
// sent / deferred / bounced, and an error without a listener never throws.

import t from "tap";
import { MailError } from "../../mail.js";
import { setup, checkLog, expectDsn, simple } from "../helpers/engine-rig.js";

t.test("16. events carry their fields; an error without listener never throws", async (tt) => {
  await tt.test("sent / deferred / bounced events", async (tt) => {
    const rig = await setup(tt, {
      script: { rcpt: (a) => (a.startsWith("later") ? "452 4.5.3 Too many recipients" : a.startsWith("never") ? "553 5.1.3 Bad address" : undefined) },
    });
    const file = simple("a@example.org", ["now@example.net", "later@example.net", "never@example.net"]);
    const id = rig.drop(file);
    await rig.flush();
    // never@'s 553 makes a DSN to a@example.org, sent in the same flush: its "sent" event is checked apart.
    const dsnId = expectDsn(tt, rig, {
      id, sender: "a@example.org", file, failed: [{ rcpt: "never@example.net", status: "5.1.3", diagnostic: "553 5.1.3 Bad address" }],
    });
    // Issue 4 (7): the events carry the enhanced status under that name, and the server's reply alone.
    const keys = ["queueId", "recipient", "status", "code", "dsn", "enhanced", "text", "reply", "relay"];
    for (const [status, rcpt, code, dsn, reply] of [
      ["sent", "now", 250, "2.0.0", /^250 2\.0\.0 Ok: queued as \d+$/],
      ["deferred", "later", 452, "4.5.3", "452 4.5.3 Too many recipients"],
      ["bounced", "never", 553, "5.1.3", "553 5.1.3 Bad address"],
    ] as const) {
      const list = rig.events[status].filter((e) => e.queueId !== dsnId);
      tt.equal(list.length, 1, `one ${status} event`);
      tt.same(Object.keys(list[0]).sort(), [...keys].sort(), `${status} event fields`);
      tt.match(list[0], { queueId: id, recipient: `${rcpt}@example.net`, status, code, dsn, enhanced: dsn, reply, relay: rig.relay });
      tt.ok(list[0].text.length > 0, "with text");
    }
    checkLog(tt, rig, { dsns: 1 });
  });

  await tt.test("a corrupt file with no error listener", async (tt) => {
    const rig = await setup(tt, { errorListener: false });
    tt.equal(rig.engine.listenerCount("error"), 0);
    const bad = rig.drop("nobody-here\n");
    const good = rig.drop(simple("a@example.org", ["b@example.net"]));
    const summary = await rig.flush();
    tt.match(summary, { corrupt: 1, sent: 1 }, "flush resolves, counts the corrupt file");
    tt.same(rig.where(bad), ["corrupt"]);
    tt.same(rig.where(good), []);
    tt.ok(rig.lines.some((l) => l.includes(`${bad}: corrupt queue file moved to corrupt/`)), "logged");
  });

  await tt.test("with a listener: a MailError with code and queue id", async (tt) => {
    const rig = await setup(tt);
    const bad = rig.drop("x@example.org\nnot-an-address\n\n");
    await rig.flush();
    tt.equal(rig.errors.length, 1);
    tt.ok(rig.errors[0] instanceof MailError);
    tt.match(rig.errors[0], { code: "ECORRUPT", details: { queueId: bad } });
  });
});
