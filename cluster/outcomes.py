"""What a request cost and did, as the group that ran it reports it. No Ray, no torch.

The Gateway gives every create, append and generate a `Bill` (a server-side id and what bookkeeping
needs: tenant, cached tokens, the quota reservation and idempotency key it holds). The group
deployment (cluster/groups.py) journals an `Outcome` for it when the request ends — however it ends:
done, failed, cancelled by its client, or ended by a delete — with the tokens the group's scheduler
computed for it. The Gateway settles the outcome when its stream ends; the meter pass settles every
journaled outcome again (idempotently: the ledger event id is the bill id), so a stream whose client
went away, or whose Gateway died, is still billed exactly once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def new_bill_id() -> str:
    return "b" + uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class Bill:
    id: str  # server-side, unique: the ledger event of the request's compute is f"c:{id}"
    tenant: str
    session: str
    kind: str  # "create" | "append" | "generate"
    cached: int = 0  # generate: tokens of retained context it is answered from
    retain: bool = False  # generate: a retained turn
    reservation: int = 0  # tokens reserved against the tenant's quota for its growth (released when settled)
    idem: str = ""  # idempotency key (registry) it holds while pending, "" if none


@dataclass(frozen=True)
class Outcome:
    bill: Bill
    status: str  # "done" | "failed" | "cancelled" (its client went away) | "dropped" (its session was deleted)
    prompt_tokens: int = 0  # prompt / content tokens the group prefilled for it
    generated_tokens: int = 0  # tokens it generated
    retained_tokens: int = 0  # tokens the session grew by (create: its length)
    length: int = 0  # the session's length after it (done create / append / retained turn), else 0
    finish: str = ""  # generate done: "stop" | "length" | "context" | "stop_sequence"
    error: BaseException | None = field(default=None, compare=False)  # failed: why

    @property
    def computed(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class GroupReport:
    """What the Gateway's meter pass reads from a group each round."""

    group: str
    epoch: str  # changes when the group's replica restarts or its WorkerGroup is rebuilt: sessions held
    #              only in memory are gone, persisted ones must be restored
    sessions: dict | None  # session id -> SessionInfo (tier history, bytes, length); None: group unavailable
    busy: frozenset  # sessions with a request in flight
    outcomes: tuple  # Outcomes not acknowledged yet, oldest first
