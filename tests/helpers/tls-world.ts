// Test helper: receiving MX hosts for the TLS-policy tests (MTA-STS, DANE, TLS-RPT): private
// Postfix instances (postfix.ts) on 127.0.0.x, all on one port (the engine's --port), each with
// a certificate for its MX name from certs.ts (or none: no STARTTLS), taking mail for the
// given domains into one Maildir. An engine in front of them is mx-world.ts's world().

import type { Test } from "tap";
import type { KeyPair } from "./certs.js";
import type { PostfixInstance } from "./postfix.js";
import { postfixSecurityCf, postfixWith } from "./security-rig.js";

/** A Postfix MX host at `host` (and `port` when given: the first one picks it) with this certificate, or without TLS. */
export async function mxPostfix(t: Test, o: { host: string; port?: number; cert: KeyPair | null; domains: string[] }): Promise<PostfixInstance> {
  // inet_interfaces must name an interface's own address, and 127.0.0.2 is not one (all of
  // 127.0.0.0/8 reaches lo): "all" here, and master.cf binds the smtpd service to host:port.
  const domains = { virtual_mailbox_domains: o.domains.join(" "), inet_interfaces: "all" };
  const security = o.cert ? await postfixSecurityCf(o.cert) : { mainCf: {} };
  Object.assign(security.mainCf, domains);
  return postfixWith(t, security, { host: o.host, port: o.port, domain: o.domains[0] });
}
