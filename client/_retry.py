"""When to retry a failed call, and how long to wait first.

The rules (ANCHORS.md, "gRPC conventions"):

- only UNAVAILABLE is retried; every other code means retrying the same request won't help
  (FAILED_PRECONDITION waits for a state change, ABORTED is retried a level higher);
- exponential backoff with full jitter: before retry ``n`` (0-based) wait a uniform random time
  in ``[0, min(cap, base * 2**n)]``, so many clients hitting one outage don't retry in lockstep;
- one deadline covers all attempts: a retry that would start after it is not made, and the
  last error is raised instead.

Streams add one rule, applied by the transports: a stream is retried only if it failed before
its first message arrived. After that the caller has seen data, and a token stream has no
resume point.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for UNAVAILABLE.

    Attributes:
        retries: retries after the first attempt (so at most ``retries + 1`` attempts).
        base: seconds; the jitter window before the first retry.
        cap: seconds; the largest jitter window.
    """

    retries: int = 4
    base: float = 0.2
    cap: float = 5.0

    def __post_init__(self):
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.base < 0 or self.cap < 0:
            raise ValueError(f"backoff base and cap must be >= 0, got base={self.base}, cap={self.cap}")

    def delay(self, retry: int, code: grpc.StatusCode, deadline: float) -> float | None:
        """Seconds to sleep before retry number ``retry`` (0-based), or None to give up.

        ``deadline`` is a ``time.monotonic()`` instant: no retry starts at or after it.
        """
        if code not in RETRYABLE or retry >= self.retries:
            return None
        wait = random.uniform(0.0, min(self.cap, self.base * 2**retry))
        if time.monotonic() + wait >= deadline:
            return None
        return wait
