"""Billing per token-hour: a retention meter and an append-only usage ledger in Redis.

What is billed (rates in `Rates`, part of the typed config):
    retention  tokens x seconds a session's KV is resident, per tier ("hbm", "host", "redis") and
               retention class, priced per 1M token-hours, prorated per second, times the bytes its KV
               format stores over what the same tokens take exactly (kv_bytes / exact_bytes: fp8 about
               0.5, int4 about 0.3, keep:f about f; exact 1)
    compute    prefill tokens, tokens served from retained context ("cached"), generated tokens,
               priced per 1M tokens

How it is metered. Every session has one *open interval* in Redis (tier, tokens, retention class, KV
format and bytes, since). An event closes it and opens the next: a tier move, a resize (append,
retained turn), an extension, a retention-class change, a change of KV format, the delete or the
expiry, and every hour boundary (the periodic pass closes each interval at the last boundary, so a
quiet session still gets one record an hour).
A closed interval becomes one usage record per clock hour it spans.

Why it never loses or double-counts:
  * every event has a deterministic id (`{session}:create`, `:size:{n}`, `:move:{n}`, `:hour:{ms}`,
    `:close`, …); the Lua script that applies it first checks the session's set of applied event ids,
    so a retried or replayed write is a no-op;
  * the records, the aggregates (per session, per tenant, per tenant-day) and the new open interval
    (the session's billing watermark) are written by that one script: atomically, all or nothing;
  * the script also checks the open interval is the one the records were computed from (optimistic
    concurrency), so two meters racing cannot both close it;
  * the meter itself keeps no state: after a crash it reads everything back from Redis, and the
    events it had not written are produced again with the same ids.
Records are append-only: a correction is a new record. Amounts are integers in nano-units of the
currency (1e-9 USD), so sums do not depend on order. Run the billing Redis with AOF
(`appendonly yes`, `appendfsync everysec` or `always`): the chart does.

Ledger growth (benchmarks/billing.py): at most 1 + (events in that hour) retention records per
session-hour, and one compute record per request; a session with no activity adds exactly one
record an hour.

Keys (prefix "ringserve:bill:"): open:{sid} hash (the open interval), open zset (sid by since),
open:t:{tenant} set, ev:{sid} set (applied events), recs:{tenant} zset (records by start ms),
agg:s:{sid} / agg:t:{tenant} / agg:d:{tenant}:{yyyymmdd} hashes of integer sums.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Callable, Iterable, Iterator

import redis

from ringserve.workers.protocol import Tier

log = logging.getLogger("ringserve.billing")

P = "ringserve:bill:"
TIERS = tuple(t.api for t in Tier)  # "hbm", "host", "redis"
CLASSES = ("hot", "standard", "cold")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
GROUP_BY = ("session", "tier", "day", "kv_format")  # how usage line items may be grouped
MAX_RANGE_S = 93 * 86400  # a usage query spans at most a quarter
EVENTS_TTL_S = 35 * 86400  # applied-event ids of a closed session are kept this long (replays within it are no-ops)


class BillingError(ValueError):
    """A usage query or a billable request that cannot be served as asked (INVALID_ARGUMENT)."""


class BelowMinimum(ValueError):
    """A session smaller than the configured minimum billable size (FAILED_PRECONDITION)."""


def _default_retention() -> dict:
    return {"hot": {"hbm": 4.50, "host": 4.50, "redis": 4.50},  # hot is held on HBM: billed so throughout
            "standard": {"hbm": 4.50, "host": 1.00, "redis": 0.25},
            "cold": {"hbm": 4.50, "host": 1.00, "redis": 0.25}}


@dataclass(frozen=True)
class Rates:
    """Prices in `currency` units. Defaults: HBM at Gemini 2.5 Pro's context-cache storage price
    ($4.50 per 1M token-hours, ANCHORS.md); host and Redis cheaper in proportion to their cost."""

    currency: str = "USD"
    # per 1M token-hours, by retention class then tier
    retention: dict = field(default_factory=_default_retention)
    prefill_per_mtok: float = 0.10  # per 1M tokens prefilled (create, append, prompts)
    cached_per_mtok: float = 0.01  # per 1M tokens of retained context a request is answered from
    generated_per_mtok: float = 0.40  # per 1M tokens generated
    min_session_tokens: int = 0  # smaller sessions are refused (FAILED_PRECONDITION); 0 = no minimum
    meter_interval_s: float = 10.0  # how often the meter polls tiers and closes hour boundaries
    reconcile_every: int = 6  # reconcile live sessions with open intervals every this many passes

    def __post_init__(self):
        if not (len(self.currency) == 3 and self.currency.isalpha() and self.currency.isupper()):
            raise ValueError(f"currency must be an ISO 4217 code like 'USD', got {self.currency!r}")
        table = _default_retention()
        for cls, tiers in (self.retention or {}).items():
            if cls not in CLASSES:
                raise ValueError(f"billing.retention: unknown retention class {cls!r}; known: {CLASSES}")
            for tier, price in tiers.items():
                if tier not in TIERS:
                    raise ValueError(f"billing.retention.{cls}: unknown tier {tier!r}; known: {TIERS}")
                table[cls][tier] = price
        object.__setattr__(self, "retention", table)
        prices = [p for t in table.values() for p in t.values()] + [
            self.prefill_per_mtok, self.cached_per_mtok, self.generated_per_mtok]
        if any(not isinstance(p, (int, float)) or p < 0 or p != p for p in prices):
            raise ValueError("billing rates must be non-negative numbers")
        if self.min_session_tokens < 0:
            raise ValueError("billing.min_session_tokens must be >= 0")
        if self.meter_interval_s <= 0:
            raise ValueError("billing.meter_interval_s must be > 0")

    @classmethod
    def from_dict(cls, d: dict | None) -> "Rates":
        return d if isinstance(d, Rates) else cls(**(d or {}))

    def retention_nanos(self, retention: str, tier: str, token_ms: int, kv_bytes: int = 0, exact_bytes: int = 0) -> int:
        """Cost of token_ms (tokens x milliseconds) in nano-units: token_ms x price / 3600, times the
        session's stored bytes over what the same tokens take exactly (its KV format; 1 when not known)."""
        price = Decimal(str(self.retention[retention][tier]))
        amount = token_ms * price / 3600
        if kv_bytes > 0 and exact_bytes > 0:
            amount = token_ms * price * kv_bytes / (3600 * exact_bytes)
        return int(amount.to_integral_value(ROUND_HALF_EVEN))

    def compute_nanos(self, prefill: int, cached: int, generated: int) -> int:
        """Cost of one request's tokens in nano-units: tokens x price-per-1M x 1000."""
        total = (prefill * Decimal(str(self.prefill_per_mtok)) + cached * Decimal(str(self.cached_per_mtok))
                 + generated * Decimal(str(self.generated_per_mtok))) * 1000
        return int(total.to_integral_value(ROUND_HALF_EVEN))


def to_money(nanos: int) -> float:
    return nanos / 1e9


# One event, applied atomically. KEYS: open:{sid}, ev:{sid}, agg:s:{sid}, agg:t:{tenant},
# recs:{tenant}, open index, open:t:{tenant}. ARGV (flat, no JSON to decode):
#   1 event id   2 expected interval seq ("*": do not check, "": none may be open)   3 sid
#   4 mode: "keep" (interval unchanged) | "close" (stop metering) | "set" (update the interval)
#   5 billed_through ms (= the new interval's since in "set" mode; "" = unchanged)   6 tenant ("" = unchanged)
#   7 TTL of the event set once closed   8 number of interval field/value pairs, then the pairs
#   then the number of records, and per record: kind ("r" retention | "c" compute), score, member
#   (encoded JSON), day aggregate key, number of field/increment pairs, then the pairs.
# Retention records come with the id {sid}:r{n} numbered from the interval's seq (which the script
# checks, so that numbering is the one it would give); compute records get {sid}:c{n} here, put in
# place of the member's "@ID@".
_APPLY = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'dup' end
local seq = redis.call('HGET', KEYS[1], 'seq') or ''
if ARGV[2] ~= '*' and seq ~= ARGV[2] then return 'stale' end
local n = tonumber(seq) or 0
local i = 9
local state = {}
for _ = 1, tonumber(ARGV[8]) do
  state[#state + 1] = ARGV[i]; state[#state + 1] = ARGV[i + 1]; i = i + 2
end
local nrec = tonumber(ARGV[i]); i = i + 1
for _ = 1, nrec do
  local kind, score, member, day, nincr = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  i = i + 5
  if kind == 'r' then
    n = n + 1
  else
    local c = redis.call('HINCRBY', KEYS[3], 'compute_seq', 1)
    member = string.gsub(member, '@ID@', ARGV[3] .. ':c' .. c, 1)
  end
  redis.call('ZADD', KEYS[5], score, member)
  for _ = 1, nincr do
    redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', day, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
if ARGV[4] == 'close' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[6], ARGV[3])
  redis.call('SREM', KEYS[7], ARGV[3])
  redis.call('HSET', KEYS[3], 'closed', '1')
  redis.call('EXPIRE', KEYS[2], ARGV[7])
elseif ARGV[4] == 'set' then
  state[#state + 1] = 'seq'; state[#state + 1] = tostring(n)
  state[#state + 1] = 'since'; state[#state + 1] = ARGV[5]
  redis.call('HSET', KEYS[1], unpack(state))
  redis.call('ZADD', KEYS[6], ARGV[5], ARGV[3])
  if ARGV[2] == '' then redis.call('SADD', KEYS[7], ARGV[3]) end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'billed_through', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'tenant', ARGV[6]) end
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""


@dataclass
class Interval:
    """A session's open retention interval, as stored in Redis."""

    tenant: str
    tier: str
    tokens: int
    retention: str
    since: int  # ms
    seq: str  # records of this session so far, as the script left it
    move: int  # last tier-move number applied
    group: str = ""
    kv_format: str = "exact"  # how the KV is stored ("exact", "fp8", "int4", "keep:0.3"): priced by its bytes
    kv_bytes: int = 0  # its stored tokens' bytes in its format, over every rank (0: not known, priced as exact)
    exact_bytes: int = 0  # what the same tokens take in the exact format

    @classmethod
    def from_redis(cls, h: dict) -> "Interval | None":
        if not h:
            return None
        g = {k.decode(): v.decode() for k, v in h.items()}
        return cls(g["tenant"], g["tier"], int(g["tokens"]), g["retention"], int(g["since"]), g["seq"],
                   int(g.get("move", "0")), g.get("group", ""), g.get("kv_format", "exact"),
                   int(g.get("kv_bytes", "0")), int(g.get("exact_bytes", "0")))

    def state(self) -> dict:
        return {"tenant": self.tenant, "tier": self.tier, "tokens": str(self.tokens), "retention": self.retention,
                "move": str(self.move), "group": self.group, "kv_format": self.kv_format,
                "kv_bytes": str(self.kv_bytes), "exact_bytes": str(self.exact_bytes)}

    def stored(self, kv_format: str | None, kv_bytes: int | None, exact_bytes: int | None) -> "Interval":
        """The interval with the session's stored form as a group last reported it (None: unchanged)."""
        if kv_format is not None:
            self.kv_format = kv_format
        if kv_bytes is not None and exact_bytes is not None:
            self.kv_bytes, self.exact_bytes = kv_bytes, exact_bytes
        return self


def _ms(t: float) -> int:
    return int(round(t * 1000))


def _day(ms: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(ms / 1000))


class Crash(RuntimeError):
    """Raised by a fault hook in tests to stop the meter between two steps."""


class Ledger:
    """The meter and the ledger. Stateless between calls: any number of Gateway replicas may share it.

    clock: wall-clock seconds (inject a fake one in tests); fault: called with the name of each step
    ("read", "write", "written") so tests can stop the meter between any two of them.
    """

    def __init__(self, url: str, rates: Rates = Rates(), *, clock: Callable[[], float] = time.time,
                 fault: Callable[[str], None] | None = None, client: redis.Redis | None = None,
                 on_metered: Callable[[str, int], None] | None = None):
        self.rates, self.clock, self.fault = rates, clock, fault or (lambda step: None)
        self.on_metered = on_metered or (lambda tier, token_ms: None)  # (tier, token_ms) per record written
        self.client = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                                     health_check_interval=10)
        self._apply = self.client.register_script(_APPLY)

    # ------------------------------------------------------------------------------ keys

    @staticmethod
    def _keys(sid: str, tenant: str) -> list[str]:
        return [f"{P}open:{sid}", f"{P}ev:{sid}", f"{P}agg:s:{sid}", f"{P}agg:t:{tenant}", f"{P}recs:{tenant}",
                f"{P}open", f"{P}open:t:{tenant}"]

    def _read(self, sid: str) -> Interval | None:
        return Interval.from_redis(self.client.hgetall(f"{P}open:{sid}"))

    # ------------------------------------------------------------------------------ records

    def _retention_records(self, sid: str, iv: Interval, end: int, event: str = "") -> list[dict]:
        """The records closing [iv.since, end): one per clock hour it touches, numbered on from the
        interval's seq (event: the id of the event closing it; given, the records are encoded)."""
        out, t, n = [], iv.since, int(iv.seq or 0)
        while t < end:
            stop = min(end, (t // HOUR_MS + 1) * HOUR_MS)
            token_ms = iv.tokens * (stop - t)
            nanos = self.rates.retention_nanos(iv.retention, iv.tier, token_ms, iv.kv_bytes, iv.exact_bytes)
            rec = {"kind": "retention", "session": sid, "tenant": iv.tenant, "tier": iv.tier,
                   "class": iv.retention, "start": t, "end": stop, "tokens": iv.tokens, "token_ms": token_ms,
                   "nanos": nanos, "group": iv.group, "kv_format": iv.kv_format, "stored_kv_bytes": iv.kv_bytes,
                   "exact_kv_bytes": iv.exact_bytes}
            wire = None
            if event:
                rec["id"], rec["event"] = f"{sid}:r{n}", f"{sid}:{event}"
                wire = ["r", t, json.dumps(rec), f"{P}agg:d:{iv.tenant}:{_day(t)}", 2,
                        f"tms:{iv.tier}", token_ms, "retention_nanos", nanos]
            out.append({"rec": rec, "wire": wire})
            t, n = stop, n + 1
        return out

    def _compute_record(self, sid: str, tenant: str, t: int, prefill: int, cached: int, generated: int,
                        event: str) -> dict:
        nanos = self.rates.compute_nanos(prefill, cached, generated)
        rec = {"id": "@ID@", "event": f"{sid}:{event}", "kind": "compute", "session": sid, "tenant": tenant,
               "start": t, "end": t, "prefill_tokens": prefill, "cached_tokens": cached,
               "generated_tokens": generated, "nanos": nanos}
        return {"rec": rec, "wire": ["c", t, json.dumps(rec), f"{P}agg:d:{tenant}:{_day(t)}", 4,
                                     "prefill_tokens", prefill, "cached_tokens", cached,
                                     "generated_tokens", generated, "compute_nanos", nanos]}

    def _args(self, sid: str, event: str, expect: str, mode: str, records: list[dict], *, since: int | None = None,
              tenant: str = "", state: dict | None = None) -> list:
        args = [f"{sid}:{event}", expect, sid, mode, "" if since is None else since, tenant, EVENTS_TTL_S,
                len(state or {})]
        for k, v in (state or {}).items():
            args += [k, v]
        args.append(len(records))
        for r in records:
            args += r["wire"]
        return args

    def _write(self, sid: str, owner: str, event: str, expect: str, mode: str, records: list[dict], **kw) -> str:
        """Apply one event (owner: the session's tenant, naming its keys)."""
        args = self._args(sid, event, expect, mode, records, **kw)
        self.fault("write")
        out = self._apply(keys=self._keys(sid, owner), args=args)
        self.fault("written")
        return out.decode() if isinstance(out, bytes) else out

    def _change(self, sid: str, event: str, t: float, update: Callable[[Interval], Interval | None],
                compute: tuple[int, int, int] | None = None, tenant: str | None = None) -> str:
        """Close the open interval at t and open update(interval) (None: close for good). Returns
        'ok', 'dup' (already applied) or 'none' (no interval open)."""
        for _ in range(8):
            iv = self._read(sid)
            self.fault("read")
            if iv is None:
                if compute and tenant:  # a request on a session that just closed: still bill its tokens
                    return self._write(sid, tenant, event, "*", "keep",
                                       [self._compute_record(sid, tenant, _ms(t), *compute, event)])
                return "none"
            end = max(iv.since, _ms(t))  # never bill backwards: a late event applies at the watermark
            records = self._retention_records(sid, iv, end, event)
            if compute:
                records.append(self._compute_record(sid, iv.tenant, end, *compute, event))
            nxt = update(Interval(**{**iv.__dict__}))
            if nxt is None:
                out = self._write(sid, iv.tenant, event, iv.seq, "close", records, since=end)
            else:
                out = self._write(sid, iv.tenant, event, iv.seq, "set", records, since=end, state=nxt.state())
            if out == "ok":
                self._metered(records)
            if out != "stale":
                return out
        raise RuntimeError(f"billing interval of {sid} kept changing under the meter; retry")

    # ------------------------------------------------------------------------------ events

    def open(self, sid: str, tenant: str, *, t: float, tier: str, tokens: int, retention: str, group: str = "",
             prefill_tokens: int = 0, move: int = 0, kv_format: str = "exact", kv_bytes: int = 0,
             exact_bytes: int = 0) -> str:
        """Start metering a new session at t (its creation commit), billing its prefill. kv_format,
        kv_bytes, exact_bytes: its stored form, which prices its retention (rate x kv_bytes / exact_bytes)."""
        self.check_size(tokens)
        tier = Tier.parse(tier).api
        ms = _ms(t)
        iv = Interval(tenant, tier, tokens, retention, ms, "", move, group, kv_format, kv_bytes, exact_bytes)
        records = [self._compute_record(sid, tenant, ms, prefill_tokens, 0, 0, "create")] if prefill_tokens else []
        self.fault("read")
        out = self._write(sid, tenant, "create", "", "set", records, since=ms, tenant=tenant, state=iv.state())
        return "exists" if out == "stale" else out

    def check_size(self, tokens: int) -> None:
        if tokens < self.rates.min_session_tokens:
            raise BelowMinimum(f"a session must retain at least {self.rates.min_session_tokens} tokens "
                               f"(billing.min_session_tokens); this one has {tokens}")

    def resize(self, sid: str, event: str, *, t: float, tokens: int, compute: tuple[int, int, int] | None = None,
               tenant: str | None = None, kv_bytes: int | None = None, exact_bytes: int | None = None):
        """The session now holds `tokens` (an append or a retained turn), billing `compute`
        (prefill, cached, generated tokens) with it — even if the session was closed meanwhile, when
        its tenant is given. Sessions never shrink: a resize to fewer tokens than the open interval
        holds (a late, out-of-order event) changes nothing and returns 'same' (its compute, if any, is
        still billed). kv_bytes, exact_bytes: the session's stored bytes after it grew, when known (a
        KEEP session's ratio rises with every exact turn)."""
        if compute is None:
            iv = self._read(sid)
            if iv is not None and iv.tokens >= tokens:
                return "same"

        def up(iv):
            if tokens > iv.tokens:
                iv.stored(None, kv_bytes, exact_bytes)
            iv.tokens = max(iv.tokens, tokens)
            return iv
        return self._change(sid, event, t, up, compute, tenant)

    def set_format(self, sid: str, event: str, *, t: float, kv_format: str, kv_bytes: int, exact_bytes: int) -> str:
        """The session is stored in a new (smaller) form from t: the interval closes at the old price
        and reopens at the new one."""
        return self._change(sid, event, t, lambda iv: iv.stored(kv_format, kv_bytes, exact_bytes))

    def set_retention(self, sid: str, event: str, *, t: float, retention: str | None = None) -> str:
        """Close the interval at t (an extension), changing the retention class if given."""
        def up(iv):
            if retention:
                iv.retention = retention
            return iv
        return self._change(sid, event, t, up)

    def move(self, sid: str, number: int, *, t: float, tier: str) -> str:
        """The session's KV moved to `tier` at t; `number` is the store's move number, so moves
        already applied (or older than the last applied) are ignored."""
        return "ok" if self.observe(sid, [(number, t, tier)]) else "dup"

    def observe(self, sid: str, moves: Iterable[tuple[int, float, str]]) -> int:
        """Apply a store's tier history [(number, wall time, tier)], oldest first; returns moves applied.
        One read tells which moves are new; only those are written (the meter passes every session's
        whole history each round, and most of it has been applied before)."""
        iv = self._read(sid)
        if iv is None:
            return 0
        applied = 0
        for number, t, tier in moves:
            if number <= iv.move:
                continue

            def up(cur, number=number, tier=Tier.parse(tier).api):
                if number > cur.move:  # re-checked against the interval the write is based on
                    cur.move, cur.tier = number, tier
                return cur
            applied += self._change(sid, f"move:{number}", t, up) == "ok"
        return applied

    def close(self, sid: str, *, t: float, compute: tuple[int, int, int] | None = None) -> str:
        """Stop metering at t: the delete's commit time, or the expiry time."""
        return self._change(sid, "close", t, lambda iv: None, compute)

    def charge(self, sid: str, tenant: str, event: str, *, t: float, prefill: int = 0, cached: int = 0,
               generated: int = 0) -> int:
        """Bill one request's tokens (no change to retention). Returns its cost in nano-units."""
        self.fault("read")
        rec = self._compute_record(sid, tenant, _ms(t), prefill, cached, generated, event)
        self._write(sid, tenant, event, "*", "keep", [rec], tenant=tenant)
        return rec["rec"]["nanos"]

    def applied(self, sid: str, event: str) -> bool:
        """Whether the session's event was applied (kept 35 days after the session closed)."""
        return bool(self.client.sismember(f"{P}ev:{sid}", f"{sid}:{event}"))

    def close_hours(self, now: float | None = None, batch: int = 1000) -> int:
        """The periodic pass: close every open interval that started before the last hour boundary at
        that boundary. Pipelined, and batch i+1 is read and priced while batch i's writes run in
        Redis; returns the number of intervals closed."""
        now = self.clock() if now is None else now
        boundary = (_ms(now) // HOUR_MS) * HOUR_MS
        sids = [s.decode() for s in self.client.zrangebyscore(f"{P}open", "-inf", f"({boundary}")]
        done, pending = 0, None
        with ThreadPoolExecutor(1, thread_name_prefix="ringserve-meter-write") as writer:
            for i in range(0, len(sids), batch):
                part = sids[i:i + batch]
                pipe = self.client.pipeline(transaction=False)
                for sid in part:
                    pipe.hgetall(f"{P}open:{sid}")
                states = pipe.execute()
                self.fault("read")
                pipe = self.client.pipeline(transaction=False)
                sent = []
                for sid, h in zip(part, states):
                    iv = Interval.from_redis(h)
                    if iv is None or iv.since >= boundary:
                        continue
                    event = f"hour:{boundary}"
                    args = self._args(sid, event, iv.seq, "set", self._retention_records(sid, iv, boundary, event),
                                      since=boundary)
                    self._apply(keys=self._keys(sid, iv.tenant), args=args, client=pipe)
                    sent.append((sid, iv.tier, iv.tokens * (boundary - iv.since)))
                if pending is not None:
                    done += self._settle_hours(*pending, boundary)
                self.fault("write")
                pending = (writer.submit(pipe.execute, raise_on_error=False), sent)
            if pending is not None:
                done += self._settle_hours(*pending, boundary)
        return done

    def _settle_hours(self, future, sent: list[str], boundary: int) -> int:
        results = future.result()
        self.fault("written")
        done = 0
        for (sid, tier, token_ms), r in zip(sent, results):
            r = r.decode() if isinstance(r, bytes) else r
            if r == "stale":  # an event moved it meanwhile: redo this one alone
                r = self._change(sid, f"hour:{boundary}", boundary / 1000, lambda iv: iv)
            elif r == "ok":
                self.on_metered(tier, token_ms)
            if isinstance(r, Exception):
                raise r
            done += r == "ok"
        return done

    def _metered(self, records: list[dict]) -> None:
        for r in records:
            if r["rec"]["kind"] == "retention":
                self.on_metered(r["rec"]["tier"], r["rec"]["token_ms"])

    # ------------------------------------------------------------------------------ reading

    def session_usage(self, sid: str, now: float | None = None) -> dict:
        """What the session has accrued: token_seconds per tier, retention and compute cost, and the
        instant it covers (now, for a live session: the open interval is included as accrued so far)."""
        return self.sessions_usage([sid], now)[sid]

    def sessions_usage(self, sids: list[str], now: float | None = None) -> dict[str, dict]:
        """session_usage of many sessions, read in one MULTI/EXEC so that each aggregate and its open
        interval come from the same instant (no event can fall between the two reads)."""
        now_ms = _ms(self.clock() if now is None else now)
        pipe = self.client.pipeline(transaction=True)
        for sid in sids:
            pipe.hgetall(f"{P}agg:s:{sid}")
            pipe.hgetall(f"{P}open:{sid}")
        raw = pipe.execute() if sids else []
        out = {}
        for i, sid in enumerate(sids):
            agg = {k.decode(): int(v) for k, v in raw[2 * i].items() if k.decode() != "tenant"}
            iv = Interval.from_redis(raw[2 * i + 1])
            tms = {t: agg.get(f"tms:{t}", 0) for t in TIERS}
            ret = agg.get("retention_nanos", 0)
            through = agg.get("billed_through", 0)
            if iv is not None and now_ms > iv.since:
                for r in self._retention_records(sid, iv, now_ms):
                    tms[iv.tier] += r["rec"]["token_ms"]
                    ret += r["rec"]["nanos"]
                through = now_ms
            out[sid] = {"token_seconds": {t: v / 1000 for t, v in tms.items()}, "retention_nanos": ret,
                        "compute_nanos": agg.get("compute_nanos", 0), "billed_through": through / 1000,
                        "currency": self.rates.currency, "open": iv is not None}
        return out

    def session_tenant(self, sid: str) -> str | None:
        """The tenant a metered session belongs to (kept after it is deleted), or None."""
        t = self.client.hget(f"{P}agg:s:{sid}", "tenant")
        return t.decode() if t else None

    def tenant_totals(self, tenant: str) -> dict:
        return {k.decode(): int(v) for k, v in self.client.hgetall(f"{P}agg:t:{tenant}").items()}

    def records(self, tenant: str, start: float, end: float, session: str | None = None) -> list[dict]:
        """Closed records of the tenant whose start lies in [start, end), oldest first."""
        raw = self.client.zrangebyscore(f"{P}recs:{tenant}", _ms(start), f"({_ms(end)}")
        recs = [json.loads(r) for r in raw]
        if session:
            recs = [r for r in recs if r["session"] == session]
        return sorted(recs, key=lambda r: (r["start"], r["id"]))

    def usage(self, tenant: str, start: float, end: float, group_by: str = "session",
              session: str | None = None, now: float | None = None) -> dict:
        """Line items and totals of the tenant's usage in [start, end). Closed records are attributed
        to the hour they lie in; live sessions' open intervals are added as accrued up to now, and
        counted apart in `accruing_nanos`."""
        now = self.clock() if now is None else now
        self.check_range(start, end)
        if group_by not in GROUP_BY:
            raise BillingError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
        recs = self.records(tenant, start, end, session)
        accruing = []
        live = sorted(s.decode() for s in self.client.smembers(f"{P}open:t:{tenant}"))
        live = [sid for sid in live if not session or sid == session]
        pipe = self.client.pipeline(transaction=False)
        for sid in live:
            pipe.hgetall(f"{P}open:{sid}")
        for sid, h in zip(live, pipe.execute() if live else []):
            iv = Interval.from_redis(h)
            if iv is None:
                continue
            lo, hi = max(iv.since, _ms(start)), min(_ms(now), _ms(end))
            if hi > lo:
                part = Interval(**{**iv.__dict__, "since": lo})
                accruing += [r["rec"] for r in self._retention_records(sid, part, hi)]
        items: dict[str, dict] = {}
        total = _line("total")
        for r in recs + accruing:
            key = {"session": r["session"], "tier": r.get("tier", "compute"), "day": _day(r["start"]),
                   "kv_format": r.get("kv_format", "exact") if r["kind"] == "retention" else "compute"}[group_by]
            for line in (items.setdefault(key, _line(key)), total):
                _add(line, r)
        return {"tenant": tenant, "start": start, "end": end, "group_by": group_by, "currency": self.rates.currency,
                "line_items": [items[k] for k in sorted(items)], "total": total,
                "accruing_nanos": sum(r["nanos"] for r in accruing), "records": len(recs)}

    @staticmethod
    def check_range(start: float, end: float) -> None:
        if end <= start:
            raise BillingError("end_time must be after start_time")
        if end - start > MAX_RANGE_S:
            raise BillingError(f"a usage query spans at most {MAX_RANGE_S // 86400} days; "
                               f"this one spans {(end - start) / 86400:.1f}: split it")

    def export(self, tenant: str, start: float, end: float, fmt: str = "jsonl", *, batch: int = 500,
               session: str | None = None) -> Iterator[str]:
        """The tenant's records in [start, end) as text chunks of CSV (with a header) or JSON lines."""
        self.check_range(start, end)
        if fmt not in ("csv", "jsonl"):
            raise BillingError(f"format must be csv or jsonl, got {fmt!r}")
        recs = self.records(tenant, start, end, session)
        cols = ["id", "event", "tenant", "session", "kind", "tier", "class", "start", "end", "tokens", "token_ms",
                "kv_format", "stored_kv_bytes", "exact_kv_bytes", "prefill_tokens", "cached_tokens", "generated_tokens",
                "nanos", "amount", "currency"]
        if fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf).writerow(cols)
            yield buf.getvalue()
        for i in range(0, len(recs), batch):
            buf = io.StringIO()
            w = csv.writer(buf)
            for r in recs[i:i + batch]:
                row = {**r, "amount": f"{Decimal(r['nanos']) / Decimal(10**9):f}", "currency": self.rates.currency,
                       "start": _iso(r["start"]), "end": _iso(r["end"])}
                if fmt == "csv":
                    w.writerow([row.get(c, "") for c in cols])
                else:
                    buf.write(json.dumps({c: row[c] for c in cols if c in row}, sort_keys=True) + "\n")
            yield buf.getvalue()

    # ------------------------------------------------------------------------------ reconciliation

    def open_sessions(self) -> dict[str, float]:
        return {s.decode(): score / 1000 for s, score in self.client.zrange(f"{P}open", 0, -1, withscores=True)}

    def reconcile(self, live: dict[str, str]) -> dict:
        """Compare live sessions (id -> state: "creating" | "ready") with open intervals. Returns
        {"unmetered": ids of ready sessions nobody meters, "orphaned": ids metered but no longer
        existing}; logs each. A session still being created may or may not be metered yet."""
        opened = set(self.open_sessions())
        ready = {s for s, st in live.items() if st == "ready"}
        unmetered = sorted(ready - opened)
        orphaned = sorted(opened - set(live))
        for sid in unmetered:
            log.error("billing reconciliation: session %s is live but its retention is not metered", sid)
        for sid in orphaned:
            log.error("billing reconciliation: an interval is open for session %s, which no longer exists", sid)
        return {"unmetered": unmetered, "orphaned": orphaned}


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _line(key: str) -> dict:
    return {"key": key, "token_ms": {t: 0 for t in TIERS}, "prefill_tokens": 0, "cached_tokens": 0,
            "generated_tokens": 0, "retention_nanos": 0, "compute_nanos": 0, "records": 0}


def _add(line: dict, r: dict) -> None:
    line["records"] += 1
    if r["kind"] == "retention":
        line["token_ms"][r["tier"]] += r["token_ms"]
        line["retention_nanos"] += r["nanos"]
    else:
        for k in ("prefill_tokens", "cached_tokens", "generated_tokens"):
            line[k] += r[k]
        line["compute_nanos"] += r["nanos"]
