"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import grpc

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb

from . import _wire
from ._progress import ProgressArg
from ._transport import PEM, CallSettings, SyncTransport, Tls
from .session import Session, session_stream


class Client:
    """A connection to a ringserve gateway.

    Args:
        address: "host:port" of the gRPC endpoint.
        api_key: sent as ``authorization: Bearer <api_key>`` on every call.
        timeout: seconds for each unary call, retries included.
        stream_timeout: seconds for each streaming call (create, append, generate), retries included.
        retries: retries after a first attempt that failed with UNAVAILABLE (nothing else is
            retried); backoff is exponential with full jitter, base 0.2 s, cap 5 s.
        secure: use TLS; the server's certificate is checked against ``ca``, else the system's roots.
        ca: PEM CA bundle that signed the server's certificate, as a path or bytes (implies TLS).
        client_cert, client_key: PEM certificate and key presented to a server that requires client
            certificates (mTLS), as paths or bytes (imply TLS).
        server_name: the name to expect in the server's certificate when it is not the host of
            ``address`` (e.g. ``localhost`` through a port-forward to ``ringserve.example.com``).
        credentials: explicit ``grpc.ChannelCredentials`` instead of the TLS arguments (implies TLS).

    A plaintext client cannot talk to a TLS port (the call fails with UNAVAILABLE), nor a TLS
    client to a plaintext one. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, address: str, api_key: str | None = None, *, timeout: float = 30.0,
                 stream_timeout: float = 3600.0, retries: int = 4, secure: bool = False,
                 ca: PEM | None = None, client_cert: PEM | None = None, client_key: PEM | None = None,
                 server_name: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        settings = CallSettings.make(api_key, timeout, stream_timeout, retries)
        tls = Tls(secure, ca, client_cert, client_key, server_name, credentials)
        self._transport = SyncTransport(address, settings, tls)

    def create_session(self, text: str | None = None, *, tokens: Iterable[int] | None = None,
                       messages: _wire.Messages | None = None, ttl: _wire.TTL | None = None,
                       expire_time: datetime | None = None, retention: str = "standard",
                       persist: str = "on_demote", display_name: str = "",
                       allow_quantized_kv: bool = False, request_id: str | None = None,
                       kv_format: str = "exact", progress: ProgressArg = False) -> Session:
        """Prefill a context (exactly one of text / tokens / messages) and retain it.

        Args:
            ttl: how long to keep it: "90s", "30m", "2h", "1d", "1h30m", a timedelta or seconds.
                Neither ttl nor expire_time: the server's default (1 hour).
            expire_time: an aware datetime at which it is deleted (instead of ttl).
            retention: "hot", "standard" or "cold".
            persist: "on_demote" or "write_through" (survives the loss of its worker group).
            request_id: idempotency key; a fresh uuid4 by default, reused by retries so a retry
                cannot create a second session.
            kv_format: how the KV is stored, and so what retaining it costs: "exact" (default), "fp8",
                "int4", or "keep:<fraction>" (keep that fraction of the context's tokens).
            progress: True draws a progress bar on stderr; a callable gets (tokens_done, tokens_total).

        Returns when the server sends the created Session (prefill done).
        """
        request = _wire.create_request(
            text, tokens, messages, ttl=ttl, expire_time=expire_time, retention=retention,
            persist=persist, display_name=display_name, allow_quantized_kv=allow_quantized_kv,
            request_id=request_id, kv_format=kv_format)
        return Session(session_stream(self._transport, "CreateSession", request, progress, "prefill"), self._transport)

    def get_session(self, name_or_id: str) -> Session:
        """The session named 'sessions/s-…' or 's-…'."""
        request = pb.GetSessionRequest(name=_wire.session_name(name_or_id))
        return Session(self._transport.unary("GetSession", request), self._transport)

    def list_sessions(self, page_size: int = 50) -> Iterator[Session]:
        """All of the caller's sessions, newest first; pages (of ``page_size``) are fetched as you iterate."""
        token = ""
        while True:
            page = self._transport.unary("ListSessions", pb.ListSessionsRequest(page_size=page_size, page_token=token))
            for message in page.sessions:
                yield Session(message, self._transport)
            token = page.next_page_token
            if not token:
                return

    def status(self) -> pb.StatusResponse:
        """Cluster status (admin keys only): the ``ringserve.v1.StatusResponse`` message itself,
        i.e. ``.groups`` (id, ranks, sessions, kv_bytes per tier, free_kv_bytes, healthy) and
        ``.sessions``; see ringserve.proto for the fields and their units."""
        return self._transport.unary("Status", pb.StatusRequest())

    def usage(self, since: _wire.TTL | None = None, *, start: datetime | None = None, end: datetime | None = None,
              group_by: str = "session", session: str | None = None, tenant: str = "") -> pb.GetUsageResponse:
        """Usage and cost over a window: ``since`` ("24h", a timedelta, seconds) back from now, or
        aware datetimes ``start`` / ``end``. ``group_by``: "session", "tier", "day" or "kv_format". Returns the
        ``ringserve.v1.GetUsageResponse`` (``.line_items``, ``.total``, ``.currency``,
        ``.accruing_cost``). ``tenant``: another tenant's usage (admin keys only)."""
        request = _wire.usage_request(since, start, end, group_by=group_by, session=session, tenant=tenant)
        return self._transport.unary("GetUsage", request)

    def export_usage(self, since: _wire.TTL | None = None, *, start: datetime | None = None,
                     end: datetime | None = None, format: str = "jsonl", session: str | None = None,
                     tenant: str = "") -> Iterator[str]:
        """Every usage record in the window as text chunks (CSV with a header, or JSON lines);
        ``"".join(...)`` them or write them to a file as they come."""
        request = _wire.export_request(since, start, end, format=format, session=session, tenant=tenant)
        for chunk in self._transport.stream("ExportUsage", request):
            yield chunk.data.decode()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
