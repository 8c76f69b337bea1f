"""Typed configuration of a ringserve cluster, loaded from YAML and usable as Serve config.

    ringserve serve --config cluster.yaml

```yaml
grpc_port: 50051
redis_url: redis://127.0.0.1:6379/0   # omitted: `ringserve serve` starts a local redis-server
model: default
groups: 2                # sequence-parallel worker groups (one Serve deployment each)
group: {sp: 2, num_cpus_per_rank: 0.25, kv_device_bytes: 268435456}
api_keys:                # sha256 of each key (never the key itself)
  - {sha256: 9f86d0…, tenant: acme, admin: false}
limits: {max_sessions: 100, max_tokens: 10000000}
```
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass, field

from ringserve.workers.group import GroupConfig


@dataclass(frozen=True)
class ApiKey:
    sha256: str  # hex sha256 of the key; the key itself is never stored
    tenant: str
    admin: bool = False  # may call Status

    @classmethod
    def from_plain(cls, key: str, tenant: str, admin: bool = False) -> "ApiKey":
        return cls(hash_key(key), tenant, admin)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    max_sessions: int = 100  # live sessions per tenant
    max_tokens: int = 50_000_000  # tokens retained over all of a tenant's sessions


@dataclass(frozen=True)
class ServeConfig:
    grpc_port: int = 50051
    http_port: int = 8000  # Serve's HTTP proxy (KubeRay's readiness probe uses it)
    redis_url: str | None = None
    model: str = "default"
    groups: int = 1
    group: GroupConfig = field(default_factory=GroupConfig)
    api_keys: tuple[ApiKey, ...] = ()
    limits: TenantLimits = field(default_factory=TenantLimits)
    default_ttl_s: float = 3600.0
    max_ttl_s: float = 30 * 86400.0
    max_prompt_tokens: int = 0  # 0: the model's context limit
    max_generate_tokens: int = 8192
    progress_chunk: int = 2048  # CreateSession reports progress every this many tokens
    sweep_interval_s: float = 5.0  # how often expired sessions are deleted

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        if "group" in d and isinstance(d["group"], dict):
            d["group"] = GroupConfig(**{"model": d.get("model", "default"), **d["group"]})
        elif "model" in d:
            d["group"] = GroupConfig(model=d["model"])
        if "limits" in d and isinstance(d["limits"], dict):
            d["limits"] = TenantLimits(**d["limits"])
        if "api_keys" in d:
            d["api_keys"] = tuple(k if isinstance(k, ApiKey) else ApiKey(**k) for k in d["api_keys"])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> "ServeConfig":
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    def to_dict(self) -> dict:
        return asdict(self)
