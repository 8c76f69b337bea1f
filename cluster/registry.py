"""The session registry in Redis: the source of truth for session records, so Gateway replicas are
stateless.

Keys (all under "ringserve:"):
    sess:{id}                  JSON record of one session
    tenant:{tenant}:sessions   sorted set of the tenant's session ids, by create time
    tenant:{tenant}:tokens     tokens retained over the tenant's sessions (for the limit)
    expiry                     sorted set of every session id by expire time (the sweeper reads it)
    req:{tenant}:{request_id}  session id created by that idempotency key
Creating a record checks the tenant's limits and reserves its tokens in one Lua script, so two
concurrent creates cannot both slip under a limit.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import redis

P = "ringserve:"

_CREATE = """
-- KEYS: sess, tenant sessions, tenant tokens, expiry, request key ("" if none)
-- ARGV: id, record json, create_time, expire_time, tokens, max_sessions, max_tokens, req ttl
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
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[8]) end
return {'ok', ''}
"""

_DELETE = """
-- KEYS: sess, tenant sessions, tenant tokens, expiry ; ARGV: id
local rec = redis.call('GET', KEYS[1])
if not rec then return 0 end
local size = cjson.decode(rec)['size_tokens'] or 0
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local left = redis.call('DECRBY', KEYS[3], size)
if left <= 0 then redis.call('DEL', KEYS[3]) end
return 1
"""


class LimitExceeded(Exception):
    """A tenant limit would be exceeded (RESOURCE_EXHAUSTED)."""


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
    state: str = "creating"  # creating | ready
    kv_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> "SessionRecord":
        return cls(**json.loads(s))


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


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

    def _keys(self, rec_id: str, tenant: str) -> list[str]:
        return [f"{P}sess:{rec_id}", f"{P}tenant:{tenant}:sessions", f"{P}tenant:{tenant}:tokens", f"{P}expiry"]

    def create(self, rec: SessionRecord, *, max_sessions: int, max_tokens: int, request_id: str = "") -> SessionRecord:
        """Store a new record after checking the tenant's limits; with a request_id already used,
        returns the record created then instead."""
        req = f"{P}req:{rec.tenant}:{request_id}" if request_id else ""
        status, info = self._create(
            keys=self._keys(rec.id, rec.tenant) + [req],
            args=[rec.id, rec.to_json(), rec.create_time, rec.expire_time, rec.size_tokens, max_sessions,
                  max_tokens, 86400])
        status, info = status.decode(), info.decode()
        if status == "dup":
            prior = self.get(info)
            if prior is None:
                raise LimitExceeded(f"request_id {request_id!r} was used for a session that no longer exists")
            return prior
        if status == "sessions":
            raise LimitExceeded(f"tenant {rec.tenant!r} already holds {max_sessions} sessions, its limit; "
                                "delete one or raise limits.max_sessions")
        if status == "tokens":
            raise LimitExceeded(f"tenant {rec.tenant!r} retains {info} tokens; {rec.size_tokens} more would "
                                f"exceed its limit of {max_tokens}")
        return rec

    def get(self, rec_id: str) -> SessionRecord | None:
        raw = self.client.get(f"{P}sess:{rec_id}")
        return SessionRecord.from_json(raw) if raw else None

    def put(self, rec: SessionRecord, *, size_delta: int = 0) -> None:
        """Rewrite a record (state, size, expiry, group) and keep the indexes in step."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(f"{P}sess:{rec.id}", rec.to_json())
        pipe.zadd(f"{P}expiry", {rec.id: rec.expire_time})
        if size_delta:
            pipe.incrby(f"{P}tenant:{rec.tenant}:tokens", size_delta)
        pipe.execute()

    def delete(self, rec: SessionRecord) -> bool:
        return bool(self._delete(keys=self._keys(rec.id, rec.tenant), args=[rec.id]))

    def list(self, tenant: str, *, offset: int, count: int) -> tuple[list[SessionRecord], bool]:
        """Newest first; returns (records, more)."""
        ids = self.client.zrevrange(f"{P}tenant:{tenant}:sessions", offset, offset + count)
        recs = [r for r in (self.get(i.decode()) for i in ids[:count]) if r is not None]
        return recs, len(ids) > count

    def expired(self, now: float | None = None, limit: int = 100) -> list[SessionRecord]:
        now = self.clock() if now is None else now
        ids = self.client.zrangebyscore(f"{P}expiry", "-inf", now, start=0, num=limit)
        return [r for r in (self.get(i.decode()) for i in ids) if r is not None]

    def states(self) -> dict[str, str]:
        """Every live session's id and state ("creating" | "ready"), over all tenants."""
        ids = [i.decode() for i in self.client.zrange(f"{P}expiry", 0, -1)]
        out = {}
        for i in range(0, len(ids), 1000):
            part = ids[i:i + 1000]
            pipe = self.client.pipeline(transaction=False)
            for sid in part:
                pipe.get(f"{P}sess:{sid}")
            for sid, raw in zip(part, pipe.execute()):
                if raw:
                    out[sid] = json.loads(raw).get("state", "ready")
        return out

    def count(self) -> int:
        return self.client.zcard(f"{P}expiry")
