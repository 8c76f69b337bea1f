"""What passes between a group's scheduler and its ranks, one step at a time. No torch, no Ray.

The scheduler (workers/scheduler.py) decides; the ranks (workers/executor.py) execute. Every step the
scheduler sends one `StepPlan` to every rank — the same plan, so the ranks run the same collectives
in the same order — and every rank answers with a `StepResult`. The results of all ranks must agree
(the scheduler checks); rank 0's carry the sampled tokens.

    Request      a create, an append or a generate, as submitted (ids already tokenized)
    StepPlan     drops, ends, admissions, prefill chunks and the decode batch of one step
    StepEvent    what happened to one request in a step
    StepResult   a rank's events of one step and what it computed
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .protocol import GenerationEnd, Progress, RingserveError, SamplingParams, SessionInfo

KINDS = ("create", "append", "generate", "convert")


@dataclass(frozen=True)
class Request:
    id: str  # given by the scheduler, unique within a group
    kind: str  # "create" | "append" | "generate" | "convert" (a change of KV format, opts kv_format, keep_fraction)
    session: str
    ids: tuple[int, ...]
    opts: dict = field(default_factory=dict)  # create: retention, persist, ttl_s, allow_quantized, kv_format
    sampling: SamplingParams = SamplingParams()  # generate
    retain: bool = False  # generate: keep the turn in the session
    stop_ids: tuple[int, ...] | None = None  # generate: None = the model's end-of-turn tokens
    progress_every: int = 0  # create / append: report progress at most every this many tokens


@dataclass(frozen=True)
class StepPlan:
    step: int
    drops: tuple[str, ...] = ()  # sessions deleted before anything else (their requests are ended first)
    ends: tuple[tuple[str, str], ...] = ()  # (request, why): "cancel" (roll back) or "stop_sequence" (finish)
    admit: tuple[Request, ...] = ()  # requests that join: their session is leased and their pages reserved
    prefill: tuple[str, ...] = ()  # requests that run one prefill chunk this step, in this order
    decode: tuple[str, ...] = ()  # requests in this step's decode batch (one token each)

    @property
    def empty(self) -> bool:
        return not (self.drops or self.ends or self.admit or self.prefill or self.decode)


@dataclass(frozen=True)
class StepEvent:
    request: str
    kind: str  # "admitted" | "progress" | "token" | "done" | "failed"
    progress: Progress | None = None
    token: int | None = None
    end: GenerationEnd | None = None  # generate done: why, and the tokens it computed
    info: SessionInfo | None = None  # create / append done: the session (this rank's view)
    error: RingserveError | None = None  # failed: the same error on every rank
    computed: int = 0  # failed / ended: tokens the request had computed (billing)


@dataclass(frozen=True)
class StepResult:
    step: int
    rank: int
    events: tuple[StepEvent, ...]
    prefill_tokens: int = 0
    decode_tokens: int = 0
    seconds: float = 0.0

    def agrees_with(self, other: "StepResult") -> bool:
        """The same requests ended the same way with the same tokens (ranks in lockstep)."""
        def key(r):
            return [(e.request, e.kind, e.token, e.end.reason if e.end else None) for e in r.events
                    if e.kind in ("token", "done", "failed")]
        return key(self) == key(other)
