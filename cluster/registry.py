"""The session registry in Redis: the source of truth for session records, so Gateway replicas are
stateless.

Keys (all under "ringserve:"):
    sess:{id}                  JSON record of one session (carries a version, see below)
    tenant:{tenant}:sessions   sorted set of the tenant's session ids, by create time
    tenant:{tenant}:tokens     tokens counted against the tenant's limit: its sessions' sizes plus the
                               growth reserved by appends and retained turns in flight
    tenant:{tenant}:resv       hash: reservation id -> "tokens|deadline" (those in flight)
    resv                       sorted set of "tenant\\0reservation id" by deadline (expired ones are freed)
    expiry                     sorted set of every session id by expire time (the sweeper reads it)
    req:{tenant}:{request_id}  "session id|content hash" of the create made with that idempotency key
    idem:{tenant}:{request_id} hash: an append's or retained turn's idempotency record (state pending |
                               done, the content hash, the attempt's bill id, the result)

Every write is one Lua script, so a record and its indexes and counters change together:
  * create checks the tenant's limits and reserves its tokens (two concurrent creates cannot both slip
    under a limit); with a request_id already used it returns the earlier session (same content) or
    says the key was reused for other content;
  * updates are compare-and-set on the record's `version` (a stale writer gets `Conflict` and re-reads);
  * growth (an append, a retained turn) only ever raises `size_tokens` (sessions never shrink), settles
    the request's reservation in the same script, and never writes a record that is gone — a delete
    wins over anything in flight: nothing revives a deleted session, and its tokens are subtracted once.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import redis

P = "ringserve:"

_CREATE = """
-- KEYS: sess, tenant sessions, tenant tokens, expiry, request key ("" if none)
-- ARGV: id, record json, create_time, expire_time, tokens, max_sessions, max_tokens, req ttl, content hash
if KEYS[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return {'dup', prior} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return {'sessions', ''} end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + tonumber(ARGV[5]) > tonumber(ARGV[7]) then return {'tokens', tostring(used)} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('INCRBY', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1] .. '|' .. ARGV[9], 'EX', ARGV[8]) end
return {'ok', ''}
"""

_DELETE = """
-- KEYS: sess, tenant sessions, tenant tokens, expiry ; ARGV: id
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
local size = rec['size_tokens'] or 0
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local left = redis.call('DECRBY', KEYS[3], size)
if left <= 0 then redis.call('DEL', KEYS[3]) end
-- a create that never finished frees its idempotency key, so a retry runs again
if rec['state'] == 'creating' and rec['request_key'] and rec['request_key'] ~= '' then
  redis.call('DEL', rec['request_key'])
end
return 1
"""

_UPDATE = """
-- KEYS: sess, tenant tokens, expiry ; ARGV: expected version, new record json, expire time
local raw = redis.call('GET', KEYS[1])
if not raw then return 'gone' end
local rec = cjson.decode(raw)
if tostring(rec['version'] or 0) ~= ARGV[1] then return 'conflict' end
local new = cjson.decode(ARGV[2])
local delta = (new['size_tokens'] or 0) - (rec['size_tokens'] or 0)
if delta ~= 0 then redis.call('INCRBY', KEYS[2], delta) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], cjson.decode(ARGV[2])['id'])
return 'ok'
"""

_GROW = """
-- KEYS: sess, tenant tokens, tenant reservations, reservation index
-- ARGV: reservation id ("" if none), new length, now, "tenant\\0rid"
local held = 0
if ARGV[1] ~= '' then
  local r = redis.call('HGET', KEYS[3], ARGV[1])
  if r then
    held = tonumber(string.match(r, '^(%d+)'))
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[4], ARGV[4])
  end
end
local raw = redis.call('GET', KEYS[1])
local delta, out = 0, 'gone'
if raw then
  out = 'ok'
  local rec = cjson.decode(raw)
  local n = tonumber(ARGV[2])
  if n > (rec['size_tokens'] or 0) then
    delta = n - rec['size_tokens']
    rec['size_tokens'] = n
    rec['version'] = (rec['version'] or 0) + 1
    rec['update_time'] = tonumber(ARGV[3])
    redis.call('SET', KEYS[1], cjson.encode(rec))
  end
end
local net = delta - held
if net ~= 0 then
  local left = redis.call('INCRBY', KEYS[2], net)
  if left <= 0 then redis.call('DEL', KEYS[2]) end
end
return {out, delta}
"""

_RESERVE = """
-- KEYS: tenant tokens, tenant reservations, reservation index ; ARGV: rid, tokens, max, deadline, "tenant\\0rid"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'ok', ''} end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return {'tokens', tostring(used)} end
redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return {'ok', ''}
"""

_RELEASE = """
-- KEYS: tenant tokens, tenant reservations, reservation index ; ARGV: rid, "tenant\\0rid"
local r = redis.call('HGET', KEYS[2], ARGV[1])
if not r then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local left = redis.call('DECRBY', KEYS[1], tonumber(string.match(r, '^(%d+)')))
if left <= 0 then redis.call('DEL', KEYS[1]) end
return 1
"""

_IDEM_BEGIN = """
-- KEYS: idem ; ARGV: kind, session, content hash, bill id, group, ttl, takeover bill ("" = only if absent)
local cur = redis.call('HGETALL', KEYS[1])
if #cur > 0 then
  local h = {}
  for i = 1, #cur, 2 do h[cur[i]] = cur[i + 1] end
  if h['kind'] ~= ARGV[1] or h['session'] ~= ARGV[2] or h['hash'] ~= ARGV[3] then return {'mismatch', '', ''} end
  if h['state'] == 'done' then return {'done', h['result'] or '', ''} end
  if ARGV[7] == '' or h['bill'] ~= ARGV[7] then return {'pending', h['bill'] or '', h['group'] or ''} end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'session', ARGV[2], 'hash', ARGV[3], 'state', 'pending',
           'bill', ARGV[4], 'group', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {'new', '', ''}
"""

_IDEM_END = """
-- KEYS: idem ; ARGV: bill id, "done" | "release", result json
if redis.call('HGET', KEYS[1], 'bill') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
if ARGV[2] == 'release' then redis.call('DEL', KEYS[1]) return 1 end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[3])
return 1
"""


class LimitExceeded(Exception):
    """A tenant limit would be exceeded (RESOURCE_EXHAUSTED)."""


class Conflict(Exception):
    """A record changed under a compare-and-set writer too many times in a row (ABORTED)."""


class KeyReused(ValueError):
    """A request_id was used before for a request with other content (INVALID_ARGUMENT)."""


@dataclass
class SessionRecord:
    id: str
    tenant: str
    group: str
    size_tokens: int
    create_time: float
    expire_time: float
    update_time: float
    retention: str = "standard"
    persist: str = "on_demote"
    display_name: str = ""
    allow_quantized_kv: bool = False
    kv_format: str = "exact"  # how its KV is stored: "exact", "fp8", "int4", "keep:<fraction>" (KVFormat)
    state: str = "creating"  # creating | ready | lost
    kv_bytes: int = 0
    version: int = 0  # raised by every write; writes are compare-and-set on it
    lost: str = ""  # state "lost": why (its KV is gone: no copy in Redis, or the copy failed its checks)
    request_key: str = ""  # the idempotency key of its create, freed if the create never finishes
    ttl_s: float = 0.0  # created with a ttl (or the default): expire_time = ready + ttl_s; 0: an absolute expire_time

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> "SessionRecord":
        d = json.loads(s)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


@dataclass(frozen=True)
class Idem:
    """The state of an idempotency key at `begin`: "new" (this attempt runs), "done" (replay `result`),
    "pending" (attempt `bill` on `group` has not settled)."""

    state: str
    result: dict | None = None
    bill: str = ""
    group: str = ""


@dataclass
class Registry:
    url: str
    clock: Callable[[], float] = time.time
    client: redis.Redis = field(init=False)

    def __post_init__(self):
        self.client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2,
                                           health_check_interval=10)
        self._create = self.client.register_script(_CREATE)
        self._delete = self.client.register_script(_DELETE)
        self._update = self.client.register_script(_UPDATE)
        self._grow = self.client.register_script(_GROW)
        self._reserve = self.client.register_script(_RESERVE)
        self._release = self.client.register_script(_RELEASE)
        self._idem_begin = self.client.register_script(_IDEM_BEGIN)
        self._idem_end = self.client.register_script(_IDEM_END)

    def _keys(self, rec_id: str, tenant: str) -> list[str]:
        return [f"{P}sess:{rec_id}", f"{P}tenant:{tenant}:sessions", f"{P}tenant:{tenant}:tokens", f"{P}expiry"]

    # -- records ---------------------------------------------------------------------------------------

    def create(self, rec: SessionRecord, *, max_sessions: int, max_tokens: int, request_id: str = "",
               content_hash: str = "") -> SessionRecord:
        """Store a new record after checking the tenant's limits. With a request_id already used, returns
        the record created then (whatever its state) if the content is the same; raises KeyReused if it
        is not, and LimitExceeded if that session is gone."""
        req = f"{P}req:{rec.tenant}:{request_id}" if request_id else ""
        rec.request_key = req
        status, info = self._create(
            keys=self._keys(rec.id, rec.tenant) + [req],
            args=[rec.id, rec.to_json(), rec.create_time, rec.expire_time, rec.size_tokens, max_sessions,
                  max_tokens, 86400, content_hash])
        status, info = status.decode(), info.decode()
        if status == "dup":
            prior_id, _, prior_hash = info.partition("|")
            if prior_hash != content_hash:
                raise KeyReused(f"request_id {request_id!r} was used for a create with other content; "
                                "use a new request_id for a new request")
            prior = self.get(prior_id)
            if prior is None:
                raise KeyReused(f"request_id {request_id!r} created session {prior_id}, which has been deleted since; "
                                "use a new request_id to create another")
            return prior
        if status == "sessions":
            raise LimitExceeded(f"your tenant already holds {max_sessions} sessions, its limit; "
                                "delete one or raise limits.max_sessions")
        if status == "tokens":
            raise LimitExceeded(f"your tenant retains {info} tokens; {rec.size_tokens} more would "
                                f"exceed its limit of {max_tokens}")
        return rec

    def get(self, rec_id: str) -> SessionRecord | None:
        raw = self.client.get(f"{P}sess:{rec_id}")
        return SessionRecord.from_json(raw) if raw else None

    def update(self, rec_id: str, change: Callable[[SessionRecord], None], *, tries: int = 8) -> SessionRecord | None:
        """Read, change (in place) and write back a record, compare-and-set on its version; retried when
        another writer came first. Returns the record written, or None if it is gone (deleted)."""
        for _ in range(tries):
            rec = self.get(rec_id)
            if rec is None:
                return None
            expected = rec.version
            change(rec)
            rec.version = expected + 1
            out = self._update(keys=[f"{P}sess:{rec.id}", f"{P}tenant:{rec.tenant}:tokens", f"{P}expiry"],
                               args=[expected, rec.to_json(), rec.expire_time])
            out = out.decode() if isinstance(out, bytes) else out
            if out == "ok":
                return rec
            if out == "gone":
                return None
        raise Conflict(f"session {rec_id} kept changing while it was being updated")

    def put(self, rec: SessionRecord, *, size_delta: int = 0) -> SessionRecord | None:
        """Write `rec` over the stored record if that is still the version `rec` was read at (size_delta
        is ignored: the script derives the change of the tenant's tokens from the two records). Returns
        the record written, None if it is gone; raises Conflict if it changed meanwhile."""
        expected = rec.version
        new = SessionRecord(**{**asdict(rec), "version": expected + 1})
        out = self._update(keys=[f"{P}sess:{rec.id}", f"{P}tenant:{rec.tenant}:tokens", f"{P}expiry"],
                           args=[expected, new.to_json(), new.expire_time])
        out = out.decode() if isinstance(out, bytes) else out
        if out == "conflict":
            raise Conflict(f"session {rec.id} changed while it was being updated")
        if out == "gone":
            return None
        rec.version = new.version
        return rec

    def grow(self, rec_id: str, tenant: str, length: int, reservation: str = "") -> bool:
        """The session now holds `length` tokens (an append or a retained turn finished): its record's size
        is raised to it (never lowered) and the request's reservation settled, in one script. False if the
        session is gone (the reservation is released all the same)."""
        out, _ = self._grow(keys=[f"{P}sess:{rec_id}", f"{P}tenant:{tenant}:tokens", f"{P}tenant:{tenant}:resv",
                                  f"{P}resv"],
                            args=[reservation, length, self.clock(), f"{tenant}\0{reservation}"])
        return out.decode() == "ok"

    def delete(self, rec: SessionRecord) -> bool:
        """Remove a record and its indexes; its tokens leave the tenant's count once (a second delete is a
        no-op returning False)."""
        return bool(self._delete(keys=self._keys(rec.id, rec.tenant), args=[rec.id]))

    # -- quota reservations ----------------------------------------------------------------------------

    def reserve(self, tenant: str, rid: str, tokens: int, *, max_tokens: int, ttl_s: float = 3600.0) -> None:
        """Count `tokens` more against the tenant's limit for a request that may grow a session (until
        `grow` or `release` settles it, or `ttl_s` passes); LimitExceeded if they do not fit."""
        status, info = self._reserve(
            keys=[f"{P}tenant:{tenant}:tokens", f"{P}tenant:{tenant}:resv", f"{P}resv"],
            args=[rid, tokens, max_tokens, self.clock() + ttl_s, f"{tenant}\0{rid}"])
        if status.decode() == "tokens":
            raise LimitExceeded(f"your tenant retains {info.decode()} tokens; {tokens} more (what this request may "
                                f"add to its session) would exceed its limit of {max_tokens}")

    def release(self, tenant: str, rid: str) -> bool:
        return bool(self._release(keys=[f"{P}tenant:{tenant}:tokens", f"{P}tenant:{tenant}:resv", f"{P}resv"],
                                  args=[rid, f"{tenant}\0{rid}"]))

    def release_expired(self, now: float | None = None) -> int:
        """Free the reservations of requests whose Gateway died before settling them."""
        now = self.clock() if now is None else now
        n = 0
        for member in self.client.zrangebyscore(f"{P}resv", "-inf", now, start=0, num=1000):
            tenant, _, rid = member.decode().partition("\0")
            n += self.release(tenant, rid)
            self.client.zrem(f"{P}resv", member)
        return n

    def tenant_tokens(self, tenant: str) -> int:
        return int(self.client.get(f"{P}tenant:{tenant}:tokens") or 0)

    # -- idempotency of appends and retained turns -----------------------------------------------------

    def _idem_key(self, tenant: str, request_id: str) -> str:
        return f"{P}idem:{tenant}:{request_id}"

    def idem_begin(self, tenant: str, request_id: str, *, kind: str, session: str, content_hash: str,
                   bill: str, group: str, ttl_s: float, takeover: str = "") -> Idem:
        """Claim an idempotency key for attempt `bill`. `takeover`: the bill id of a pending attempt known
        to have ended without settling; it is replaced. KeyReused if the key was used for other content."""
        state, a, b = self._idem_begin(keys=[self._idem_key(tenant, request_id)],
                                       args=[kind, session, content_hash, bill, group, int(ttl_s), takeover])
        state, a, b = state.decode(), a.decode(), b.decode()
        if state == "mismatch":
            raise KeyReused(f"request_id {request_id!r} was used for another request (other content, session or "
                            "method); use a new request_id for a new request")
        if state == "done":
            return Idem("done", json.loads(a) if a else {})
        if state == "pending":
            return Idem("pending", bill=a, group=b)
        return Idem("new")

    def idem_done(self, key: str, bill: str, result: dict) -> bool:
        return bool(self._idem_end(keys=[key], args=[bill, "done", json.dumps(result)]))

    def idem_release(self, key: str, bill: str) -> bool:
        return bool(self._idem_end(keys=[key], args=[bill, "release", ""]))

    def idem_key(self, tenant: str, request_id: str) -> str:
        return self._idem_key(tenant, request_id) if request_id else ""

    # -- reading ---------------------------------------------------------------------------------------

    def list(self, tenant: str, *, offset: int, count: int) -> tuple[list[SessionRecord], bool]:
        """Newest first; returns (records, more)."""
        ids = self.client.zrevrange(f"{P}tenant:{tenant}:sessions", offset, offset + count)
        recs = [r for r in (self.get(i.decode()) for i in ids[:count]) if r is not None]
        return recs, len(ids) > count

    def expired(self, now: float | None = None, limit: int = 100) -> list[SessionRecord]:
        now = self.clock() if now is None else now
        ids = self.client.zrangebyscore(f"{P}expiry", "-inf", now, start=0, num=limit)
        return [r for r in (self.get(i.decode()) for i in ids) if r is not None]

    def records(self) -> list[SessionRecord]:
        """Every live record, over all tenants (reconciliation)."""
        ids = [i.decode() for i in self.client.zrange(f"{P}expiry", 0, -1)]
        out = []
        for i in range(0, len(ids), 1000):
            pipe = self.client.pipeline(transaction=False)
            for sid in ids[i:i + 1000]:
                pipe.get(f"{P}sess:{sid}")
            out += [SessionRecord.from_json(raw) for raw in pipe.execute() if raw]
        return out

    def states(self) -> dict[str, str]:
        """Every live session's id and state ("creating" | "ready" | "lost"), over all tenants."""
        return {r.id: r.state for r in self.records()}

    def count(self) -> int:
        return self.client.zcard(f"{P}expiry")
