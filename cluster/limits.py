"""Bounds on what one client can make the service hold: message sizes, concurrent requests per tenant,
threads for tokenizing.

Where each bound is enforced:

* **The gRPC proxy's receive size** (`max_receive_bytes`). Serve's `gRPCOptions` (Ray 2.60) has no
  option for it; the proxy builds its server with `grpc.max_receive_message_length` =
  `RAY_SERVE_GRPC_MAX_MESSAGE_SIZE` from its environment (default 2 GiB). gRPC's core compares the
  5-byte length prefix of a message with that limit and answers RESOURCE_EXHAUSTED before it buffers
  the message (measured: a 300 MB message to a server limited to 64 MiB is refused in 0.4 s, the
  server's memory grows by 2 MB), with or without an API key — the key is checked later, by the
  Gateway. `proxy_env` gives the variable; whoever starts Serve passes it to the controller (whose
  child, the proxy, inherits it): `serve.start(..., controller_options=controller_options(limits,
  max_tokens))`, or on Kubernetes as an environment variable of the Ray head container.
* **Text longer than the token limit can allow** is refused by the Gateway before tokenizing
  (cluster/rules.py `check_size`), and tokenizing runs on a small thread pool, off the event loop.
* **Concurrent requests per tenant** (`TenantGate`), per Gateway replica: a tenant over its limit is
  refused at once with RESOURCE_EXHAUSTED (never queued).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from .rules import RpcError

PROXY_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
MIB = 1 << 20


@dataclass(frozen=True)
class InputLimits:
    """Bounds on input. Read from the `input` section of the serve config (a dict in ServeConfig
    form); every field has a default."""

    max_receive_bytes: int = 0  # largest gRPC message the proxy accepts; 0 = derived from the context limit
    max_concurrent_per_tenant: int = 32  # requests in flight per tenant and Gateway replica
    tokenizer_threads: int = 4  # threads that tokenize (off the Gateway's event loop)
    idempotency_ttl_s: float = 86400.0  # how long a request_id of an append or retained turn is remembered

    def __post_init__(self):
        if self.max_receive_bytes < 0:
            raise ValueError("input.max_receive_bytes must be >= 0 (0: derived from the context limit)")
        if self.max_concurrent_per_tenant < 1:
            raise ValueError("input.max_concurrent_per_tenant must be >= 1")
        if self.tokenizer_threads < 1:
            raise ValueError("input.tokenizer_threads must be >= 1")
        if self.idempotency_ttl_s <= 0:
            raise ValueError("input.idempotency_ttl_s must be > 0")

    @classmethod
    def from_dict(cls, d) -> "InputLimits":
        if isinstance(d, InputLimits):
            return d
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown input keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def receive_bytes(self, max_tokens: int) -> int:
        """The proxy's receive limit: as configured, else room for a prompt of `max_tokens` tokens at 16
        bytes each (text averages 4-5 bytes per token; token ids at most 5 per id as varints) plus 1 MiB,
        and never under 8 MiB."""
        if self.max_receive_bytes:
            return self.max_receive_bytes
        return max(8 * MIB, 16 * max_tokens + MIB)


def proxy_env(limits: InputLimits, max_tokens: int) -> dict[str, str]:
    """Environment of Serve's proxy actor that bounds the gRPC messages it receives."""
    return {PROXY_ENV: str(limits.receive_bytes(max_tokens))}


def controller_options(limits: InputLimits, max_tokens: int) -> dict:
    """`serve.start(controller_options=...)`: the proxy actors are the controller's children and
    inherit its runtime_env's env_vars."""
    return {"runtime_env": {"env_vars": proxy_env(limits, max_tokens)}}


class TenantGate:
    """Counts each tenant's requests in flight; `enter(tenant)` refuses one over the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._n: dict[str, int] = {}

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._n.get(tenant, 0)

    def acquire(self, tenant: str) -> None:
        with self._lock:
            n = self._n.get(tenant, 0)
            if n >= self.limit:
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many requests in flight for your tenant ({n}, the limit is {self.limit}); "
                               "wait for some to finish, then retry")
            self._n[tenant] = n + 1

    def release(self, tenant: str) -> None:
        with self._lock:
            n = self._n.get(tenant, 0) - 1
            if n > 0:
                self._n[tenant] = n
            else:
                self._n.pop(tenant, None)

    @contextmanager
    def enter(self, tenant: str):
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)
