"""API keys: who is calling. `authorization: Bearer <api key>`, keys stored as their SHA-256 only.

* The presented key is hashed and compared with every stored hash by `hmac.compare_digest`, all of
  them, whatever matches: the time taken does not depend on which stored key (if any) is closest to
  the presented one, and no table is indexed by a value the caller chose.
* `api_keys_file` (a mounted Kubernetes Secret, rotated in place) is re-read when it changes. If it is
  configured and cannot be read or parsed, every request is refused (UNAVAILABLE: the operator must
  fix it) instead of serving with a key list that may still hold a revoked key: the keys fail closed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc

from .rules import RpcError

log = logging.getLogger("ringserve.auth")

MAX_HEADER = 4096  # characters of an authorization value considered at all


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool


class KeyRing:
    """The valid keys: `static` ({sha256, tenant, admin} records from the config) plus those of
    `path`, re-read at most every `recheck_s` when its mtime changes."""

    def __init__(self, static=(), path: str | None = None, *, recheck_s: float = 1.0):
        self.static = tuple(static)
        self.path, self.recheck_s = path, recheck_s
        self._lock = threading.Lock()
        self._entries: list[tuple[bytes, Principal]] = []
        self._file_keys: tuple = ()
        self._mtime: int | None = None
        self._broken: str | None = None  # why the file is unusable (fail closed while set)
        self._checked = float("-inf")
        self._rebuild()
        if path:
            self._check(force=True)

    def _rebuild(self) -> None:
        self._entries = [(bytes.fromhex(k.sha256), Principal(k.tenant, bool(k.admin)))
                         for k in self.static + self._file_keys]

    def _check(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except OSError as e:
                self._fail(f"unreadable: {e.strerror}")
                return
            if mtime == self._mtime and self._broken is None:
                return
            from .config import load_api_keys

            try:
                keys = load_api_keys(self.path)
            except Exception as e:  # noqa: BLE001 - any parse error fails closed
                self._fail(f"rejected: {e}")
                return
            self._file_keys, self._mtime, self._broken = keys, mtime, None
            self._rebuild()
            log.info("loaded %d API keys from %s", len(keys), self.path)

    def _fail(self, why: str) -> None:
        if self._broken != why:
            log.error("api_keys_file %s %s; refusing every request until it is fixed", self.path, why)
        self._broken = why

    def authenticate(self, metadata) -> Principal:
        """The caller of a request with gRPC `metadata` ((key, value) pairs), or RpcError."""
        if self.path:
            self._check()
            if self._broken is not None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE,
                               "the service cannot read its API keys; no request is accepted until an operator "
                               "fixes them")
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing API key: send metadata 'authorization: Bearer <api key>'")
        if len(values) > 1:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "send exactly one authorization header")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        if len(value) > MAX_HEADER or not value.startswith("Bearer ") or not value[7:].strip():
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization: use 'Bearer <api key>'")
        digest = hashlib.sha256(value[7:].strip().encode()).digest()
        found = None
        for stored, who in self._entries:  # every entry, no early exit
            if hmac.compare_digest(stored, digest):
                found = who
        if found is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return found
