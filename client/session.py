"""Session and Generation: the objects a client hands back (blocking flavour).

The read-only views (:class:`SessionView`, :class:`GenerationView`) hold everything both
flavours share; :class:`Session` / :class:`Generation` add the blocking calls and
``ringserve.client.aio`` adds the awaitable ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb

from . import _wire, errors
from ._progress import ProgressArg, progress_reporter

if TYPE_CHECKING:
    from ._transport import SyncTransport


# --- shared views -----------------------------------------------------------------------------

class SessionView:
    """Read-only properties over a ``ringserve.v1.Session`` message (see ringserve.proto).

    Times are timezone-aware UTC datetimes, or None when the server left them unset.
    """

    def __init__(self, message: pb.Session):
        self._message = message

    @property
    def proto(self) -> pb.Session:
        """The underlying message, for fields this class does not surface."""
        return self._message

    @property
    def name(self) -> str:
        """'sessions/s-<hex>'."""
        return self._message.name

    @property
    def id(self) -> str:
        """'s-<hex>' (the name without 'sessions/')."""
        return _wire.session_id(self._message.name)

    @property
    def display_name(self) -> str:
        return self._message.display_name

    @property
    def tenant(self) -> str:
        return self._message.tenant

    @property
    def size_tokens(self) -> int:
        """Tokens retained: context plus retained turns."""
        return self._message.size_tokens

    @property
    def tier(self) -> str:
        """Where the KV lives now: 'hbm', 'host', 'redis', 'moving' or 'lost'."""
        return _wire.tier_name(self._message.tier)

    @property
    def retention(self) -> str:
        """'hot', 'standard' or 'cold'."""
        return _wire.retention_name(self._message.retention)

    @property
    def persist(self) -> str:
        """'on_demote' or 'write_through'."""
        return _wire.persist_name(self._message.persist)

    @property
    def allow_quantized_kv(self) -> bool:
        return self._message.allow_quantized_kv

    @property
    def create_time(self) -> datetime | None:
        return _wire.to_datetime(self._message, "create_time")

    @property
    def expire_time(self) -> datetime | None:
        return _wire.to_datetime(self._message, "expire_time")

    @property
    def update_time(self) -> datetime | None:
        return _wire.to_datetime(self._message, "update_time")

    @property
    def billed_through(self) -> datetime | None:
        """The time up to which ``token_seconds`` and ``cost_accrued`` are metered."""
        return _wire.to_datetime(self._message, "billed_through")

    @property
    def group(self) -> str:
        """The worker group holding the KV."""
        return self._message.group

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV over all ranks, in whole pages."""
        return self._message.kv_bytes

    @property
    def exact_kv_bytes(self) -> int:
        """Bytes its tokens take stored exactly (the model's dtype, tokens x bytes per token)."""
        return self._message.exact_kv_bytes

    @property
    def stored_kv_bytes(self) -> int:
        """Bytes its stored tokens take in its KV format (``kv_bytes`` less the unused slots of its
        pages); retention is priced by ``stored_kv_bytes / exact_kv_bytes``."""
        return self._message.stored_kv_bytes

    @property
    def kv_format(self) -> str:
        """How the KV is stored: 'exact', 'fp8', 'int4' or 'keep:<fraction>'."""
        return _wire.kv_format_name(self._message)

    @property
    def retention_rate(self) -> float:
        """What retaining the session costs now, per hour, in ``currency``: its tier's rate x its
        tokens x ``stored_kv_bytes / exact_kv_bytes``."""
        return self._message.retention_rate

    @property
    def token_seconds(self) -> dict[str, float]:
        """Tokens x seconds resident per tier name ('hbm', 'host', 'redis')."""
        return dict(self._message.token_seconds)

    @property
    def cost_accrued(self) -> float:
        """What holding the session has cost so far, in ``currency``."""
        return self._message.cost_accrued

    @property
    def retention_cost(self) -> float:
        """The part of ``cost_accrued`` for holding the KV (token-hours by tier)."""
        return self._message.retention_cost

    @property
    def compute_cost(self) -> float:
        """The part of ``cost_accrued`` for tokens prefilled, served from retained context and generated."""
        return self._message.compute_cost

    @property
    def currency(self) -> str:
        return self._message.currency

    def _update(self, message: pb.Session) -> None:
        self._message = message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, size_tokens={self.size_tokens}, "
                f"tier={self.tier!r}, expire_time={self.expire_time})")


@dataclass(frozen=True)
class Usage:
    """What one Generate call used and cost."""

    prompt_tokens: int     # new tokens of this request's prompt
    cached_tokens: int     # tokens served from the retained context
    generated_tokens: int  # tokens generated
    cost: float            # of this request, in `currency`
    currency: str

    @classmethod
    def from_proto(cls, m: pb.Usage) -> Usage:
        return cls(m.prompt_tokens, m.cached_tokens, m.generated_tokens, m.cost, m.currency)


class GenerationView:
    """What a Generate stream has delivered so far; complete once the stream has ended."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._token_ids: list[int] = []
        self._usage: Usage | None = None
        self._finish_reason: str | None = None
        self._group = ""
        self._done = False
        self._error: errors.RingServeError | None = None  # why the stream stopped, if it failed

    def _record(self, response: pb.GenerateResponse) -> str:
        """Take in one message; return its text delta."""
        self._parts.append(response.text_delta)
        self._token_ids.extend(response.token_ids)
        if response.HasField("usage"):
            self._usage = Usage.from_proto(response.usage)
        if response.finish_reason:
            self._finish_reason = _wire.finish_reason_name(response.finish_reason)
        if response.group:
            self._group = response.group
        return response.text_delta

    @property
    def done(self) -> bool:
        """True once the stream has ended normally."""
        return self._done

    @property
    def usage(self) -> Usage | None:
        """Token counts and cost; None until the last message has arrived."""
        return self._usage

    @property
    def finish_reason(self) -> str | None:
        """'stop', 'length', 'stop_sequence' or 'context_full'; None until the end."""
        return self._finish_reason

    @property
    def group(self) -> str:
        """The worker group that served the request."""
        return self._group

    @property
    def token_ids(self) -> list[int]:
        """Every token id received so far."""
        return list(self._token_ids)

    def _full_text(self) -> str:
        """The whole answer once the stream has been drained; raises if it did not complete."""
        if not self._done:
            raise self._error or errors.Cancelled("the generation was cancelled before it finished")
        return "".join(self._parts)


class SessionEvents:
    """Consumes a CreateSession / AppendToSession stream: progress to the callback, then the Session.

    Only the messages' ``event`` oneof (``progress`` | ``session``) is read.
    """

    def __init__(self, progress: ProgressArg, label: str):
        self._report, self.close = progress_reporter(progress, label)
        self._session: pb.Session | None = None

    def feed(self, event: pb.CreateSessionEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress" and self._report is not None:
            self._report(event.progress.tokens_done, event.progress.tokens_total)
        elif kind == "session":
            self._session = event.session

    def result(self, rpc: str) -> pb.Session:
        if self._session is None:
            raise errors.Internal(f"{rpc} stream ended without the final Session event")
        return self._session


# --- blocking flavour -------------------------------------------------------------------------

def session_stream(transport, rpc: str, request, progress: ProgressArg, label: str) -> pb.Session:
    """Run a CreateSession / AppendToSession stream to its final Session, reporting progress."""
    events = SessionEvents(progress, label)
    try:
        for event in transport.stream(rpc, request):
            events.feed(event)
    finally:
        events.close()
    return events.result(rpc)


class Generation(GenerationView):
    """A streamed answer. Iterate for text deltas, or call :meth:`text` for all of it.

    The RPC starts on the first iteration (or ``text()``), not when the object is created.
    A failure mid-stream raises the matching error and is not retried: tokens already yielded
    cannot be taken back and the stream has no resume point.
    """

    def __init__(self, responses: Iterator[pb.GenerateResponse]):
        super().__init__()
        self._responses = responses
        self._deltas = self._run()

    def _run(self) -> Iterator[str]:
        try:
            for response in self._responses:
                yield self._record(response)
        except errors.RingServeError as e:
            self._error = e
            raise
        self._done = True

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def text(self) -> str:
        """Wait for the end of the stream; the full text, including deltas already iterated."""
        for _ in self._deltas:
            pass
        return self._full_text()

    def cancel(self) -> None:
        """Stop the stream early (cancels the RPC)."""
        self._deltas.close()
        self._responses.close()


class Session(SessionView):
    """A retained context on the cluster.

    ``with client.create_session(...) as s:`` deletes the session when the block ends (a session
    that is already gone is fine), which stops its meter.
    """

    def __init__(self, message: pb.Session, transport: SyncTransport):
        super().__init__(message)
        self._transport = transport

    def refresh(self) -> Session:
        """Re-read the session (size, tier, cost so far); returns self."""
        self._update(self._transport.unary("GetSession", pb.GetSessionRequest(name=self.name)))
        return self

    def generate(self, prompt: str | None = None, *, tokens: Iterable[int] | None = None,
                 messages: _wire.Messages | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Iterable[str] = (),
                 retain_turn: bool = False) -> Generation:
        """Answer a prompt (text, token ids, or chat messages) against this session.

        ``retain_turn=True`` keeps prompt and answer in the session for the next question; call
        :meth:`refresh` afterwards to see the new ``size_tokens``.
        """
        request = _wire.generate_request(
            self.name, prompt, tokens, messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, retain_turn=retain_turn)
        return Generation(self._transport.stream("Generate", request))

    def append(self, text: str | None = None, *, tokens: Iterable[int] | None = None,
               messages: _wire.Messages | None = None, progress: ProgressArg = False) -> Session:
        """Add a document, token ids or chat turns to the session; returns self, updated."""
        request = _wire.append_request(self.name, text, tokens, messages)
        self._update(session_stream(self._transport, "AppendToSession", request, progress, "append"))
        return self

    def extend(self, ttl: _wire.TTL | None = None, *, expire_time: datetime | None = None) -> Session:
        """Move the expiry: ``ttl`` from now ("6h", timedelta, seconds) or an aware ``expire_time``."""
        self._update(self._transport.unary("UpdateSession", _wire.expiry_update(self.name, ttl, expire_time)))
        return self

    def set_retention(self, retention: str) -> Session:
        """Change the retention class: 'hot', 'standard' or 'cold'."""
        self._update(self._transport.unary("UpdateSession", _wire.retention_update(self.name, retention)))
        return self

    def set_kv_format(self, kv_format: str) -> Session:
        """Store the KV smaller from now on: 'fp8', 'int4' (from a larger format) or 'keep:<fraction>'
        (from exact, once). Formats only move down; going back is FAILED_PRECONDITION."""
        self._update(self._transport.unary("UpdateSession", _wire.format_update(self.name, kv_format)))
        return self

    def delete(self) -> None:
        """Delete the session: its KV is freed on every tier and its meter stops."""
        self._transport.unary("DeleteSession", pb.DeleteSessionRequest(name=self.name))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.delete()
        except errors.NotFound:
            pass
