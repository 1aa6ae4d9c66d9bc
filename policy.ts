/*
 * NAME
 *   policy.ts - delivery policy: limits per destination and provider, pacing, reply rules, suspensions
 *
 * SYNOPSIS
 *   const policy = checkPolicy(JSON.parse(text));      // a PolicyError names the bad key
 *   const shaper = new Shaper(policy, { connections: 20 });
 *   const group = shaper.groupFor("gmail.com", ["gmail-smtp-in.l.google.com"]);   // "google"
 *   shaper.connections(group); group.nextStart; shaper.started(group, now); shaper.delivered(group);
 *   const rule = shaper.ruleFor("421 4.7.0 [TS04] ..."); shaper.throttle(group, open);
 *   shaper.suspend(key, seconds, reason, now); shaper.resume(key); shaper.suspension(key, now);
 *   shaper.ended(now); shaper.state(); shaper.load(state, now);
 *
 * DESCRIPTION
 *   The rules a destination's mail is sent under, and what the engine learned about it since.
 *   A policy (the --policy file, or the `policy` option, the same JSON) gives limits:
 *
 *     connections            connections open to the destination at once
 *     messagesPerConnection  then QUIT and open a new one (null: no limit, Postfix's default)
 *     rate                   "N/s", "N/min" or "N/h": messages started, spread evenly
 *
 *   under "default", per domain ("domains") and per provider ("providers", matched by the
 *   names of the destination's MX hosts), and reply rules ("replies": a regular expression
 *   on a temporary failure's reply, and "throttle" or "suspend" for "seconds").
 *
 *   A Group is what limits are counted on: a provider (every domain whose MX hosts are
 *   Google's shares Google's connections and rate), a domain listed under "domains" (its own,
 *   its provider's limits under its own), or else the destination itself. Its limits are the
 *   built-in default, then the file's default, then the provider's, then the domain's, each
 *   key taken from the last that gives it. Built-in providers (below, with their sources) are
 *   overridden key by key by a file's provider of the same name.
 *
 *   Rate pacing: a group's next message may start at `nextStart`; each start moves it one
 *   interval on from then or from now, whichever is later, so starts are spread evenly and
 *   never come in a burst after a quiet spell.
 *
 *   Throttle (Postfix's feedback): the group's connection limit drops to one below what was
 *   open (never below 1), and climbs back by one after as many deliveries as the limit then
 *   is, until it is the policy's again. Suspend: no connection to the group (or to a domain
 *   given by --suspend) until the suspension ends or is lifted; suspensions are kept in the
 *   spool's state (state(), load()) so they outlive the process that began them.
 *
 * DIAGNOSTICS
 *   checkPolicy() throws a PolicyError whose message starts with the key at fault, as a path:
 *   `domains["example.com"].rate: expected N/s, N/min or N/h, got "5/x"`.
 *
 * BUGS
 *   A provider is recognised by the names of the destination's MX hosts only; one that
 *   hides behind another's names (a filtering service) is that service's.
 */

/** A destination's limits as a policy gives them; every key may be left out. */
export interface PolicyLimits {
  /** Connections open at once to the destination (or the provider, for all its domains together). */
  connections?: number;
  /** Messages one connection carries before QUIT; null: no limit. */
  messagesPerConnection?: number | null;
  /** "N/s", "N/min" or "N/h": messages started, spread evenly; null: as fast as the slots go. */
  rate?: string | null;
}

/** A reply rule: what a temporary failure whose reply matches does to its destination. */
export interface PolicyReply {
  /** A regular expression (JavaScript syntax) on the server's reply, e.g. "\\[TS04\\]". */
  match: string;
  /** throttle: one connection fewer, the mail deferred without penalty; suspend: no connection for `seconds`. */
  action: "throttle" | "suspend";
  seconds?: number;
}

/** The --policy file (JSON), or the `policy` option: the same object. */
export interface Policy {
  default?: PolicyLimits;
  domains?: Record<string, PolicyLimits>;
  providers?: Record<string, PolicyLimits & { mx?: string[] }>;
  replies?: PolicyReply[];
}

/** A bad policy: the message starts with the key at fault. */
export class PolicyError extends Error {
  constructor(readonly key: string, problem: string) {
    super(`${key}: ${problem}`);
    this.name = "PolicyError";
  }
}

/*
 * Built-in providers. Sources:
 *   Google: https://support.google.com/mail/answer/81126 (sender guidelines) and KumoMTA's
 *     shaping defaults (assets/policy-extras/shaping.toml: 50 messages per connection, 5
 *     connections for the provider, MX names ending in .google.com or .googlemail.com).
 *   Microsoft (Outlook.com, Hotmail): https://sendersupport.olc.protection.outlook.com/pm/Policies
 *     and KumoMTA's "outlook" provider (MX names ending in .olc.protection.outlook.com; 50
 *     messages per connection, 5 connections).
 *   Yahoo (and AOL, on the same MX hosts): https://senders.yahooinc.com/best-practices and
 *     KumoMTA's "yahoo" provider (MX names ending in .yahoodns.net; 20 messages per
 *     connection; "[TS04]" replies mean stop for two hours:
 *     https://senders.yahooinc.com/smtp-error-codes).
 *   Gmail's "421-4.7.28 ... unusual rate of unsolicited mail" asks for fewer connections:
 *     https://support.google.com/a/answer/3726730 (SMTP error reference).
 */
const BUILT_IN: Required<Pick<Policy, "providers" | "replies">> = {
  providers: {
    google: { mx: [".google.com", ".googlemail.com"], connections: 5, messagesPerConnection: 50 },
    microsoft: { mx: [".olc.protection.outlook.com"], connections: 5, messagesPerConnection: 50 },
    yahoo: { mx: [".yahoodns.net"], messagesPerConnection: 20 },
  },
  replies: [
    { match: "\\[TSS?04\\]", action: "suspend", seconds: 7200 },
    { match: "^421[ -]4\\.7\\.28\\b", action: "throttle" },
  ],
};

/** Limits as the engine applies them. */
export interface Limits {
  connections: number;
  messagesPerConnection: number | null;
  /** Milliseconds between message starts; 0 for no rate. */
  interval: number;
  /** The rate as written, for the log. */
  rate: string | null;
}

/** What limits are counted on: a provider, a domain of the policy's, or one destination. */
export interface Group {
  readonly key: string;
  readonly provider: string | null;
  readonly limits: Limits;
  /** The connection limit after throttling; null: the policy's. */
  cap: number | null;
  /** Deliveries since the cap last moved. */
  successes: number;
  /** Epoch ms before which no message of this group starts (rate pacing). */
  nextStart: number;
}

export interface ReplyRule {
  match: RegExp;
  action: "throttle" | "suspend";
  seconds: number;
}

/** A suspension, as kept in the spool's state (".state-suspended"). */
export interface Suspension {
  /** Epoch ms. */
  until: number;
  reason: string;
  /** The domains known to be behind it (a provider's), for the queue listing. */
  domains: string[];
}

const LIMIT_KEYS = ["connections", "messagesPerConnection", "rate"];
const DOMAIN = /^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*\.?$/i;
const PROVIDER = /^[a-z][a-z0-9_-]{0,62}$/i;

/** A domain name as a policy (and --suspend) takes it: labels of letters, digits, "-" and "_", an optional final dot. */
export function isDomainName(name: string): boolean {
  return DOMAIN.test(name);
}
const RATE = /^\s*(\d+(?:\.\d+)?)\s*\/\s*(s|min|h)\s*$/;
const UNIT_MS: Record<string, number> = { s: 1000, min: 60_000, h: 3_600_000 };

/** "5/s" -> 200 ms between starts; throws a PolicyError naming `key`. */
export function rateInterval(text: string, key: string): number {
  const m = RATE.exec(text);
  const n = m ? Number(m[1]) : 0;
  if (!m || !(n > 0)) throw new PolicyError(key, `expected N/s, N/min or N/h with N above 0, got ${JSON.stringify(text)}`);
  return UNIT_MS[m[2]] / n;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function onlyKeys(value: Record<string, unknown>, allowed: string[], at: string): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) throw new PolicyError(`${at}${at ? "." : ""}${key}`, `unknown key (expected ${allowed.join(", ")})`);
  }
}

function checkLimits(value: unknown, at: string, extra: string[] = []): PolicyLimits {
  if (!isObject(value)) throw new PolicyError(at, `expected an object, got ${JSON.stringify(value)}`);
  onlyKeys(value, [...LIMIT_KEYS, ...extra], at);
  const out: PolicyLimits = {};
  if (value.connections !== undefined) {
    const n = value.connections;
    if (typeof n !== "number" || !Number.isInteger(n) || n < 1 || n > 1000) throw new PolicyError(`${at}.connections`, `expected a whole number from 1 to 1000, got ${JSON.stringify(n)}`);
    out.connections = n;
  }
  if (value.messagesPerConnection !== undefined) {
    const n = value.messagesPerConnection;
    if (n !== null && (typeof n !== "number" || !Number.isInteger(n) || n < 1)) {
      throw new PolicyError(`${at}.messagesPerConnection`, `expected a whole number above 0, or null, got ${JSON.stringify(n)}`);
    }
    out.messagesPerConnection = n;
  }
  if (value.rate !== undefined) {
    if (value.rate !== null && typeof value.rate !== "string") throw new PolicyError(`${at}.rate`, `expected N/s, N/min or N/h, or null, got ${JSON.stringify(value.rate)}`);
    if (typeof value.rate === "string") rateInterval(value.rate, `${at}.rate`);
    out.rate = value.rate;
  }
  return out;
}

/** A policy checked key by key; the first problem is thrown as a PolicyError naming its key. */
export function checkPolicy(input: unknown): Policy {
  if (!isObject(input)) throw new PolicyError("(top)", `expected a JSON object, got ${JSON.stringify(input)}`);
  onlyKeys(input, ["default", "domains", "providers", "replies"], "");
  const out: Policy = {};
  if (input.default !== undefined) out.default = checkLimits(input.default, "default");
  if (input.domains !== undefined) {
    if (!isObject(input.domains)) throw new PolicyError("domains", "expected an object of domain names");
    out.domains = {};
    for (const [name, limits] of Object.entries(input.domains)) {
      if (!DOMAIN.test(name)) throw new PolicyError(`domains[${JSON.stringify(name)}]`, "not a domain name");
      out.domains[name.toLowerCase().replace(/\.$/, "")] = checkLimits(limits, `domains[${JSON.stringify(name)}]`);
    }
  }
  if (input.providers !== undefined) {
    if (!isObject(input.providers)) throw new PolicyError("providers", "expected an object of provider names");
    out.providers = {};
    for (const [name, value] of Object.entries(input.providers)) {
      const at = `providers.${name}`;
      if (!PROVIDER.test(name)) throw new PolicyError(at, "a provider's name is a letter, then letters, digits, - or _");
      const limits = checkLimits(value, at, ["mx"]) as PolicyLimits & { mx?: string[] };
      const mx = (value as Record<string, unknown>).mx;
      if (mx !== undefined) {
        if (!Array.isArray(mx) || mx.length === 0) throw new PolicyError(`${at}.mx`, "expected a list of MX host names or suffixes (\".google.com\")");
        mx.forEach((s, i) => {
          if (typeof s !== "string" || !DOMAIN.test(s.replace(/^\./, ""))) throw new PolicyError(`${at}.mx[${i}]`, `not a host name or suffix: ${JSON.stringify(s)}`);
        });
        limits.mx = mx.map((s: string) => s.toLowerCase());
      } else if (!(name.toLowerCase() in BUILT_IN.providers)) {
        throw new PolicyError(`${at}.mx`, "missing: a provider of the file's own needs the names of its MX hosts");
      }
      out.providers[name.toLowerCase()] = limits;
    }
  }
  if (input.replies !== undefined) {
    if (!Array.isArray(input.replies)) throw new PolicyError("replies", "expected a list of rules");
    out.replies = input.replies.map((rule: unknown, i: number) => {
      const at = `replies[${i}]`;
      if (!isObject(rule)) throw new PolicyError(at, "expected an object { match, action, seconds }");
      onlyKeys(rule, ["match", "action", "seconds"], at);
      if (typeof rule.match !== "string" || rule.match === "") throw new PolicyError(`${at}.match`, "expected a regular expression");
      try {
        new RegExp(rule.match);
      } catch (err) {
        throw new PolicyError(`${at}.match`, `not a regular expression: ${(err as Error).message}`);
      }
      if (rule.action !== "throttle" && rule.action !== "suspend") throw new PolicyError(`${at}.action`, `expected throttle or suspend, got ${JSON.stringify(rule.action)}`);
      if (rule.action === "suspend") {
        if (typeof rule.seconds !== "number" || !(rule.seconds > 0)) throw new PolicyError(`${at}.seconds`, `a suspend rule needs seconds above 0, got ${JSON.stringify(rule.seconds)}`);
      } else if (rule.seconds !== undefined) {
        throw new PolicyError(`${at}.seconds`, "a throttle rule has no seconds: the limit climbs back with deliveries");
      }
      return { match: rule.match, action: rule.action, ...(rule.seconds !== undefined ? { seconds: rule.seconds as number } : {}) };
    });
  }
  return out;
}

/** A host name ends with a suffix (".google.com"), or is the name given, or is below it. */
function hostMatches(host: string, pattern: string): boolean {
  const name = host.toLowerCase().replace(/\.$/, "");
  const bare = pattern.replace(/^\./, "");
  return pattern.startsWith(".") ? name.endsWith(pattern) : name === bare || name.endsWith(`.${bare}`);
}

/**
 * The policy at work: each destination's group and limits, and what the engine learned since
 * (throttles, the pace of each group, suspensions). Kept by the engine; the command line
 * makes one to change suspensions when no engine runs.
 */
export class Shaper {
  readonly #base: Limits;
  readonly #domains: Record<string, PolicyLimits>;
  readonly #providers: Array<[string, PolicyLimits & { mx: string[] }]>;
  readonly #rules: ReplyRule[];
  readonly #groups = new Map<string, Group>();
  readonly #suspensions = new Map<string, Suspension>();

  /** `defaults.connections`: the limit when no policy gives one (destinationConcurrencyLimit). */
  constructor(policy: Policy | null | undefined, defaults: { connections: number }) {
    const p = checkPolicy(policy ?? {});
    this.#base = resolve({ connections: defaults.connections, messagesPerConnection: null, rate: null }, p.default);
    this.#domains = p.domains ?? {};
    const providers = new Map<string, PolicyLimits & { mx: string[] }>();
    for (const [name, value] of Object.entries(p.providers ?? {})) {
      const builtIn = BUILT_IN.providers[name] as (PolicyLimits & { mx: string[] }) | undefined;
      providers.set(name, { ...builtIn, ...value, mx: value.mx ?? builtIn!.mx });
    }
    for (const [name, value] of Object.entries(BUILT_IN.providers)) if (!providers.has(name)) providers.set(name, value as PolicyLimits & { mx: string[] });
    this.#providers = [...providers];
    this.#rules = [...(p.replies ?? []), ...BUILT_IN.replies].map((r) => ({ match: new RegExp(r.match), action: r.action, seconds: r.seconds ?? 0 }));
  }

  /** The names --suspend may give besides domains. */
  get providerNames(): string[] {
    return this.#providers.map(([name]) => name);
  }

  /**
   * The group a destination's mail counts on: its own entry in "domains", else the provider
   * whose MX names match its first host, else the destination (`key`) itself.
   */
  groupFor(key: string, hosts: string[]): Group {
    const provider = hosts.length > 0 ? this.#providers.find(([, p]) => p.mx.some((s) => hostMatches(hosts[0], s))) : undefined;
    const own = this.#domains[key];
    const groupKey = own || !provider ? key : provider[0];
    let group = this.#groups.get(groupKey);
    if (!group) {
      const limits = resolve(resolve(this.#base, provider?.[1]), own);
      group = { key: groupKey, provider: provider?.[0] ?? null, limits, cap: null, successes: 0, nextStart: 0 };
      this.#groups.set(groupKey, group);
    }
    return group;
  }

  /** The connection limit now: the policy's, or lower after a throttle. */
  connections(group: Group): number {
    return group.cap ?? group.limits.connections;
  }

  /** A message of the group starts: the next may start one interval later (from now, or from the last start if that is later). */
  started(group: Group, now: number): void {
    if (group.limits.interval > 0) group.nextStart = Math.max(now, group.nextStart) + group.limits.interval;
  }

  /** A delivery went through: a throttled limit climbs back one after as many deliveries as it is. */
  delivered(group: Group): void {
    if (group.cap === null) return;
    if (++group.successes < group.cap) return;
    group.successes = 0;
    group.cap = group.cap + 1 >= group.limits.connections ? null : group.cap + 1;
  }

  /** A throttle reply: one connection fewer than were open (at least 1). Returns the new limit. */
  throttle(group: Group, open: number): number {
    group.cap = Math.max(1, Math.min(this.connections(group), open) - 1);
    group.successes = 0;
    return group.cap;
  }

  /** The first reply rule that matches a temporary failure's reply, or null. */
  ruleFor(reply: string): ReplyRule | null {
    return this.#rules.find((r) => r.match.test(reply)) ?? null;
  }

  /* Suspensions: by group key (a provider, a domain) or by a domain given on the command line */

  /** Begins (or lengthens) a suspension; returns it. */
  suspend(key: string, seconds: number, reason: string, now: number, domains: string[] = []): Suspension {
    const old = this.#suspensions.get(key);
    const until = Math.max(now + seconds * 1000, old?.until ?? 0);
    const s: Suspension = { until, reason, domains: [...new Set([...(old?.domains ?? []), ...domains])].sort() };
    this.#suspensions.set(key, s);
    return s;
  }

  /** Lifts a suspension; returns it, or null when there was none. */
  resume(key: string): Suspension | null {
    const s = this.#suspensions.get(key) ?? null;
    this.#suspensions.delete(key);
    return s;
  }

  /** The suspension on this key now, or null (one that ended stays until ended() reports it). */
  suspension(key: string, now: number): Suspension | null {
    const s = this.#suspensions.get(key);
    return s && s.until > now ? s : null;
  }

  /** A domain found behind a suspended key (a provider's): listed with it. Returns whether it is new. */
  noteDomain(key: string, domain: string): boolean {
    const s = this.#suspensions.get(key);
    if (!s || key === domain || s.domains.includes(domain)) return false;
    s.domains = [...s.domains, domain].sort();
    return true;
  }

  /** Suspensions whose time is over, removed: each reported once. */
  ended(now: number): Array<[string, Suspension]> {
    const over = [...this.#suspensions].filter(([, s]) => s.until <= now);
    for (const [key] of over) this.#suspensions.delete(key);
    return over;
  }

  /** When the next suspension ends (Infinity when none). */
  nextEnd(): number {
    let next = Infinity;
    for (const s of this.#suspensions.values()) next = Math.min(next, s.until);
    return next;
  }

  /** Every suspension, for the spool's state and the metrics. */
  state(): Record<string, Suspension> {
    return Object.fromEntries(this.#suspensions);
  }

  /** Suspensions read back from the spool's state; what cannot be read is left out. */
  load(value: unknown): void {
    this.#suspensions.clear();
    for (const [key, s] of readSuspensions(value)) this.#suspensions.set(key, s);
  }
}

/** The domains suspensions hold back now, from the spool's state: domain -> end, epoch ms (a provider's key and the domains known behind it). */
export function suspendedDomains(state: unknown, now = Date.now()): Map<string, number> {
  const ends = new Map<string, number>();
  for (const [key, s] of readSuspensions(state)) {
    if (s.until <= now) continue;
    for (const d of [key, ...s.domains]) ends.set(d, Math.min(ends.get(d) ?? Infinity, s.until));
  }
  return ends;
}

/** The suspensions kept in the spool's state (.state-suspended), key by key; what is not one is left out. */
export function readSuspensions(value: unknown): Map<string, Suspension> {
  const suspensions = new Map<string, Suspension>();
  if (!isObject(value)) return suspensions;
  for (const [key, s] of Object.entries(value)) {
    if (!isObject(s) || typeof s.until !== "number") continue;
    const domains = Array.isArray(s.domains) ? s.domains.filter((d): d is string => typeof d === "string") : [];
    suspensions.set(key, { until: s.until, reason: typeof s.reason === "string" ? s.reason : "", domains });
  }
  return suspensions;
}

/** Limits with a policy's keys laid over them. */
function resolve(base: Limits | { connections: number; messagesPerConnection: number | null; rate: string | null }, over: PolicyLimits | undefined): Limits {
  const rate = over?.rate !== undefined ? over.rate : base.rate;
  return {
    connections: over?.connections ?? base.connections,
    messagesPerConnection: over?.messagesPerConnection !== undefined ? over.messagesPerConnection : base.messagesPerConnection,
    rate,
    interval: rate ? rateInterval(rate, "rate") : 0,
  };
}
