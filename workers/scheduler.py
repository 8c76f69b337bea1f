"""One scheduler per group: it decides, the ranks execute (vLLM V1's split).

Requests (creates, appends, generates) are submitted here and each gets a `Handle` that streams its
results. A step loop builds one `StepPlan` per step and runs it on every rank (workers/executor.py):

  * **ends and drops first**: cancelled requests (client gone, deadline passed), generates whose
    stop string matched (checked here, on the detokenized text), and deletes of sessions — a delete
    ends the requests running on that session and frees its pages at this step boundary;
  * **admission**: waiting requests join in arrival order, one request per session at a time, up to
    `max_running`; the ranks lease the session and reserve every page the request can need (prompt,
    answer budget, end-of-turn token), so a running request can never run out of pages. If the pages
    are not free the request waits (until a running request finishes, at most `queue_timeout_s`) or,
    when nothing is running that could free them, fails with RESOURCE_EXHAUSTED;
  * **prefill under a token budget**: up to `step_tokens` tokens of prefill work. Prompts that finish
    in one chunk go first (oldest first), then the long prefills (creates, long appends) one chunk
    each, round-robin — so a short prompt is never stuck behind a long create: a 1M-token create
    yields between its chunks (each yield counts as a preemption), and runs again at the latest one
    step later, even past the budget, so short prompts cannot starve it either;
  * **the decode batch**: one new token for every running generate, across all sessions, in one
    forward and one sampling pass.

`SchedulerCore` is the pure decision state machine (no threads, no Ray): the same submissions give
the same plans, which is what lets every rank of a gloo group drive its own copy in lockstep
(`run_local`). `Scheduler` runs a core on a thread against a group's ranks and answers control
questions (`stats`) from its state between steps.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

from .plan import Request, StepPlan, StepResult
from .protocol import (GenerationEnd, GroupUnhealthy, KVCapacityError, Progress, QueueFull, RequestCancelled,
                       RingserveError, SamplingParams, SchedulerStats, SessionError, SessionInfo, stop_at)


@dataclass(frozen=True)
class SchedulerConfig:
    prefill_chunk: int  # tokens per prefill chunk (the engines')
    step_tokens: int = 0  # prefill tokens per step, shared by the waiting prefills; 0 = one chunk
    max_running: int = 64  # requests admitted at once (bounds the decode batch)
    max_waiting: int = 1024  # requests queued beyond that: more are refused with RESOURCE_EXHAUSTED
    queue_timeout_s: float = 60.0  # a request waiting for pages fails after this

    @property
    def budget(self) -> int:
        return self.step_tokens or self.prefill_chunk


class Handle:
    """One request's results, in order: for a create / append, Progress events then the SessionInfo; for
    a generate, token ids then a GenerationEnd. An error ends the stream (raised by the iterator).
    Iterate it (`for x in h`) from a thread, or `async for x in h` when it was submitted with a loop."""

    _END = object()

    def __init__(self, req: Request, stops: tuple[str, ...], stream, loop=None, on_cancel=None):
        self.req, self.stops, self._stream, self._loop = req, stops, stream, loop
        self._on_cancel = on_cancel
        self.id = req.id
        self.submitted = time.monotonic()
        self.state = "waiting"  # -> "running" -> "done"
        self.phase = "prefill"  # -> "decode" (a generate after its first token)
        self.remaining = len(req.ids)  # prompt tokens not prefilled yet
        self.prefilled_once = False
        self.deferred = 0  # steps a long prefill waited for shorter ones in a row
        self.text = ""
        self.computed = 0  # tokens the group computed for it (reported when it ended)
        self.end: GenerationEnd | None = None
        self.error: BaseException | None = None
        self.retry_after: int | None = None  # waiting for pages: admit again once more requests finished
        self.cancel_error: RingserveError | None = None
        if loop is not None:
            import asyncio

            self._aq: asyncio.Queue = asyncio.Queue()
        else:
            self._q: queue.Queue = queue.Queue()

    # -- producer side (the scheduler, under its lock) -----------------------------------------------

    def _push(self, item) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
        else:
            self._q.put(item)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.state == "done":
            return
        self.state, self.error = "done", error
        self._push(self._END)

    # -- consumer side -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state == "done"

    def cancel(self) -> None:
        """Stop the request: it leaves the batch at the next step boundary and stops costing compute."""
        if self._on_cancel is not None and not self.done:
            self._on_cancel(self)

    def _item(self, item):
        if item is self._END:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def __iter__(self) -> Iterator:
        while True:
            try:
                yield self._item(self._q.get())
            except StopIteration:
                return

    def pending(self) -> list:
        """What is ready now, without waiting (for `run_local`)."""
        out = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return out
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return out
            out.append(item)

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        import asyncio

        try:
            while True:
                item = await self._aq.get()
                try:
                    yield self._item(item)
                except StopIteration:
                    return
        except (asyncio.CancelledError, GeneratorExit):  # the consumer went away: stop the work
            self.cancel()
            raise


class SchedulerCore:
    """The decisions of one group's scheduler, as a state machine; see the module docstring."""

    def __init__(self, cfg: SchedulerConfig, tokenizer=None):
        self.cfg, self.tok = cfg, tokenizer
        self.waiting: deque[Handle] = deque()
        self.running: dict[str, Handle] = {}
        self.ends: dict[str, str] = {}  # request -> "cancel" | "stop_sequence", applied at the next step
        self.drops: dict[str, list[Callable[[], None]]] = {}  # session -> callbacks once it is gone
        self._ids = itertools.count(1)
        self.step = 0
        self.finished = 0
        self._rr = 0
        self.on_cancel = None  # set by the threaded Scheduler (cancel under its lock)
        self._stats = dict(prefill_tokens=0, decode_tokens=0, preemptions=0, last_batch=0, last_prefill=0,
                           last_step_s=0.0)

    # -- submissions ---------------------------------------------------------------------------------

    def submit(self, kind: str, session: str, ids, *, opts: dict | None = None,
               sampling: SamplingParams | None = None, retain: bool = False, stop_ids=None, stops=(),
               progress_every: int = 0, loop=None) -> Handle:
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"the group's queue holds {len(self.waiting)} requests, its limit "
                            f"(max_waiting {self.cfg.max_waiting}); retry later")
        req = Request(f"r{next(self._ids)}", kind, session, tuple(int(i) for i in ids), dict(opts or {}),
                      sampling or SamplingParams(), retain, tuple(stop_ids) if stop_ids is not None else None,
                      progress_every)
        stream = self.tok.stream() if (self.tok is not None and stops) else None
        h = Handle(req, tuple(stops), stream, loop, self.on_cancel or self.cancel)
        self.waiting.append(h)
        return h

    def cancel(self, h: Handle) -> None:
        if h in self.waiting:
            self.waiting.remove(h)
            h._finish(RequestCancelled(f"request {h.id} was cancelled before it started"))
        elif h.id in self.running:
            self.ends.setdefault(h.id, "cancel")

    def drop(self, session: str, when_done: Callable[[], None]) -> None:
        """Delete a session at the next step boundary (its running request is ended first)."""
        self.drops.setdefault(session, []).append(when_done)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.drops or self.ends)

    # -- planning ------------------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        self.step += 1
        ends: list[tuple[str, str]] = []
        drops = list(self.drops)
        for sid in drops:
            for h in [h for h in self.running.values() if h.req.session == sid]:
                ends.append((h.id, "cancel"))
                h.cancel_error = RequestCancelled(f"session {sid} was deleted while request {h.id} ran on it")
            for h in [h for h in self.waiting if h.req.session == sid]:
                self.waiting.remove(h)
                h._finish(SessionError(f"session {sid} was deleted"))
        ended = {rid for rid, _ in ends}
        for rid, why in self.ends.items():
            if rid in self.running and rid not in ended:
                ends.append((rid, why))
                ended.add(rid)
        self.ends.clear()
        live = [h for h in self.running.values() if h.id not in ended]
        busy = {h.req.session for h in live} | set(drops)
        admit = []
        for h in list(self.waiting):
            if len(live) + len(admit) >= self.cfg.max_running:
                break
            if h.req.session in busy:
                continue
            if h.retry_after is not None and self.finished <= h.retry_after and live:
                continue  # waits for pages: a running request has to finish first
            self.waiting.remove(h)
            self.running[h.id] = h
            h.state = "running"
            admit.append(h)
            busy.add(h.req.session)
        # prefill within the step's token budget: prompts that finish in one chunk first (oldest first),
        # then the long prefills round-robin; a long prefill that yielded last step runs now even past
        # the budget (one per step), so a stream of short prompts cannot starve it
        chunk = self.cfg.prefill_chunk
        cands = [h for h in live + admit if h.phase == "prefill" and h.remaining > 0]
        short = [h for h in cands if h.remaining <= chunk]
        long = [h for h in cands if h.remaining > chunk]
        if long:
            k = self._rr % len(long)
            long = long[k:] + long[:k]
            self._rr += 1
        budget, chosen, forced = self.cfg.budget, [], False
        for h in short:
            if chosen and h.remaining > budget:
                continue
            chosen.append(h.id)
            budget -= h.remaining
        for h in long:
            if not chosen or chunk <= budget or (h.deferred and not forced):
                forced |= bool(chosen) and chunk > budget
                chosen.append(h.id)
                budget -= chunk
                h.deferred = 0
            else:
                h.deferred += 1
                if h.prefilled_once:
                    self._stats["preemptions"] += 1  # a started prefill yields this step to the others
        decode = [h.id for h in live if h.phase == "decode"]
        return StepPlan(self.step, tuple(drops), tuple(ends), tuple(h.req for h in admit), tuple(chosen), tuple(decode))

    # -- results -------------------------------------------------------------------------------------

    def apply(self, plan: StepPlan, results: list[StepResult]) -> None:
        r0 = results[0]
        if any(not r.agrees_with(r0) for r in results[1:]):
            raise GroupUnhealthy(f"the ranks disagreed on the results of step {plan.step}: they are out of step")
        admitted = {r.id for r in plan.admit}
        for rid in plan.prefill:
            if rid in self.running:
                self.running[rid].prefilled_once = True
        for ev in r0.events:
            h = self.running.get(ev.request)
            if h is None:
                continue
            if ev.kind == "progress":
                h.remaining = ev.progress.total - ev.progress.done
                if h.req.kind != "generate":
                    h._push(ev.progress)
            elif ev.kind == "token":
                h.phase, h.remaining = "decode", 0
                h._push(ev.token)
                if h._stream is not None:
                    h.text += h._stream.push(ev.token)
                    if stop_at(h.text, h.stops) is not None:
                        self.ends.setdefault(h.id, "stop_sequence")
            elif ev.kind == "done":
                self._done(h, ev.computed)
                h.end = ev.end
                h._push(ev.end if ev.end is not None else ev.info)
                h._finish()
            elif ev.kind == "failed":
                self._done(h, ev.computed)
                if (h.id in admitted and isinstance(ev.error, KVCapacityError) and self.running
                        and time.monotonic() - h.submitted < self.cfg.queue_timeout_s):
                    h.state, h.retry_after = "waiting", self.finished  # wait for pages, in front
                    self.waiting.appendleft(h)
                    continue
                h._finish(h.cancel_error or ev.error)
        for sid in plan.drops:
            for cb in self.drops.pop(sid, []):
                cb()
        s = self._stats
        s["prefill_tokens"] += sum(r.prefill_tokens for r in results[:1])
        s["decode_tokens"] += r0.decode_tokens
        s["last_batch"], s["last_prefill"], s["last_step_s"] = r0.decode_tokens, r0.prefill_tokens, r0.seconds

    def _done(self, h: Handle, computed: int) -> None:
        self.running.pop(h.id, None)
        h.computed = computed
        self.finished += 1

    def fail_all(self, err: BaseException) -> None:
        for h in list(self.waiting) + list(self.running.values()):
            h._finish(err)
        self.waiting.clear()
        self.running.clear()
        for cbs in self.drops.values():
            for cb in cbs:
                cb()
        self.drops.clear()

    def stats(self) -> SchedulerStats:
        s = self._stats
        prefilling = sum(1 for h in self.running.values() if h.phase == "prefill")
        return SchedulerStats(waiting=len(self.waiting), running=len(self.running), prefilling=prefilling,
                              decoding=len(self.running) - prefilling, steps=self.step,
                              last_batch=s["last_batch"], last_prefill_tokens=s["last_prefill"],
                              prefill_tokens=s["prefill_tokens"], decode_tokens=s["decode_tokens"],
                              preemptions=s["preemptions"], last_step_s=s["last_step_s"])


class Scheduler:
    """A `SchedulerCore` on its own thread, running each step on the group's ranks with `run_step`.
    Submissions, cancels, deletes and `stats` take the lock only between steps' decisions, never for the
    duration of a step, so they answer at once while the ranks compute."""

    def __init__(self, run_step: Callable[[StepPlan], list[StepResult]], cfg: SchedulerConfig, tokenizer=None, *,
                 name: str = "scheduler", on_broken: Callable[[BaseException], None] | None = None):
        self.core = SchedulerCore(cfg, tokenizer)
        self._on_broken = on_broken
        self.on_step: Callable[[StepPlan, list[StepResult], SchedulerStats], None] | None = None  # e.g. metrics
        self.core.on_cancel = self.cancel
        self._run_step = run_step
        self._cond = threading.Condition()
        self._closed = False
        self.broken: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, session: str, ids, **kw) -> Handle:
        with self._cond:
            if self.broken is not None:
                raise GroupUnhealthy(f"the group's scheduler stopped: {self.broken}")
            h = self.core.submit(kind, session, ids, **kw)
            self._cond.notify()
            return h

    def cancel(self, h: Handle) -> None:
        with self._cond:
            self.core.cancel(h)
            self._cond.notify()

    def drop(self, session: str) -> Future:
        """Delete a session at the next step boundary; the future completes when it is gone."""
        fut: Future = Future()
        with self._cond:
            if self.broken is not None:
                fut.set_result(None)
                return fut
            self.core.drop(session, lambda: fut.done() or fut.set_result(None))
            self._cond.notify()
        return fut

    def stats(self) -> SchedulerStats:
        with self._cond:
            return self.core.stats()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self.core.has_work()

    def close(self, err: BaseException | None = None) -> None:
        with self._cond:
            self._closed = True
            self.core.fail_all(err or GroupUnhealthy("the group is shutting down"))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.core.has_work():
                    self._cond.wait(1.0)
                if self._closed:
                    return
                plan = self.core.plan()
            if plan.empty:
                time.sleep(0.005)
                continue
            try:
                results = self._run_step(plan)
                with self._cond:
                    self.core.apply(plan, results)
                    stats = self.core.stats()
                if self.on_step is not None:
                    try:
                        self.on_step(plan, results, stats)
                    except Exception:  # observing never stops the group
                        pass
            except BaseException as e:  # the group failed (a rank died, a collective broke): fail everything
                with self._cond:
                    self.broken = e
                    self.core.fail_all(e if isinstance(e, RingserveError) else GroupUnhealthy(str(e)))
                if self._on_broken is not None:
                    self._on_broken(e)
                return


def run_local(core: SchedulerCore, executor, h: Handle) -> Iterator:
    """Drive `core` with this rank's `executor` until `h` is done, yielding h's results as they come.
    Every rank of a group that does the same with the same submissions stays in lockstep."""
    while not h.done:
        plan = core.plan()
        core.apply(plan, [executor.step(plan)])
        yield from h.pending()
    yield from h.pending()


__all__ = ["Scheduler", "SchedulerCore", "SchedulerConfig", "Handle", "run_local", "Progress", "SessionInfo"]
