"""Python values <-> ringserve.v1 messages, shared by the sync and the asyncio client.

Nothing here does I/O: these functions validate arguments (raising ``ValueError`` / ``TypeError``
before anything is sent) and build requests, so both clients send exactly the same bytes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb

#: What ``ttl=`` accepts: "1h30m"-style strings, a timedelta, or seconds.
TTL = Union[str, timedelta, int, float]
#: What ``messages=`` accepts: {"role": ..., "content": ...} dicts, (role, content) pairs, or ChatMessage.
Messages = Iterable[Union[Mapping[str, str], Sequence[str], pb.ChatMessage]]

_NAME_PREFIX = "sessions/"

RETENTION = {"hot": pb.HOT, "standard": pb.STANDARD, "cold": pb.COLD}
PERSIST = {"on_demote": pb.ON_DEMOTE, "write_through": pb.WRITE_THROUGH}
# What an unset (0) enum means, per the comments in ringserve.proto.
_RETENTION_DEFAULT = "standard"
_PERSIST_DEFAULT = "on_demote"


# --- names ------------------------------------------------------------------------------------

def session_name(name_or_id: str) -> str:
    """'s-abc' or 'sessions/s-abc' -> 'sessions/s-abc'."""
    if not isinstance(name_or_id, str) or not name_or_id.strip():
        raise ValueError(f"a session name looks like 'sessions/s-3f9c' or 's-3f9c', got {name_or_id!r}")
    name = name_or_id.strip()
    sid = name[len(_NAME_PREFIX):] if name.startswith(_NAME_PREFIX) else name
    if not sid or "/" in sid:
        raise ValueError(f"a session name looks like 'sessions/s-3f9c' or 's-3f9c', got {name_or_id!r}")
    return _NAME_PREFIX + sid


def session_id(name: str) -> str:
    """'sessions/s-abc' -> 's-abc'."""
    return name[len(_NAME_PREFIX):] if name.startswith(_NAME_PREFIX) else name


# --- durations and times ----------------------------------------------------------------------

_TTL_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_TTL_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_TTL_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")


def ttl_seconds(ttl: TTL) -> float:
    """Seconds in a ttl: "90s", "30m", "2h", "1d", "1h30m", "1.5h", a timedelta, or a number of seconds."""
    if isinstance(ttl, bool):  # bool is an int; True seconds is surely a mistake
        raise TypeError(f"ttl must be a string like '2h', a timedelta or seconds, got {ttl!r}")
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)):
        seconds = float(ttl)
    elif isinstance(ttl, str):
        text = "".join(ttl.split()).lower()  # "1h 30m" == "1h30m"
        if not _TTL_WHOLE.fullmatch(text):
            raise ValueError(f"ttl {ttl!r} is not a duration like '90s', '30m', '2h', '1d' or '1h30m'")
        seconds = sum(float(n) * _TTL_UNITS[unit] for n, unit in _TTL_PART.findall(text))
    else:
        raise TypeError(f"ttl must be a string like '2h', a timedelta or seconds, got {type(ttl).__name__}")
    if not seconds > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return seconds


def duration(ttl: TTL) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=ttl_seconds(ttl)))
    return d


def timestamp(dt: datetime, what: str = "expire_time") -> timestamp_pb2.Timestamp:
    """An aware datetime -> Timestamp. Naive datetimes are refused: their zone is a guess."""
    if not isinstance(dt, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(hours=2)")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def to_datetime(msg: Any, field: str) -> datetime | None:
    """An aware UTC datetime from a Timestamp field, or None when the field is unset."""
    if not msg.HasField(field):
        return None
    return getattr(msg, field).ToDatetime(tzinfo=timezone.utc)


# --- enums ------------------------------------------------------------------------------------

def _choice(table: dict[str, int], value: str, what: str) -> int:
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, table))}; got {value!r}")
    return table[key]


def tier_name(value: int) -> str:
    """Tier enum -> "hbm" / "host" / "redis" / "moving" / "lost" ("unspecified" if unset)."""
    return pb.Tier.Name(value).lower().removeprefix("tier_")


def retention_name(value: int) -> str:
    return pb.RetentionClass.Name(value).lower() if value else _RETENTION_DEFAULT


def persist_name(value: int) -> str:
    return pb.PersistMode.Name(value).lower() if value else _PERSIST_DEFAULT


def _kv_format_fields(value: str | None) -> dict[str, Any]:
    """"exact" / "fp8" / "int4" / "keep:0.3" -> the kv_format and kv_keep_fraction fields of a request."""
    from ringserve.workers.protocol import KVFormat

    f = KVFormat.parse(value)
    out: dict[str, Any] = {"kv_format": pb.KvFormat.Value(f.name.upper())}
    if f.keep_fraction is not None:
        out["kv_keep_fraction"] = f.keep_fraction
    return out


def kv_format_name(session: pb.Session) -> str:
    """A Session's kv_format and kv_keep_fraction as one name: "exact", "fp8", "int4", "keep:0.3"."""
    from ringserve.workers.protocol import KVFormat

    if session.kv_format == pb.KEEP:
        return str(KVFormat("keep", round(session.kv_keep_fraction, 6)))
    return pb.KvFormat.Name(session.kv_format).lower() if session.kv_format else "exact"


def finish_reason_name(value: int) -> str | None:
    """FinishReason enum -> "stop" / "length" / "stop_sequence" / "context_full"; None if unset."""
    return pb.FinishReason.Name(value).lower() if value else None


# --- request content --------------------------------------------------------------------------

def _chat_message(m: Any) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, Mapping):
        return pb.ChatMessage(role=m["role"], content=m["content"])
    role, content = m
    return pb.ChatMessage(role=role, content=content)


def content(text: str | None, tokens: Iterable[int] | None, messages: Messages | None,
            *, what: str = "text") -> dict[str, Any]:
    """Keyword arguments setting a request's content oneof from exactly one of the three forms."""
    given = [k for k, v in ((what, text), ("tokens", tokens), ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of {what}=, tokens= or messages= (got {', '.join(given) or 'none'})")
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a str, got {type(text).__name__}; pass token ids as tokens=")
        return {"text": text}
    if tokens is not None:
        return {"token_ids": pb.TokenIds(ids=[int(t) for t in tokens])}
    return {"messages": pb.ChatMessages(messages=[_chat_message(m) for m in messages])}


# --- requests ---------------------------------------------------------------------------------

def create_request(text, tokens, messages, *, ttl: TTL | None, expire_time: datetime | None,
                   retention: str, persist: str, display_name: str, allow_quantized_kv: bool,
                   request_id: str | None, kv_format: str | None = None) -> pb.CreateSessionRequest:
    if ttl is not None and expire_time is not None:
        raise ValueError("pass ttl= or expire_time=, not both")
    req = pb.CreateSessionRequest(
        **content(text, tokens, messages),
        retention=_choice(RETENTION, retention, "retention"),
        persist=_choice(PERSIST, persist, "persist"),
        display_name=display_name,
        allow_quantized_kv=allow_quantized_kv,
        **(_kv_format_fields(kv_format) if kv_format is not None else {}),
        # Generated once per call, before any attempt: a retry sends the same id, so the server
        # returns the session the lost attempt created instead of creating a second one.
        request_id=request_id or str(uuid.uuid4()),
    )
    if ttl is not None:
        req.ttl.CopyFrom(duration(ttl))
    elif expire_time is not None:
        req.expire_time.CopyFrom(timestamp(expire_time))
    return req


def append_request(name: str, text, tokens, messages) -> pb.AppendToSessionRequest:
    return pb.AppendToSessionRequest(name=name, **content(text, tokens, messages))


def generate_request(name: str, prompt, tokens, messages, *, max_tokens: int, temperature: float,
                     top_p: float, top_k: int, seed: int | None, stop: str | Iterable[str],
                     retain_turn: bool) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(
        name=name,
        **content(prompt, tokens, messages, what="prompt"),
        sampling=sampling,
        max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop),
        retain_turn=retain_turn,
    )


def expiry_update(name: str, ttl: TTL | None, expire_time: datetime | None) -> pb.UpdateSessionRequest:
    if (ttl is None) == (expire_time is None):
        raise ValueError("pass exactly one of ttl= or expire_time=")
    session = pb.Session(name=name)
    if ttl is not None:
        session.ttl.CopyFrom(duration(ttl))
        path = "ttl"
    else:
        session.expire_time.CopyFrom(timestamp(expire_time))
        path = "expire_time"
    return pb.UpdateSessionRequest(session=session, update_mask=field_mask_pb2.FieldMask(paths=[path]))


def retention_update(name: str, retention: str) -> pb.UpdateSessionRequest:
    session = pb.Session(name=name, retention=_choice(RETENTION, retention, "retention"))
    return pb.UpdateSessionRequest(session=session, update_mask=field_mask_pb2.FieldMask(paths=["retention"]))


def format_update(name: str, kv_format: str) -> pb.UpdateSessionRequest:
    fields = _kv_format_fields(kv_format)
    session = pb.Session(name=name, **fields)
    return pb.UpdateSessionRequest(session=session, update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)))


# --- usage ------------------------------------------------------------------------------------

GROUP_BY = {"session": pb.SESSION, "tier": pb.TIER, "day": pb.DAY, "kv_format": pb.KV_FORMAT}
EXPORT_FORMAT = {"jsonl": pb.JSONL, "csv": pb.CSV}


def usage_window(since: TTL | None, start: datetime | None, end: datetime | None):
    """(start, end) Timestamps: `since` ("24h", a timedelta, seconds) back from now, or explicit
    aware datetimes; end None = now (left unset: the server takes its own now)."""
    if (since is None) == (start is None):
        raise ValueError("give exactly one of since= (e.g. '24h') or start=")
    if since is not None:
        start = datetime.now(timezone.utc) - timedelta(seconds=ttl_seconds(since))
    return timestamp(start, "start"), (timestamp(end, "end") if end is not None else None)


def _scoped(req, since, start, end, session: str | None, tenant: str):
    """Fill the window, tenant and session fields GetUsage and ExportUsage share."""
    s, e = usage_window(since, start, end)
    req.start_time.CopyFrom(s)
    if e is not None:
        req.end_time.CopyFrom(e)
    req.tenant = tenant
    req.session = session_name(session) if session else ""
    return req


def usage_request(since, start, end, *, group_by: str, session: str | None, tenant: str) -> pb.GetUsageRequest:
    return _scoped(pb.GetUsageRequest(group_by=_choice(GROUP_BY, group_by, "group_by")), since, start, end,
                   session, tenant)


def export_request(since, start, end, *, format: str, session: str | None, tenant: str) -> pb.ExportUsageRequest:
    return _scoped(pb.ExportUsageRequest(format=_choice(EXPORT_FORMAT, format, "format")), since, start, end,
                   session, tenant)
