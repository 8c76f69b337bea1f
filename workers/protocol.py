"""Typed contracts between the data plane and the control plane. No torch, no Ray, no Serve.

Everything that crosses a process boundary on the way from a rank to a client is defined here:
`ShardWorker` (a Ray actor) -> `WorkerGroup` -> the `SequenceParallelGroup` Serve deployment -> the
`Gateway`. The Gateway imports this module only (not the engine or the store), so errors carry the
gRPC status they map to (`RingserveError.grpc_code`) instead of being recognised by class.

    Tier            the KV tiers, with both the store's names ("device") and the API's ("HBM")
    ContextLimit    the one rule for how many tokens a session may hold
    Progress        a prefill progress event (tokens done / total)
    SessionInfo     one session as a group holds it (length, tier, tier history, bytes)
    GenerationEnd   the last item of a token stream: why it ended and what it computed
    RankStats       one rank: KV bytes and pages per tier, ring counters, store counters
    GroupCapacity   one group: what placement, `Status` and metrics read
    MeterReport     what the billing meter reads from a group (tier histories, policy moves)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# ------------------------------------------------------------------------------------------------ tiers


class Tier(str, Enum):
    """Where a session's KV lives, fastest first. The value is the store's name; `api` is the name
    of the same tier in the ringserve.v1 API (enum `Tier`), in metrics tags and in billing."""

    DEVICE = "device"
    HOST = "host"
    REDIS = "redis"

    @property
    def api(self) -> str:
        return {"device": "hbm", "host": "host", "redis": "redis"}[self.value]

    @classmethod
    def parse(cls, name: "str | Tier") -> "Tier":
        """A tier from either name ("device" or "hbm", any case)."""
        if isinstance(name, Tier):
            return name
        n = str(name).lower()
        for t in cls:
            if n in (t.value, t.api):
                return t
        raise ValueError(f"unknown tier {name!r}; tiers: {', '.join(t.value for t in cls)} (API: hbm, host, redis)")


TIERS = tuple(Tier)

# ------------------------------------------------------------------------------------------------ errors


class RingserveError(Exception):
    """Base of the errors a request can end with. `grpc_code` names the gRPC status (grpc.StatusCode
    member name) the Gateway answers with; the message says what to change."""

    grpc_code = "INTERNAL"

    def __str__(self) -> str:  # KeyError subclasses would quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class PromptError(RingserveError, ValueError):
    """The request's tokens cannot be served as given (empty, ids outside the vocabulary)."""

    grpc_code = "INVALID_ARGUMENT"


class ContextLimitError(RingserveError, ValueError):
    """The session would hold more tokens than its group allows (the model's context)."""

    grpc_code = "FAILED_PRECONDITION"


class SessionError(RingserveError, KeyError):
    """The group holds no session by that id."""

    grpc_code = "NOT_FOUND"


class SessionExistsError(RingserveError, ValueError):
    grpc_code = "ALREADY_EXISTS"


class KVStoreError(RingserveError):
    """Base class of the KV store's errors."""


class KVUnavailableError(KVStoreError):
    """Redis could not be reached after a bounded retry (retry later)."""

    grpc_code = "UNAVAILABLE"


class KVDataLossError(KVStoreError):
    """Stored KV failed verification or its manifest is gone; the session is lost."""

    grpc_code = "DATA_LOSS"


class KVNotFoundError(KVStoreError, SessionError):
    """No such session in this store or in Redis."""

    grpc_code = "NOT_FOUND"


class KVCapacityError(KVStoreError):
    """The tiers cannot hold the session, or free pages ran out (the message gives the numbers)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class GroupUnhealthy(RingserveError, RuntimeError):
    """A rank died or stopped answering; the group must be rebuilt."""

    grpc_code = "UNAVAILABLE"


class FormatError(RingserveError):
    """A KV format change that cannot be made (formats only move down; KEEP thins an exact session once)."""

    grpc_code = "FAILED_PRECONDITION"


class FormatSpecError(RingserveError, ValueError):
    """A KV format name a client sent that is not one (unknown name, keep fraction outside (0, 1))."""

    grpc_code = "INVALID_ARGUMENT"


class RequestCancelled(RingserveError):
    """The request was cancelled (its client left, its deadline passed, or its session was deleted)."""

    grpc_code = "CANCELLED"


class QueueFull(RingserveError):
    """The group's queue is full, or a request waited longer than the queue allows for its pages."""

    grpc_code = "RESOURCE_EXHAUSTED"


class SamplingError(RingserveError):
    """Sampling found no valid next token (non-finite logits): the request fails, the group goes on."""

    grpc_code = "INVALID_ARGUMENT"


# ------------------------------------------------------------------------------------------------ sampling

GREEDY_BELOW = 1e-5  # a temperature under this is greedy (vLLM's rule): 1/T would overflow fp32 logits
MAX_TEMPERATURE = 10.0


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The one place these values are checked (the Gateway turns a
    ValueError from here into INVALID_ARGUMENT)."""

    temperature: float = 0.0  # < GREEDY_BELOW: greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int | None = None  # a fixed seed makes sampling reproducible
    max_tokens: int = 256

    def __post_init__(self):
        import math

        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (below "
                             f"{GREEDY_BELOW:g}: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


# ------------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class KVFormat:
    """A session's retained KV format as clients name it: "exact", "fp8", "int4" (packed in the session's
    pages, workers/kvcodec.py) or "keep:<fraction>" (exact, a fraction of the tokens kept, workers/keep.py).
    The one parser of that name, for the SDK, the Gateway and the recall benchmark."""

    name: str = "exact"
    keep_fraction: float | None = None

    NAMES = ("exact", "fp8", "int4", "keep")

    def __post_init__(self):
        if self.name not in self.NAMES:
            raise FormatSpecError(f"unknown KV format {self.name!r}; formats: exact, fp8, int4, keep:<fraction>")
        if (self.name == "keep") != (self.keep_fraction is not None):
            raise FormatSpecError("a keep fraction goes with the format keep, and only with it ('keep:0.3')")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction < 1.0:
            raise FormatSpecError(f"the keep fraction must be within (0, 1), got {self.keep_fraction}")

    @classmethod
    def parse(cls, text: "str | KVFormat | None") -> "KVFormat":
        if isinstance(text, KVFormat):
            return text
        name, _, frac = (text or "exact").strip().lower().partition(":")
        if name == "keep" and not frac:
            raise FormatSpecError("keep needs the fraction of tokens to keep: 'keep:0.3'")
        try:
            return cls(name, float(frac) if frac else None)
        except ValueError as e:
            if isinstance(e, FormatSpecError):
                raise
            raise FormatSpecError(f"the keep fraction in {text!r} is not a number") from None

    def __str__(self) -> str:
        return self.name if self.keep_fraction is None else f"keep:{self.keep_fraction:g}"


@dataclass(frozen=True)
class ContextLimit:
    """How many tokens one session may hold: positions 0 .. max_tokens-1, answers included.

    The single rule every layer applies (the engine before it computes, the Gateway before it
    forwards), so a request refused by one is refused by all with the same numbers.
    """

    max_tokens: int
    reason: str = ""  # why the limit is what it is, when the model's config says more (e.g. no Dual Chunk Attention)

    @classmethod
    def of(cls, model_cfg, max_context: int | None = None, beyond_model: bool = False) -> "ContextLimit":
        """The limit of a model (`ModelConfig`: its usable context, and the reason when its config says
        more), lowered by a configured max_context; raised past the model only with beyond_model."""
        n = model_cfg.context_limit(max_context, beyond_model=beyond_model)
        return cls(n, model_cfg.context_note if n == model_cfg.max_context else "")

    def _why(self) -> str:
        return self.reason or "the model's context, or the configured max_context"

    def check_add(self, length: int, n: int, what: str = "the content") -> None:
        """Adding n tokens to a session of `length` tokens must stay within the limit."""
        if length + n > self.max_tokens:
            raise ContextLimitError(
                f"{what} has {n} tokens; the session holds {length}, and together they exceed the limit of "
                f"{self.max_tokens} tokens per session ({self._why()})")

    def generate_budget(self, length: int, n_prompt: int, max_new: int) -> int:
        """Most tokens a Generate may produce after an n_prompt-token prompt. Every generated token takes
        a position (a retained turn keeps them), and one position stays free for the end-of-turn token."""
        room = self.max_tokens - length - n_prompt - 1
        if room < 1:
            raise ContextLimitError(
                f"the session holds {length} tokens; a {n_prompt}-token prompt leaves no room for an answer "
                f"under the limit of {self.max_tokens} tokens per session ({self._why()})")
        return min(max_new, room)


def stop_at(text: str, stops) -> int | None:
    """Where the first of the stop strings starts in `text`, or None: the one rule the group (which ends
    the generation) and the Gateway (which cuts the text) share."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Progress:
    """Prefill progress of one create / append call, reported after a prefill chunk."""

    done: int  # tokens prefilled so far in this call
    total: int  # tokens of the call


@dataclass(frozen=True)
class TierMove:
    number: int  # increases by one per change of tier; the first entry is the placement
    seconds_ago: float
    tier: Tier


@dataclass(frozen=True)
class SessionInfo:
    """One session as a group holds it (rank 0's view; bytes and tokens summed over the ranks)."""

    session: str
    length: int  # tokens of the whole session (all ranks)
    tier: Tier | None  # None while lost
    state: str = "resident"  # "resident" | "moving" | "lost"
    moves: tuple[TierMove, ...] = ()
    retention: str = "standard"
    kv_bytes: int = 0  # bytes the session occupies in its tier, over every rank
    local_tokens: tuple[int, ...] = ()  # tokens held per rank
    persisted_tokens: int = 0  # tokens (of rank 0) with a committed copy in Redis
    group: str = ""
    kv_format: str = "exact"  # "exact" | "fp8" | "int4", or "keep:<fraction>" (a thinned exact session)
    exact_bytes: int = 0  # what its tokens take in the exact format (tokens x bytes per token), over every rank
    stored_bytes: int = 0  # what its stored tokens take in its format, scales included (kv_bytes less unused
    # page slots): stored_bytes / exact_bytes prices its retention

    def with_group(self, group: str) -> "SessionInfo":
        from dataclasses import replace

        return replace(self, group=group)


@dataclass(frozen=True)
class GenerationEnd:
    """The last item of a Generate stream."""

    reason: str  # "stop" (an end-of-turn / stop token), "length" (max_tokens), "context" (limit reached)
    prompt_tokens: int
    generated_tokens: int
    retained_tokens: int = 0  # tokens the session grew by (a retained turn), else 0


@dataclass(frozen=True)
class MoveCount:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class StoreCounters:
    """Cumulative counts of one rank's KV store (for metrics and for the in-place checks)."""

    moves: dict[tuple[str, str], MoveCount] = field(default_factory=dict)  # (from tier, to tier)
    restores: int = 0
    lost: int = 0
    redis_errors: int = 0
    bytes_written: int = 0  # new tokens' K/V written into device pages
    bytes_copied: int = 0  # retained K/V copied on or into the device tier (promotion, restore, reads)
    pages_allocated: int = 0  # device pages handed out, ever


@dataclass(frozen=True)
class TierBytes:
    device: int = 0
    host: int = 0
    redis: int = 0

    def get(self, tier: Tier | str) -> int:
        return getattr(self, Tier.parse(tier).value)

    def api(self) -> dict[str, int]:
        """{"hbm": .., "host": .., "redis": ..}: the API's and the metrics' names."""
        return {t.api: self.get(t) for t in Tier}


@dataclass(frozen=True)
class RankStats:
    rank: int
    device: str
    sessions: int
    kv_bytes: TierBytes
    free_device_bytes: int
    page_bytes: int = 0
    device_pages: int = 0
    free_device_pages: int = 0
    ring_steps: int = 0
    ring_wait_s: float = 0.0
    ring_bytes_sent: int = 0  # the chunks' K/V sent around the ring
    busy_s: float = 0.0  # seconds spent in prefill / append calls
    modes: dict[str, int] = field(default_factory=dict)  # prefill chunks run per attention mode
    counters: StoreCounters = field(default_factory=StoreCounters)
    redis_degraded: bool = False


@dataclass(frozen=True)
class SchedulerStats:
    """A group scheduler's state, answered between steps (never waits for one)."""

    waiting: int = 0  # requests queued
    running: int = 0  # requests admitted (leased, pages reserved)
    prefilling: int = 0  # ... of them still prefilling
    decoding: int = 0  # ... of them in the decode batch
    steps: int = 0
    last_batch: int = 0  # tokens decoded in the last step (its decode batch size)
    last_prefill_tokens: int = 0  # tokens prefilled in the last step
    prefill_tokens: int = 0  # cumulative
    decode_tokens: int = 0  # cumulative
    preemptions: int = 0  # times a started prefill yielded a step to other requests
    last_step_s: float = 0.0


@dataclass(frozen=True)
class GroupCapacity:
    group: str
    healthy: bool
    sessions: int
    free_kv_bytes: int  # free device-tier bytes over the ranks: what placement reads
    kv_bytes: TierBytes
    ranks: tuple[RankStats, ...] = ()
    rebuilds: int = 0
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)


@dataclass(frozen=True)
class MeterReport:
    group: str
    moved: tuple[tuple[str, str, str], ...]  # (session, from tier, to tier) made by this policy pass
    sessions: dict[str, SessionInfo]
