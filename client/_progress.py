"""Prefill progress: a one-line bar on stderr, or the caller's own callback."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Union

#: ``progress=``: False (silent), True (bar on stderr) or a callable receiving (tokens_done, tokens_total).
ProgressArg = Union[bool, Callable[[int, int], None]]


class ProgressBar:
    """Draws ``prefill [##########..........]  61,440/120,000 tokens  51%  8,192 tok/s`` in place.

    Redraws at most every ``min_interval`` seconds (the last update always draws) and ends the
    line on :meth:`close`. The rate is tokens done over the time since the bar was created, so it
    includes queueing; that is the rate the caller experiences.
    """

    def __init__(self, label: str = "prefill", width: int = 30, min_interval: float = 0.1):
        self.label = label
        self.width = width
        self.min_interval = min_interval
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        frac = min(done / total, 1.0) if total > 0 else 1.0
        filled = round(frac * self.width)
        rate = done / max(now - self._start, 1e-9)
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{done:,}/{total:,} tokens {frac:4.0%} {rate:,.0f} tok/s")
        # sys.stderr is looked up per draw, so redirection (and pytest's capture) is honoured.
        sys.stderr.write("\r" + line)
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


def progress_reporter(progress: ProgressArg, label: str) -> tuple[Callable[[int, int], None] | None,
                                                                  Callable[[], None]]:
    """(callback or None, close) for a ``progress=`` argument."""
    if progress is True:
        bar = ProgressBar(label)
        return bar, bar.close
    if progress is False or progress is None:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    raise TypeError(f"progress must be True, False or a callable(done, total), got {progress!r}")
