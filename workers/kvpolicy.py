"""Configuration and the pure policy of the KV tiers: which sessions move down, and when.

The tiers, fastest first: "device" (GPU HBM; CPU memory on a CPU-only node), "host" (pinned host
memory), "redis". Policy functions here take plain records and return decisions; `kvstore.KVStore`
carries them out. Nothing here touches tensors or Redis, so it is tested without either.

- Watermarks: when placing `need` bytes would take a tier above `high` x capacity, the least recently
  used movable sessions of that tier are demoted until it would sit at or below `low` x capacity.
  Capacity itself is a hard limit: the store never holds more bytes in a tier than its capacity.
- Idle time: a standard session untouched for `device_idle_s` leaves the device for the host; one
  untouched for `host_idle_s` leaves the host for Redis. A cold session goes to Redis after `cold_idle_s`.
- Retention classes: "hot" never leaves the device; "standard" is tiered; "cold" goes to Redis once idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

TIERS = ("device", "host", "redis")
RETENTIONS = ("hot", "standard", "cold")
PERSIST_MODES = ("on_demote", "write_through")


@dataclass(frozen=True)
class TierCapacity:
    """Bytes each tier may hold for this rank. redis=None: no limit of our own (Redis' maxmemory is)."""

    device: int
    host: int
    redis: int | None = None

    def __post_init__(self):
        for name in TIERS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"capacity of tier {name!r} must be a whole number of bytes >= 0, got {value!r}")

    def of(self, tier: str) -> float:
        value = getattr(self, tier)
        return float("inf") if value is None else value


@dataclass(frozen=True)
class Watermarks:
    """Fractions of a tier's capacity: above `high` after a placement, demote LRU down to `low`."""

    high: float = 0.9
    low: float = 0.7

    def __post_init__(self):
        if not 0 < self.low <= self.high <= 1:
            raise ValueError(f"watermarks need 0 < low <= high <= 1, got low={self.low}, high={self.high}")


@dataclass(frozen=True)
class IdlePolicy:
    """Seconds (of the store's clock) without access after which a session moves down a tier."""

    device_idle_s: float = 300.0  # standard: device -> host
    host_idle_s: float = 3600.0  # standard: host -> redis
    cold_idle_s: float = 60.0  # cold: any tier -> redis

    def __post_init__(self):
        for name in ("device_idle_s", "host_idle_s", "cold_idle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


@dataclass(frozen=True)
class Candidate:
    """What the policy needs to know about one session."""

    session: str
    tier: str
    nbytes: int
    last_access: float
    retention: str = "standard"


def lru_victims(candidates: Iterable[Candidate], *, used: int, need: int, capacity: float,
                marks: Watermarks) -> list[str]:
    """Sessions to demote, least recently used first, so that `need` more bytes fit in this tier.

    Nothing moves while used + need stays at or below the high watermark; otherwise victims are taken
    until used + need is at or below the low watermark, or no movable session is left (the caller then
    checks the hard capacity). Hot sessions are never victims.
    """
    if used + need <= marks.high * capacity:
        return []
    out = []
    for c in sorted((c for c in candidates if c.retention != "hot"), key=lambda c: (c.last_access, c.session)):
        if used + need <= marks.low * capacity:
            break
        out.append(c.session)
        used -= c.nbytes
    return out


def idle_target(c: Candidate, now: float, idle: IdlePolicy, *, has_redis: bool) -> str | None:
    """The tier an idle session should move to now, or None to leave it where it is."""
    idle_s = now - c.last_access
    if c.retention == "hot":
        return None
    if c.retention == "cold" and has_redis and c.tier != "redis" and idle_s >= idle.cold_idle_s:
        return "redis"
    if c.tier == "device" and idle_s >= idle.device_idle_s:
        return "redis" if has_redis and idle_s >= idle.host_idle_s else "host"
    if c.tier == "host" and has_redis and idle_s >= idle.host_idle_s:
        return "redis"
    return None


def lower_tiers(tier: str, *, has_redis: bool) -> Sequence[str]:
    """The tiers below `tier`, nearest first."""
    below = TIERS[TIERS.index(tier) + 1:]
    return [t for t in below if has_redis or t != "redis"]
