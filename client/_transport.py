"""The one place that calls the stub: channel, auth metadata, deadlines, retries, error conversion.

``SyncTransport`` (grpc) and ``AsyncTransport`` (grpc.aio) follow the same rules, side by side:

- every call carries ``authorization: Bearer <api key>``;
- a unary call has ``timeout`` seconds and a stream ``stream_timeout`` seconds, each covering
  all of its attempts (a retry gets what is left of the deadline);
- UNAVAILABLE is retried per :class:`RetryPolicy`; a stream only while none of its messages
  has arrived;
- a failure leaves as a :class:`~ringserve.client.errors.RingServeError` subclass.

:class:`Tls` says how the channel is secured (plaintext, TLS with the system's roots or a CA
bundle, a client certificate for mTLS).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Union

import grpc
import grpc.aio

from ringserve import __version__
from ringserve.proto.ringserve.v1 import ringserve_pb2_grpc

from ._retry import RetryPolicy
from .errors import from_rpc_error, rpc_code

_OPTIONS = (("grpc.primary_user_agent", f"ringserve-python/{__version__}"),)
_MIN_ATTEMPT_TIMEOUT = 0.001  # seconds; grpc rejects a non-positive timeout


@dataclass(frozen=True)
class CallSettings:
    """Per-call settings shared by every RPC of one client."""

    metadata: tuple[tuple[str, str], ...]
    timeout: float         # seconds per unary call, all attempts included
    stream_timeout: float  # seconds per stream, all attempts included
    policy: RetryPolicy

    @classmethod
    def make(cls, api_key: str | None, timeout: float, stream_timeout: float, retries: int) -> CallSettings:
        if timeout <= 0 or stream_timeout <= 0:
            raise ValueError(f"timeouts must be positive seconds, got timeout={timeout}, stream_timeout={stream_timeout}")
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        return cls(metadata, float(timeout), float(stream_timeout), RetryPolicy(retries))

    def deadline(self, stream: bool) -> float:
        return time.monotonic() + (self.stream_timeout if stream else self.timeout)

    @staticmethod
    def remaining(deadline: float) -> float:
        return max(deadline - time.monotonic(), _MIN_ATTEMPT_TIMEOUT)


PEM = Union[str, bytes, "os.PathLike[str]"]  # a file path, or the PEM bytes themselves


def _pem(value: PEM | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {os.fspath(value)!r}: {e.strerror}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {os.fspath(value)!r} is not PEM (expected '-----BEGIN ...')")
    return data


@dataclass(frozen=True)
class Tls:
    """How a client's channel is secured.

    secure: TLS; with ``ca`` None the server's certificate is checked against the system's roots.
    ca: PEM CA bundle (a path or bytes) that signed the server's certificate (implies TLS).
    client_cert / client_key: PEM certificate and key this client presents (mTLS; implies TLS).
    server_name: the name the server's certificate must carry, when it differs from the host in
        ``address`` (e.g. connecting to ``localhost`` through a port-forward).
    credentials: explicit ``grpc.ChannelCredentials`` instead of all of the above (implies TLS).
    """

    secure: bool = False
    ca: PEM | None = None
    client_cert: PEM | None = None
    client_key: PEM | None = None
    server_name: str | None = None
    credentials: grpc.ChannelCredentials | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None: a plaintext channel."""
        if self.credentials is not None:
            return self.credentials
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate needs both client_cert and client_key")
        if not (self.secure or self.ca is not None or self.client_cert is not None):
            if self.server_name:
                raise ValueError("server_name is for TLS: also pass secure=True or ca=...")
            return None
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca, "CA bundle"),
                                            private_key=_pem(self.client_key, "client key"),
                                            certificate_chain=_pem(self.client_cert, "client certificate"))

    def options(self) -> tuple[tuple[str, Any], ...]:
        if not self.server_name:
            return _OPTIONS
        return _OPTIONS + (("grpc.ssl_target_name_override", self.server_name),
                           ("grpc.default_authority", self.server_name))


class SyncTransport:
    """Blocking RPCs over a ``grpc.Channel``."""

    def __init__(self, address: str, settings: CallSettings, tls: Tls):
        creds, options = tls.channel_credentials(), tls.options()
        self.channel = (grpc.secure_channel(address, creds, options=options) if creds
                        else grpc.insecure_channel(address, options=options))
        self.stub = ringserve_pb2_grpc.RingServeStub(self.channel)
        self.settings = settings

    def unary(self, method: str, request: Any) -> Any:
        s = self.settings
        deadline = s.deadline(stream=False)
        retry = 0
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=s.remaining(deadline), metadata=s.metadata)
            except grpc.RpcError as e:
                wait = s.policy.delay(retry, rpc_code(e), deadline)
                if wait is None:
                    raise from_rpc_error(e, attempts=retry + 1) from None
            time.sleep(wait)
            retry += 1

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        """Yield the stream's messages. The RPC starts on the first ``next()``; closing the
        iterator early cancels it."""
        s = self.settings
        deadline = s.deadline(stream=True)
        retry = 0
        while True:
            call = getattr(self.stub, method)(request, timeout=s.remaining(deadline), metadata=s.metadata)
            received = False
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as e:
                wait = None if received else s.policy.delay(retry, rpc_code(e), deadline)
                if wait is None:
                    raise from_rpc_error(e, attempts=retry + 1) from None
            finally:
                call.cancel()  # no-op once the call has finished
            time.sleep(wait)
            retry += 1

    def close(self) -> None:
        self.channel.close()


class AsyncTransport:
    """The same RPCs over a ``grpc.aio.Channel``."""

    def __init__(self, address: str, settings: CallSettings, tls: Tls):
        creds, options = tls.channel_credentials(), tls.options()
        self.channel = (grpc.aio.secure_channel(address, creds, options=options) if creds
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = ringserve_pb2_grpc.RingServeStub(self.channel)
        self.settings = settings

    async def unary(self, method: str, request: Any) -> Any:
        s = self.settings
        deadline = s.deadline(stream=False)
        retry = 0
        while True:
            try:
                return await getattr(self.stub, method)(request, timeout=s.remaining(deadline), metadata=s.metadata)
            except grpc.RpcError as e:
                wait = s.policy.delay(retry, rpc_code(e), deadline)
                if wait is None:
                    raise from_rpc_error(e, attempts=retry + 1) from None
            await asyncio.sleep(wait)
            retry += 1

    async def stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        s = self.settings
        deadline = s.deadline(stream=True)
        retry = 0
        while True:
            call = getattr(self.stub, method)(request, timeout=s.remaining(deadline), metadata=s.metadata)
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as e:
                wait = None if received else s.policy.delay(retry, rpc_code(e), deadline)
                if wait is None:
                    raise from_rpc_error(e, attempts=retry + 1) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)
            retry += 1

    async def close(self) -> None:
        await self.channel.close()
