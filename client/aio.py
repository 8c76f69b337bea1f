"""The asyncio client: the same surface as :class:`~ringserve.client.Client`, on ``grpc.aio``.

::

    async with AsyncClient("localhost:50051", api_key=KEY) as client:
        async with client.create_session(doc, ttl="2h") as s:   # or: s = await client.create_session(...)
            async for delta in s.generate("Where is the retry logic?"):
                print(delta, end="")
            print(await s.generate("And its bound?").text())
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Generator, Iterable
from datetime import datetime
from typing import Any

import grpc

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb

from . import _wire, errors
from ._progress import ProgressArg
from ._transport import PEM, AsyncTransport, CallSettings, Tls
from .session import GenerationView, SessionEvents, SessionView


class AsyncGeneration(GenerationView):
    """A streamed answer: ``async for delta in gen`` or ``await gen.text()``.

    The RPC starts on the first iteration; a mid-stream failure is raised, never retried.
    """

    def __init__(self, responses: AsyncIterator[pb.GenerateResponse]):
        super().__init__()
        self._responses = responses
        self._deltas = self._run()

    async def _run(self) -> AsyncIterator[str]:
        try:
            async for response in self._responses:
                yield self._record(response)
        except errors.RingServeError as e:
            self._error = e
            raise
        self._done = True

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    async def text(self) -> str:
        """Wait for the end of the stream; the full text, including deltas already iterated."""
        async for _ in self._deltas:
            pass
        return self._full_text()

    async def cancel(self) -> None:
        """Stop the stream early (cancels the RPC)."""
        await self._deltas.aclose()
        await self._responses.aclose()


class AsyncSession(SessionView):
    """A retained context; ``async with`` deletes it on exit (ignoring NotFound)."""

    def __init__(self, message: pb.Session, transport: AsyncTransport):
        super().__init__(message)
        self._transport = transport

    async def refresh(self) -> AsyncSession:
        self._update(await self._transport.unary("GetSession", pb.GetSessionRequest(name=self.name)))
        return self

    def generate(self, prompt: str | None = None, *, tokens: Iterable[int] | None = None,
                 messages: _wire.Messages | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Iterable[str] = (),
                 retain_turn: bool = False) -> AsyncGeneration:
        """See :meth:`ringserve.client.Session.generate`. Not a coroutine: iterate the result."""
        request = _wire.generate_request(
            self.name, prompt, tokens, messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, retain_turn=retain_turn)
        return AsyncGeneration(self._transport.stream("Generate", request))

    async def append(self, text: str | None = None, *, tokens: Iterable[int] | None = None,
                     messages: _wire.Messages | None = None, progress: ProgressArg = False) -> AsyncSession:
        request = _wire.append_request(self.name, text, tokens, messages)
        self._update(await _consume_events(self._transport, "AppendToSession", request, progress, "append"))
        return self

    async def extend(self, ttl: _wire.TTL | None = None, *, expire_time: datetime | None = None) -> AsyncSession:
        self._update(await self._transport.unary("UpdateSession", _wire.expiry_update(self.name, ttl, expire_time)))
        return self

    async def set_retention(self, retention: str) -> AsyncSession:
        self._update(await self._transport.unary("UpdateSession", _wire.retention_update(self.name, retention)))
        return self

    async def set_kv_format(self, kv_format: str) -> AsyncSession:
        self._update(await self._transport.unary("UpdateSession", _wire.format_update(self.name, kv_format)))
        return self

    async def delete(self) -> None:
        await self._transport.unary("DeleteSession", pb.DeleteSessionRequest(name=self.name))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self.delete()
        except errors.NotFound:
            pass


async def _consume_events(transport: AsyncTransport, rpc: str, request: Any,
                          progress: ProgressArg, label: str) -> pb.Session:
    events = SessionEvents(progress, label)
    try:
        async for event in transport.stream(rpc, request):
            events.feed(event)
    finally:
        events.close()
    return events.result(rpc)


class _Creating(Awaitable[AsyncSession]):
    """What ``AsyncClient.create_session`` returns: await it for the session, or use it in
    ``async with`` to have the session deleted at the end of the block."""

    def __init__(self, create: Awaitable[AsyncSession]):
        self._create = create
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._create.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._create
        return self._session

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._session.__aexit__(*exc_info)


class AsyncClient:
    """The asyncio twin of :class:`ringserve.client.Client`; same arguments and defaults.

    ``close()`` is a coroutine; ``async with AsyncClient(...) as client`` closes for you.
    Create it inside the event loop that will use it.
    """

    def __init__(self, address: str, api_key: str | None = None, *, timeout: float = 30.0,
                 stream_timeout: float = 3600.0, retries: int = 4, secure: bool = False,
                 ca: PEM | None = None, client_cert: PEM | None = None, client_key: PEM | None = None,
                 server_name: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        settings = CallSettings.make(api_key, timeout, stream_timeout, retries)
        tls = Tls(secure, ca, client_cert, client_key, server_name, credentials)
        self._transport = AsyncTransport(address, settings, tls)

    def create_session(self, text: str | None = None, *, tokens: Iterable[int] | None = None,
                       messages: _wire.Messages | None = None, ttl: _wire.TTL | None = None,
                       expire_time: datetime | None = None, retention: str = "standard",
                       persist: str = "on_demote", display_name: str = "",
                       allow_quantized_kv: bool = False, request_id: str | None = None,
                       kv_format: str = "exact", progress: ProgressArg = False) -> _Creating:
        """See :meth:`ringserve.client.Client.create_session`. Arguments are checked right
        away; ``await`` the result (or ``async with`` it) to run the RPC."""
        request = _wire.create_request(
            text, tokens, messages, ttl=ttl, expire_time=expire_time, retention=retention,
            persist=persist, display_name=display_name, allow_quantized_kv=allow_quantized_kv,
            request_id=request_id, kv_format=kv_format)
        return _Creating(self._create(request, progress))

    async def _create(self, request: pb.CreateSessionRequest, progress: ProgressArg) -> AsyncSession:
        message = await _consume_events(self._transport, "CreateSession", request, progress, "prefill")
        return AsyncSession(message, self._transport)

    async def get_session(self, name_or_id: str) -> AsyncSession:
        request = pb.GetSessionRequest(name=_wire.session_name(name_or_id))
        return AsyncSession(await self._transport.unary("GetSession", request), self._transport)

    async def list_sessions(self, page_size: int = 50) -> AsyncIterator[AsyncSession]:
        """``async for s in client.list_sessions()``: all pages, fetched as you iterate."""
        token = ""
        while True:
            request = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            page = await self._transport.unary("ListSessions", request)
            for message in page.sessions:
                yield AsyncSession(message, self._transport)
            token = page.next_page_token
            if not token:
                return

    async def status(self) -> pb.StatusResponse:
        """The ``ringserve.v1.StatusResponse`` message (admin keys only)."""
        return await self._transport.unary("Status", pb.StatusRequest())

    async def usage(self, since: _wire.TTL | None = None, *, start: datetime | None = None,
                    end: datetime | None = None, group_by: str = "session", session: str | None = None,
                    tenant: str = "") -> pb.GetUsageResponse:
        """Usage and cost over a window: ``since`` ("24h", a timedelta, seconds) back from now, or
        aware datetimes ``start`` / ``end``. ``group_by``: "session", "tier", "day" or "kv_format". Returns the
        ``ringserve.v1.GetUsageResponse`` (``.line_items``, ``.total``, ``.currency``,
        ``.accruing_cost``). ``tenant``: another tenant's usage (admin keys only)."""
        request = _wire.usage_request(since, start, end, group_by=group_by, session=session, tenant=tenant)
        return await self._transport.unary("GetUsage", request)

    async def export_usage(self, since: _wire.TTL | None = None, *, start: datetime | None = None,
                           end: datetime | None = None, format: str = "jsonl", session: str | None = None,
                           tenant: str = "") -> AsyncIterator[str]:
        """Every usage record in the window as text chunks (CSV with a header, or JSON lines);
        ``"".join(...)`` them or write them to a file as they come."""
        request = _wire.export_request(since, start, end, format=format, session=session, tenant=tenant)
        async for chunk in self._transport.stream("ExportUsage", request):
            yield chunk.data.decode()

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
