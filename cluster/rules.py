"""The Gateway's parsing and validation rules, as plain functions over the request messages.

No Ray, no Redis, no tokenizer: everything a request can be refused for by its shape alone is decided
here, before any work is done, and tests/unit/test_gateway_rules.py checks each rule in milliseconds.
Every refusal is an `RpcError` with the gRPC status the proto documents and a message that says what
to change. `status_of` maps the errors of the other layers (data plane, registry, ledger, Redis) to a
status, and `sanitize` makes sure no message leaves with an internal address, a source path, stack
text or the id of a session the caller did not name.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import uuid
from dataclasses import asdict, dataclass

import grpc

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.workers.protocol import FormatSpecError, KVFormat, RingserveError, SamplingParams

# ------------------------------------------------------------------------------------------------ errors


class RpcError(Exception):
    """Ends a request with a gRPC status code and a message. `sessions`: session ids the message may
    name (the caller's own)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, sessions: tuple[str, ...] = ()):
        super().__init__(code, message)
        self.code, self.message, self.sessions = code, message, tuple(sessions)

    def __str__(self):
        return self.message


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ------------------------------------------------------------------------------------------------ names

SESSION_ID = re.compile(r"s-[0-9a-f]{16}")
_NAME = re.compile(r"(?:sessions/)?(s-[0-9a-f]{16})")


def session_id(name: str, field: str = "name") -> str:
    """The session id of a resource name ("sessions/s-<16 hex>", or the bare id)."""
    m = _NAME.fullmatch(name or "")
    if not m:
        shown = name if len(name or "") <= 64 else name[:64] + "…"
        raise invalid(f"{field} {shown!r} is malformed: expected 'sessions/s-' followed by 16 hex digits")
    return m.group(1)


# ------------------------------------------------------------------------------------------------ enums

RETENTION = {pb.RETENTION_CLASS_UNSPECIFIED: "standard", pb.HOT: "hot", pb.STANDARD: "standard", pb.COLD: "cold"}
RETENTION_ENUM = {"hot": pb.HOT, "standard": pb.STANDARD, "cold": pb.COLD}
PERSIST = {pb.PERSIST_MODE_UNSPECIFIED: "on_demote", pb.ON_DEMOTE: "on_demote", pb.WRITE_THROUGH: "write_through"}
PERSIST_ENUM = {"on_demote": pb.ON_DEMOTE, "write_through": pb.WRITE_THROUGH}
FINISH = {"stop": pb.STOP, "length": pb.LENGTH, "context": pb.CONTEXT_FULL, "stop_sequence": pb.STOP_SEQUENCE}
GROUP_BY = {pb.USAGE_GROUP_BY_UNSPECIFIED: "session", pb.SESSION: "session", pb.TIER: "tier", pb.DAY: "day",
            pb.KV_FORMAT: "kv_format"}
KV_FORMAT = {pb.KV_FORMAT_UNSPECIFIED: "exact", pb.EXACT: "exact", pb.FP8: "fp8", pb.INT4: "int4", pb.KEEP: "keep"}
KV_FORMAT_ENUM = {v: k for k, v in KV_FORMAT.items() if k}
EXPORT_FORMAT = {pb.EXPORT_FORMAT_UNSPECIFIED: "jsonl", pb.JSONL: "jsonl", pb.CSV: "csv"}


def enum_value(table: dict, value: int, field: str) -> str:
    """An enum field's meaning; an unknown number (proto3 keeps them) is INVALID_ARGUMENT."""
    if value not in table:
        names = ", ".join(pb.DESCRIPTOR.enum_types_by_name[_ENUMS[field]].values_by_number[k].name
                          for k in sorted(table) if k)
        raise invalid(f"{field} {value} is not a known value; use one of {names}")
    return table[value]


_ENUMS = {"retention": "RetentionClass", "persist": "PersistMode", "group_by": "UsageGroupBy",
          "format": "ExportFormat", "kv_format": "KvFormat", "session.kv_format": "KvFormat"}


def kv_format(value: int, keep_fraction: float, field: str = "kv_format") -> KVFormat:
    """A request's kv_format and kv_keep_fraction as one KVFormat (the fraction goes with KEEP only)."""
    name = enum_value(KV_FORMAT, value, field)
    try:
        return KVFormat(name, keep_fraction if name == "keep" or keep_fraction else None)
    except FormatSpecError as e:
        raise invalid(f"{field}: {e}") from None


def kv_format_pb(fmt: str) -> tuple[int, float]:
    """A session's format name ("int4", "keep:0.3") as the Session's kv_format and kv_keep_fraction."""
    f = KVFormat.parse(fmt)
    return KV_FORMAT_ENUM[f.name], f.keep_fraction or 0.0

# ------------------------------------------------------------------------------------------------ bounds

MAX_DISPLAY_NAME = 256  # characters (the proto's bound)
MAX_REQUEST_ID = 128  # characters; printable ASCII
MAX_STOPS = 8
MAX_STOP_CHARS = 256
ROLES = ("system", "user", "assistant")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def display_name(value: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        raise invalid(f"display_name has {len(value)} characters; at most {MAX_DISPLAY_NAME} are allowed")
    if any(ord(c) < 0x20 and c not in "\t" for c in value):
        raise invalid("display_name contains control characters")
    return value


def request_id(value: str) -> str:
    """An idempotency key: empty (none) or 1..128 printable ASCII characters (a UUID fits)."""
    if value and not _REQUEST_ID.fullmatch(value):
        raise invalid(f"request_id must be 1..{MAX_REQUEST_ID} printable ASCII characters without spaces "
                      "(a UUID, say)")
    return value


def request_hash(request, exclude: tuple[str, ...] = ("request_id",)) -> str:
    """A digest of what a request asks for (its fields but the idempotency key): a retry with the same
    request_id must carry the same content."""
    copy = type(request)()
    copy.CopyFrom(request)
    for f in exclude:
        copy.ClearField(f)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


# ------------------------------------------------------------------------------------------------ content


@dataclass(frozen=True)
class Content:
    """The content oneof of a create / append / generate: exactly one of text, ids or messages."""

    kind: str  # "text" | "token_ids" | "messages"
    text: str = ""
    ids: tuple[int, ...] = ()
    messages: tuple[dict, ...] = ()

    @property
    def chars(self) -> int:
        """Characters of text to tokenize (0 for token ids)."""
        return len(self.text) + sum(len(m["content"]) for m in self.messages)

    def as_messages(self) -> list[dict]:
        return [{"role": "user", "content": self.text}] if self.kind == "text" else [dict(m) for m in self.messages]


def content(request, oneof: str) -> Content:
    """The request's content, checked for shape (empty, roles); sizes are checked by `check_size`."""
    which = request.WhichOneof(oneof) or ""
    if which == "text":
        if not request.text.strip():
            raise invalid("text is empty")
        return Content("text", text=request.text)
    if which == "token_ids":
        if not request.token_ids.ids:
            raise invalid("token_ids is empty")
        return Content("token_ids", ids=tuple(request.token_ids.ids))
    if which == "messages":
        msgs = tuple({"role": m.role, "content": m.content} for m in request.messages.messages)
        if not msgs:
            raise invalid("messages is empty")
        for m in msgs:
            if m["role"] not in ROLES:
                shown = m["role"][:32]
                raise invalid(f"message role {shown!r} is not one of {ROLES}")
            if not m["content"].strip():
                raise invalid("a message has empty content")
        return Content("messages", messages=msgs)
    field = "prompt" if oneof == "prompt" else "content"
    raise invalid(f"give the {field} as text, token_ids or messages")


def max_text_chars(room_tokens: int, max_token_bytes: int, normalizes: bool) -> int:
    """The most characters of text that can possibly tokenize to `room_tokens` tokens or fewer: every
    token covers at most `max_token_bytes` bytes and every character at least one byte; a tokenizer
    that normalizes (NFC) may shrink text up to 3x first (three Hangul jamo compose to one syllable)."""
    return max(0, room_tokens) * max_token_bytes * (3 if normalizes else 1)


def check_size(c: Content, *, room: int, max_tokens: int, length: int, vocab: int, max_token_bytes: int,
               normalizes: bool, what: str) -> None:
    """Refuse content that cannot fit before any tokenizing: text by a character bound derived from the
    token limit, token ids by their count, then ids outside the vocabulary (negative included)."""
    from ringserve.workers.protocol import ContextLimitError

    if c.kind == "token_ids":
        if len(c.ids) > room:
            raise ContextLimitError(
                f"{what} has {len(c.ids)} tokens; the session holds {length}, and together they exceed the limit "
                f"of {max_tokens} tokens per session")
        bad = [i for i in c.ids if not 0 <= i < vocab]
        if bad:
            raise invalid(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        return
    bound = max_text_chars(room, max_token_bytes, normalizes)
    if c.chars > bound:
        raise ContextLimitError(
            f"{what} has {c.chars} characters of text; the session holds {length} tokens of its limit of "
            f"{max_tokens}, and no text longer than {bound} characters fits in the {max(room, 0)} left")


# ------------------------------------------------------------------------------------------------ time


_MAX_TS = 253402300799  # 9999-12-31T23:59:59Z, the largest valid Timestamp
_MIN_TS = -62135596800  # 0001-01-01T00:00:00Z


def timestamp(ts, field: str) -> float:
    """Seconds of a google.protobuf.Timestamp, refusing the values the type does not allow."""
    if not (_MIN_TS <= ts.seconds <= _MAX_TS) or not 0 <= ts.nanos < 1_000_000_000:
        raise invalid(f"{field} is not a valid timestamp (seconds within years 1..9999, nanos within "
                      "0..999999999)")
    return ts.seconds + ts.nanos / 1e9


def duration(d, field: str) -> float:
    """Seconds of a google.protobuf.Duration, refusing the values the type does not allow."""
    if not -315_576_000_000 <= d.seconds <= 315_576_000_000 or not -999_999_999 <= d.nanos <= 999_999_999 \
            or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
        raise invalid(f"{field} is not a valid duration")
    return d.seconds + d.nanos / 1e9


def ttl(request, now: float, *, default_s: float, max_s: float) -> float:
    """Seconds a new session lives: `ttl` or `expire_time` (a oneof), else the default; within
    (0, max_s]."""
    which = request.WhichOneof("expiration")
    if which == "ttl":
        t = duration(request.ttl, "ttl")
        if t <= 0:
            raise invalid(f"ttl must be positive, got {t:g} s")
    elif which == "expire_time":
        at = timestamp(request.expire_time, "expire_time")
        if at <= now:
            raise invalid("expire_time is in the past")
        t = at - now
    else:
        t = default_s
    if t > max_s:
        raise invalid(f"ttl {t:g} s exceeds the maximum of {max_s:g} s")
    return t


UPDATABLE = ("ttl", "expire_time", "retention", "kv_format", "kv_keep_fraction")


@dataclass(frozen=True)
class Update:
    """What an UpdateSession changes."""

    expire_time: float | None = None  # new absolute expiry
    retention: str | None = None
    kv_format: KVFormat | None = None  # a smaller format (the group refuses one that is not)


def update(request, now: float, *, max_s: float) -> Update:
    """The changes an UpdateSession asks for: the update_mask names them (ttl and expire_time are
    exclusive); unknown or repeated paths are INVALID_ARGUMENT."""
    paths = list(request.update_mask.paths)
    if not paths:
        raise invalid(f"update_mask is empty: name the fields to change ({', '.join(UPDATABLE)})")
    unknown = [p for p in paths if p not in UPDATABLE]
    if unknown:
        shown = unknown[0][:64]
        raise invalid(f"field {shown!r} cannot be updated; updatable: {', '.join(UPDATABLE)}")
    if len(set(paths)) != len(paths):
        raise invalid("update_mask names a field twice")
    if "ttl" in paths and "expire_time" in paths:
        raise invalid("update_mask names both ttl and expire_time: give one")
    s = request.session
    expire = retention = None
    if "ttl" in paths:
        t = duration(s.ttl, "session.ttl")
        if not 0 < t <= max_s:
            raise invalid(f"ttl must be within (0, {max_s:g}] s, got {t:g}")
        expire = now + t
    if "expire_time" in paths:
        at = timestamp(s.expire_time, "session.expire_time")
        if not now < at <= now + max_s:
            raise invalid(f"expire_time must be in the future, at most {max_s:g} s from now")
        expire = at
    if "retention" in paths:
        retention = enum_value(RETENTION, s.retention, "retention")
    fmt = None
    if "kv_format" in paths or "kv_keep_fraction" in paths:
        # kv_keep_fraction alone means KEEP with that fraction; kv_format KEEP needs the fraction too
        value = s.kv_format if "kv_format" in paths else pb.KEEP
        if value == pb.KV_FORMAT_UNSPECIFIED:
            raise invalid("session.kv_format is unset: name the format to store the session in (FP8, INT4, KEEP)")
        if value == pb.KEEP and "kv_keep_fraction" not in paths:
            raise invalid("kv_format KEEP needs kv_keep_fraction in the update_mask too (the fraction of tokens "
                          "to keep)")
        fmt = kv_format(value, s.kv_keep_fraction if "kv_keep_fraction" in paths else 0.0, "session.kv_format")
    return Update(expire, retention, fmt)


# ------------------------------------------------------------------------------------------------ generate


def sampling(request, max_generate: int) -> dict:
    """The request's sampling values, checked by the one rule (`SamplingParams`); sent as a dict."""
    s = request.sampling
    n = request.max_tokens or 256
    if not 1 <= n <= max_generate:
        raise invalid(f"max_tokens must be within 1..{max_generate}, got {request.max_tokens}")
    try:
        p = SamplingParams(temperature=float(s.temperature), top_p=float(s.top_p or 1.0), top_k=int(s.top_k),
                           seed=int(s.seed) if s.HasField("seed") else None, max_tokens=n)
    except ValueError as e:
        raise invalid(str(e)) from None
    return asdict(p)


def stops(request) -> list[str]:
    out = list(request.stop)
    if len(out) > MAX_STOPS:
        raise invalid(f"stop takes at most {MAX_STOPS} strings, got {len(out)}")
    for s in out:
        if not s:
            raise invalid("stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise invalid(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
    return out


# ------------------------------------------------------------------------------------------------ lists

MAX_PAGE = 1000
MAX_OFFSET = 10_000_000


def page_size(value: int) -> int:
    size = value or 50
    if not 1 <= size <= MAX_PAGE:
        raise invalid(f"page_size must be within 1..{MAX_PAGE}, got {value}")
    return size


def _tag(tenant: str, offset: int) -> str:
    return hashlib.sha256(f"ringserve-page\0{tenant}\0{offset}".encode()).hexdigest()[:16]


def page_token(tenant: str, offset: int) -> str:
    """An opaque next_page_token. It names the offset and is bound to the tenant by a checksum, so a
    token of another tenant or an edited one is refused (it can only ever page the caller's own list)."""
    return base64.urlsafe_b64encode(f"{offset}.{_tag(tenant, offset)}".encode()).decode().rstrip("=")


def page_offset(tenant: str, token: str) -> int:
    if not token:
        return 0
    bad = invalid("page_token is not one this server issued to you: pass next_page_token unchanged")
    if len(token) > 64:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        off_s, tag = raw.split(".", 1)
        offset = int(off_s)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if not 0 < offset <= MAX_OFFSET or off_s != str(offset) or tag != _tag(tenant, offset):
        raise bad
    return offset


# ------------------------------------------------------------------------------------------------ usage


@dataclass(frozen=True)
class UsageScope:
    tenant: str
    start: float
    end: float
    session: str | None


def usage_scope(request, tenant: str, admin: bool, now: float) -> UsageScope:
    """(tenant, start, end, session) of a GetUsage / ExportUsage request, checked (not the range length,
    which the ledger checks)."""
    if request.tenant and request.tenant != tenant:
        if not admin:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "reading another tenant's usage needs an admin API key")
        tenant = request.tenant
    if not request.HasField("start_time"):
        raise invalid("start_time is required")
    start = timestamp(request.start_time, "start_time")
    end = timestamp(request.end_time, "end_time") if request.HasField("end_time") else now
    sid = session_id(request.session, "session") if request.session else None
    return UsageScope(tenant, start, end, sid)


# ------------------------------------------------------------------------------------------------ status


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception from any layer: the data plane names its own code; the
    registry's and the ledger's refusals, Redis outages and Ray's unavailability have theirs; anything
    else is INTERNAL, with a reference instead of its text (the text goes to the log)."""
    from .billing import BelowMinimum, BillingError
    from .registry import Conflict, LimitExceeded

    if isinstance(e, RpcError):
        return e.code, e.message
    if isinstance(e, RingserveError):
        code = getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)
        return code, f"{e}; retry shortly" if code == grpc.StatusCode.UNAVAILABLE else str(e)
    if isinstance(e, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, Conflict):
        return grpc.StatusCode.ABORTED, f"{e}; retry"
    if isinstance(e, BelowMinimum):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, BillingError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    from ringserve.workers.tokenizer import ChatTemplateError

    if isinstance(e, ChatTemplateError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    import redis

    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
        return grpc.StatusCode.UNAVAILABLE, "the session registry or billing ledger (Redis) is unreachable; retry shortly"
    if isinstance(e, redis.ResponseError) and "NOSCRIPT" not in str(e):
        return grpc.StatusCode.UNAVAILABLE, "the session registry or billing ledger (Redis) refused a write; retry shortly"
    if _ray_unavailable(e):
        return grpc.StatusCode.UNAVAILABLE, "a worker group is restarting; retry shortly"
    if isinstance(e, TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "a worker group did not answer in time; retry shortly"
    return grpc.StatusCode.INTERNAL, f"internal error (reference {uuid.uuid4().hex[:12]}); it was logged"


def _ray_unavailable(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
                         "BackPressureError", "RayServeException", "GetTimeoutError", "WorkerCrashedError",
                         "NodeDiedError", "ObjectLostError", "OwnerDiedError"})


_TRACE = re.compile(r"Traceback \(most recent call last\)|\n\s*File \"")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
_IPV6 = re.compile(r"\[(?=[0-9a-fA-F:.]*[.:][0-9a-fA-F:.]*[.:])[0-9a-fA-F:.]+\](?::\d+)?")  # [::1]:80, [10.0.0.1]:5
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_HOSTPORT = re.compile(r"\b[A-Za-z][\w-]*(?:\.[\w-]+)*:\d{2,5}\b")
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}(?::\d+)*")
_HEXID = re.compile(r"\b[0-9a-f]{24,}\b")
MAX_MESSAGE = 1024


def sanitize(message: str, own: tuple[str, ...] | set[str] = ()) -> str:
    """A message fit for a client: no stack text, internal addresses (IPs, host:port, URLs), source
    paths, long hex ids (Ray actor / object ids), or session ids the caller did not name; at most
    MAX_MESSAGE characters."""
    m = _TRACE.search(message)
    if m:
        message = message[:m.start()].rstrip() or "internal error"
    message = _URL.sub("<address>", message)
    message = _PATH.sub("<path>", message)
    message = _IPV6.sub("<address>", message)
    message = _IPV4.sub("<address>", message)
    message = _HOSTPORT.sub("<address>", message)
    message = _HEXID.sub("<id>", message)
    mine = set(own)
    message = SESSION_ID.sub(lambda m: m.group(0) if m.group(0) in mine else "<another session>", message)
    message = " ".join(message.split())  # no multi-line output
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    return message


def is_finite(x: float) -> bool:
    return math.isfinite(x)
