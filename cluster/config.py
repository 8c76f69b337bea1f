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
max_receive_bytes: 67108864   # largest request message the gRPC proxy accepts (RESOURCE_EXHAUSTED beyond)
tls:                     # TLS on its own port (cluster/tls.py); omitted: plaintext only
  port: 50443
  cert_file: /etc/ringserve/tls/tls.crt
  key_file: /etc/ringserve/tls/tls.key
  client_ca_file: /etc/ringserve/tls/ca.crt   # optional: clients must present a certificate it signed
billing:                 # prices in `currency` (cluster/billing.py); omitted: the defaults below
  currency: USD
  retention:             # per 1M token-hours, by retention class and tier
    standard: {hbm: 4.50, host: 1.00, redis: 0.25}
  prefill_per_mtok: 0.10
  cached_per_mtok: 0.01
  generated_per_mtok: 0.40
  min_session_tokens: 0  # smaller sessions are refused with FAILED_PRECONDITION
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import asdict, dataclass, field

from ringserve.workers.group import GroupConfig

from .billing import Rates
from .limits import InputLimits


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
class TlsConfig:
    """TLS for the gRPC API: a listener on `port` of Serve's gRPC proxy, beside its plaintext
    `grpc_port` (cluster/tls.py). Paths are on the Ray nodes."""

    cert_file: str  # PEM certificate chain of the server (leaf first)
    key_file: str  # PEM private key of that certificate (unencrypted)
    client_ca_file: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    port: int = 50443  # the TLS listener; clients connect here

    def __post_init__(self):
        if not self.cert_file or not self.key_file:
            raise ValueError("tls needs cert_file and key_file (PEM files on every Ray node that serves gRPC)")
        if not 0 < self.port < 65536:
            raise ValueError(f"tls.port must be a TCP port, got {self.port}")


MAX_GRPC_MESSAGE = 2**31 - 1  # gRPC's own limit (a signed 32-bit length)


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
    billing: Rates = field(default_factory=Rates)
    billing_redis_url: str | None = None  # the ledger's Redis (run it with AOF); None = redis_url
    # a YAML/JSON list of {sha256, tenant, admin} (e.g. a mounted Kubernetes Secret), read in addition
    # to api_keys and re-read when it changes, so keys rotate without a restart
    api_keys_file: str | None = None
    # bytes: the largest message the gRPC proxy receives; a bigger one is refused with RESOURCE_EXHAUSTED
    # from its length prefix, before it is buffered. 64 MiB holds a prompt of several million tokens of text.
    max_receive_bytes: int = 64 << 20
    # bounds on what one client can make the Gateway hold: requests in flight per tenant, tokenizer
    # threads, idempotency window (cluster/limits.py); the proxy's bound is max_receive_bytes above
    input: InputLimits = field(default_factory=InputLimits)
    tls: TlsConfig | None = None  # None: plaintext only (keep grpc_port on loopback / inside the cluster)
    # who may call over plaintext (grpc_port): "any" host, or "loopback" only (`ringserve serve`). With tls
    # set, plaintext is for loopback callers whatever this says (cluster/tls.py: transport_refusal).
    plaintext_peers: str = "any"

    def __post_init__(self):
        if self.plaintext_peers not in ("any", "loopback"):
            raise ValueError(f"plaintext_peers must be 'any' or 'loopback', got {self.plaintext_peers!r}")
        if not 0 < self.max_receive_bytes <= MAX_GRPC_MESSAGE:
            raise ValueError(f"max_receive_bytes must be in 1..{MAX_GRPC_MESSAGE}, got {self.max_receive_bytes}")
        if self.input.max_receive_bytes and self.input.max_receive_bytes != self.max_receive_bytes:
            raise ValueError(f"input.max_receive_bytes ({self.input.max_receive_bytes}) and max_receive_bytes "
                             f"({self.max_receive_bytes}) disagree: set the top-level max_receive_bytes only")
        if self.tls is not None and self.tls.port in (self.grpc_port, self.http_port):
            raise ValueError(f"tls.port {self.tls.port} is also grpc_port or http_port: give TLS its own port")

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        # "${REDIS_PASSWORD}" and the like in Redis URLs come from the environment (a Secret in Kubernetes)
        for k in ("redis_url", "billing_redis_url"):
            if isinstance(d.get(k), str):
                d[k] = os.path.expandvars(d[k])
        if isinstance(d.get("group"), dict) and isinstance(d["group"].get("redis_url"), str):
            d["group"] = {**d["group"], "redis_url": os.path.expandvars(d["group"]["redis_url"])}
        if "group" in d and isinstance(d["group"], dict):
            d["group"] = GroupConfig(**{"model": d.get("model", "default"), **d["group"]})
        elif "model" in d:
            d["group"] = GroupConfig(model=d["model"])
        if "limits" in d and isinstance(d["limits"], dict):
            d["limits"] = TenantLimits(**d["limits"])
        if "billing" in d:
            d["billing"] = Rates.from_dict(d["billing"])
        if "input" in d:
            d["input"] = InputLimits.from_dict(d["input"])
        if isinstance(d.get("tls"), dict):
            d["tls"] = TlsConfig(**d["tls"])
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


def load_api_keys(path: str) -> tuple[ApiKey, ...]:
    """API keys from a YAML / JSON file: a list of {sha256, tenant, admin}, or {"api_keys": [...]}."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or []
    if isinstance(data, dict):
        data = data.get("api_keys", [])
    keys = []
    for i, k in enumerate(data):
        if not isinstance(k, dict) or not isinstance(k.get("sha256"), str) or len(k["sha256"]) != 64:
            raise ValueError(f"{path}: entry {i} needs sha256 (64 hex digits of the key's SHA-256) and tenant")
        keys.append(ApiKey(k["sha256"].lower(), str(k["tenant"]), bool(k.get("admin", False))))
    return tuple(keys)
