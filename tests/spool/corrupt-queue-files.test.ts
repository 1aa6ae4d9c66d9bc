// Corrupt queue files met by the engine (tests/helpers/engine-rig.ts): each goes to corrupt/,
// the good ones beside them are delivered.

import t from "tap";
import { setup, checkLog, simple } from "../helpers/engine-rig.js";

t.test("13. corrupt queue files go to corrupt/, the good ones are delivered", async (tt) => {
  const rig = await setup(tt);
  const noRcptLine = rig.drop("alice@example.org");
  const emptyRcpt = rig.drop("alice@example.org\n\nSubject: x\n\nbody\n");
  const notAddress = rig.drop("alice@example.org\nnot-an-address\nSubject: x\n\nbody\n");
  const control = rig.drop("alice@example.org\nok@example.net, bad\x01x@example.net\nSubject: x\n\nbody\n");
  const good1 = rig.drop(simple("a@example.org", ["b@example.net"]));
  const good2 = rig.drop(simple("c@example.org", ["d@example.net"]));
  const summary = await rig.flush();
  tt.match(summary, { sent: 2, deferred: 0, bounced: 0, corrupt: 4 });
  for (const id of [noRcptLine, emptyRcpt, notAddress, control]) tt.same(rig.where(id), ["corrupt"], `${id} in corrupt/ only`);
  for (const id of [good1, good2]) tt.same(rig.where(id), [], `${id} delivered and removed`);
  tt.equal(rig.server.messages.length, 2);
  const reason = (id: string) => rig.lines.find((l) => l.includes(` mudmail/qmgr[`) && l.includes(`: ${id}: corrupt queue file moved to corrupt/${id}: `));
  tt.match(reason(noRcptLine), /no recipient line$/);
  tt.match(reason(emptyRcpt), /no recipients$/);
  tt.match(reason(notAddress), /bad recipient "not-an-address": not of the form addr@domain$/);
  tt.match(reason(control), /control character in address$/);
  tt.notMatch(reason(control) ?? "", /[\x00-\x1f]/, "no control byte in the log line");
  tt.equal(rig.errors.length, 4, "an error event per corrupt file");
  for (const e of rig.errors) tt.match(e, { name: "MailError", code: "ECORRUPT" });
  checkLog(tt, rig);
});
