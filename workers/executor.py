"""A rank's side of its group's scheduler: run one `StepPlan` on this rank's engine, step after step.

Every rank of a group receives the same plan and runs it the same way, so the ranks enter the same
collectives in the same order. Whatever can fail for one request is decided the same on every rank:

  * admission (the session is missing or lost, the prompt is bad or too long, the pages for the whole
    request cannot be reserved — prompt, answer budget and end-of-turn token) is agreed by one
    all-reduce over the admitted requests (`ShardEngine.agree`): a request that failed on any rank
    fails on all, with that rank's error, and the others are admitted;
  * sampling runs once on rank 0 for the whole batch and the tokens are broadcast; a request whose
    logits hold no valid token gets token -1 there, so every rank fails it the same way;
  * stop tokens and the answer budget end a request on every rank from the broadcast tokens.

A request is admitted once and then lives across steps (`_Active`): its session is leased (pinned on
the device tier) with all its pages reserved, so nothing admitted later can take them. A create or
an append advances one prefill chunk per step it is scheduled in; a generate prefills its prompt, then
joins the decode batch: one new token for every running generate, across all sessions, in one forward.
"""

from __future__ import annotations

import time

import torch

from .engine import ShardEngine
from .kvpages import KVView
from .layout import ShardLayout
from .plan import Request, StepEvent, StepPlan, StepResult
from .protocol import (FormatError, GenerationEnd, Progress, RequestCancelled, RingserveError, SamplingError,
                       SessionError)
from .ring import choose_mode
from .sampling import make_generator, sample_batch


class _Active:
    """One admitted request on this rank."""

    def __init__(self, req: Request, kv: KVView, layout: ShardLayout, steps, *, budget: int = 0, stop=frozenset(),
                 generator=None):
        self.req, self.kv, self.layout, self.steps = req, kv, layout, steps
        self.meta: dict = {}  # the session's meta when it was admitted (kept forward on commit)
        self.tokens: list[int] = []  # a generate's tokens whose K/V went in (answer, end-of-turn)
        self.base = layout.length  # session tokens when it was admitted
        self.phase = "prefill"  # -> "decode" (feed the last token, sample the next) -> "closing" (feed, commit)
        self.done_tokens = 0  # prompt tokens prefilled so far
        self.progress_last = 0
        self.budget, self.stop, self.generator = budget, stop, generator
        self.last: int | None = None  # sampled, its K/V not written yet
        self.generated = 0
        self.reason = ""

    @property
    def computed(self) -> int:
        return self.done_tokens + self.generated


class StepExecutor:
    """Runs step plans on one rank. `describe` builds the SessionInfo a finished create / append reports."""

    def __init__(self, engine: ShardEngine, describe=None, *, keep_logits: bool = False, record_top2: bool = False):
        self.eng = engine
        self.describe = describe
        self.active: dict[str, _Active] = {}
        self.keep_logits = keep_logits  # the engine's own calls want a create's / append's last logits
        self.last_logits: dict[str, torch.Tensor] = {}
        self.record_top2 = record_top2  # rank 0: the two largest logits of every sampled step (to tell ties)
        self.top2: dict[str, list[tuple[float, float]]] = {}

    # -- one step ------------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        events: list[StepEvent] = []
        prefill = decode = 0
        for rid, why in plan.ends:
            self._end(rid, why, events)
        for sid in plan.drops:
            for rid in [r for r, a in self.active.items() if a.req.session == sid]:
                self._end(rid, "cancel", events)
            self.eng.drop(sid)
        self._admit(plan.admit, events)
        for rid in plan.prefill:
            act = self.active.get(rid)
            if act is not None:
                prefill += self._prefill(act, events)
        batch = [self.active[r] for r in plan.decode if r in self.active]
        if batch:
            decode = len(batch)
            self._decode(batch, events)
        return StepResult(plan.step, self.eng.rank, tuple(events), prefill, decode, time.perf_counter() - t0)

    # -- admission -----------------------------------------------------------------------------------

    def _admit(self, reqs: tuple[Request, ...], events: list[StepEvent]) -> None:
        opened: list = []
        errors: list[BaseException | None] = []
        for req in reqs:
            try:
                opened.append(self._begin_convert(req) if req.kind == "convert" else self._open(req))
                errors.append(None)
            except RingserveError as e:
                opened.append(None)
                errors.append(e)
        for req, act, err in zip(reqs, opened, self.eng.agree(errors)):
            if err is not None:
                if isinstance(act, _Active):  # it opened here but failed on another rank
                    self._close(act)
                elif act is not None:
                    self.eng.store.convert_abort(act[0])
                events.append(StepEvent(req.id, "failed", error=err))
            elif req.kind == "convert":  # the same work on every rank now, collectives included
                self._finish_convert(req, *act)
                events.append(StepEvent(req.id, "done", info=self.describe(req.session) if self.describe else None))
            else:
                self.active[req.id] = act
                events.append(StepEvent(req.id, "admitted"))

    # -- format changes ------------------------------------------------------------------------------

    def _begin_convert(self, req: Request):
        """Check a change of KV format and reserve its pages; (ticket, layout, meta, keep fraction)."""
        from .kvcodec import ORDER
        from .keep import PROBE, keep_count

        eng, store = self.eng, self.eng.store
        fmt, frac = req.opts.get("kv_format", "exact"), req.opts.get("keep_fraction")
        if any(a.req.session == req.session for a in self.active.values()):
            raise SessionError(f"session {req.session!r} is busy with another request")  # the scheduler prevents this
        layout = eng._layout(req.session)
        meta = store.meta(req.session)
        cur = store.kv_format(req.session)
        if fmt == "keep":
            if not 0 < float(frac or 0) < 1:
                raise FormatError(f"keep_fraction must be within (0, 1), got {frac}")
            if layout.evicted:
                raise FormatError(f"session {req.session!r} already keeps a fraction of its tokens "
                                  f"({meta.get('keep_fraction')}); it cannot be thinned again")
            if len(meta.get("tail", ())) < min(PROBE, layout.length):
                raise FormatError(f"session {req.session!r} has no record of its last tokens to choose what to keep")
            ticket = store.convert_begin(req.session, cur, keep_count(layout, eng.rank, float(frac)))
        else:
            if fmt not in ORDER:
                raise FormatError(f"unknown KV format {fmt!r}; formats: {', '.join(ORDER)}, keep")
            if ORDER[fmt] <= ORDER[cur]:
                raise FormatError(f"session {req.session!r} is stored as {cur}; a format only changes to a smaller "
                                  f"one ({' -> '.join(ORDER)}), never back: create the session again for {fmt}")
            ticket = store.convert_begin(req.session, fmt)
        return ticket, layout, meta, float(frac) if fmt == "keep" else None

    def _finish_convert(self, req: Request, ticket, layout: ShardLayout, meta: dict, frac: float | None) -> None:
        from .kvpages import KVView
        from .keep import expected_attention, forced, keep_count, kept_index

        eng, store = self.eng, self.eng.store
        keep = None
        if frac is not None:  # KEEP: score with the queries of the session's own last tokens
            s = ticket.session
            kv = KVView(store.pools["device"], s.pages, s.tokens, s.id, s.lay)
            qs = eng.probe(kv, layout, meta["tail"][-min(len(meta["tail"]), layout.length):])
            scores = torch.zeros(s.tokens)
            for layer, q in enumerate(qs):
                runs = kv.layer_runs(layer, s.tokens)
                if runs:
                    k, v = torch.cat([r[1] for r in runs]), torch.cat([r[2] for r in runs])
                    scores += expected_attention(q, k, v).cpu()
            keep = kept_index(scores, forced(layout, eng.rank), ticket.tokens)
            layout.evicted = [len(forced(layout, r)) - keep_count(layout, r, frac) for r in range(eng.world)]
            meta = dict(meta, keep_fraction=frac)
        store.convert_finish(ticket, keep)
        store.set_meta(req.session, eng._meta(layout, meta))

    def _open(self, req: Request) -> _Active:
        """Lease the request's session and reserve every page it will need, or raise why not."""
        eng, store = self.eng, self.eng.store
        eng._check_ids(req.ids)
        if any(a.req.session == req.session for a in self.active.values()):
            raise SessionError(f"session {req.session!r} is busy with another request")  # the scheduler prevents this
        n = len(req.ids)
        budget, stop, generator = 0, frozenset(), None
        if req.kind == "create":
            eng.limit.check_add(0, n)
            layout = ShardLayout(eng.world, eng.block)
            o = req.opts
            # no expiry while it is being created: its ttl counts from the moment it is ready (_ready)
            store.create(req.session, meta=eng._meta(layout), retention=o.get("retention", "standard"),
                         persist=o.get("persist", "on_demote"), expire_at=None,
                         quantized=bool(o.get("allow_quantized", False)),
                         kv_format="exact" if o.get("kv_format") == "keep" else o.get("kv_format", "exact"))
            mode = "ring"
        else:
            layout = eng._layout(req.session)
            if req.kind == "append":
                eng.limit.check_add(layout.length, n, "the append")
            else:
                budget = eng.limit.generate_budget(layout.length, n, req.sampling.max_tokens)
                stop = frozenset(req.stop_ids) if req.stop_ids is not None else eng.tokenizer.stop_ids
                generator = make_generator(req.sampling) if eng.rank == 0 else None
            mode = choose_mode(n, layout.length)
        try:
            kv = store.acquire(req.session)
        except BaseException:
            if req.kind == "create":
                eng.drop(req.session)
            raise
        try:
            # every page the request can need: its prompt in this mode's chunks, then the answer and the
            # end-of-turn token, all round-robin blocks
            final = ShardLayout.from_dict(layout.to_dict())
            for done in range(0, n, eng.prefill_chunk):
                c = min(eng.prefill_chunk, n - done)
                if mode == "ring":
                    final.add_zigzag(c)
                else:
                    final.add_blocks(c)
            if budget:
                final.add_blocks(budget + 1)
            store.reserve(req.session, final.local_counts()[eng.rank])
            kv.prereserved = True
        except BaseException:
            self._release(req, kv)
            raise
        steps = eng._extend(req.session, kv, layout, req.ids, mode, "last")
        act = _Active(req, kv, layout, steps, budget=budget, stop=stop, generator=generator)
        act.meta = store.meta(req.session)
        return act

    def _release(self, req: Request, kv: KVView) -> None:
        self.eng.store.release(kv)
        if req.kind == "create":
            self.eng.drop(req.session)

    # -- prefill -------------------------------------------------------------------------------------

    def _prefill(self, act: _Active, events: list[StepEvent]) -> int:
        """One prefill chunk of the request; returns the tokens it prefilled."""
        req = act.req
        p: Progress = next(act.steps)
        n = p.done - act.done_tokens
        act.done_tokens = p.done
        if p.done >= p.total or p.done - act.progress_last >= req.progress_every or req.kind == "generate":
            act.progress_last = p.done  # a generate's prompt progress tells the scheduler what is left
            events.append(StepEvent(req.id, "progress", progress=p))
        if p.done < p.total:
            return n
        try:
            next(act.steps)
        except StopIteration as stop:
            logits = stop.value
        else:  # pragma: no cover - _extend returns right after its last chunk
            raise RuntimeError("the prefill did not end after its last chunk")
        if req.kind == "generate":
            self._sampled(act, self._sample([act], logits)[0], events)
        else:
            self.eng.store.commit(req.session, act.kv.length, self.eng._meta(act.layout, act.meta, req.ids))
            if self.keep_logits:
                self.last_logits[req.id] = logits
            self._close(act)
            self.active.pop(req.id, None)
            err = self._keep_at_create(req) if req.kind == "create" else None
            if err is not None:
                self.eng.drop(req.session)
                events.append(StepEvent(req.id, "failed", error=err, computed=act.computed))
                return n
            if req.kind == "create" and req.opts.get("ttl_s"):
                store = self.eng.store  # its ttl starts now that it is ready (the Gateway's record does the same)
                store.set_expiry(req.session, store.clock() + req.opts["ttl_s"])
            info = self.describe(req.session) if self.describe else None
            events.append(StepEvent(req.id, "done", info=info, computed=act.computed))
        return n

    def _keep_at_create(self, req: Request) -> RingserveError | None:
        """A create asked for kv_format "keep": its context is prefilled exactly, then thinned here, in the
        same step on every rank, before the session is shown to anyone (so no request ever sees it whole).
        Returns the error every rank agrees on, if any rank could not thin it."""
        if req.opts.get("kv_format") != "keep":
            return None
        try:
            ticket, err = self._begin_convert(req), None
        except RingserveError as e:
            ticket, err = None, e
        err = self.eng.agree([err])[0]
        if err is not None:
            if ticket is not None:
                self.eng.store.convert_abort(ticket[0])
            return err
        self._finish_convert(req, *ticket)
        return None

    # -- decode --------------------------------------------------------------------------------------

    def _decode(self, batch: list[_Active], events: list[StepEvent]) -> None:
        logits = self.eng.decode_batch([(a.kv, a.layout, a.last) for a in batch])
        for a in batch:
            a.tokens.append(a.last)
        sampling = [i for i, a in enumerate(batch) if a.phase == "decode"]
        for a in batch:
            if a.phase == "closing":  # its last token is in the session now: keep the turn
                self._finish(a, events, commit=True)
        if sampling:
            tokens = self._sample([batch[i] for i in sampling], logits[sampling])
            for i, tok in zip(sampling, tokens):
                self._sampled(batch[i], tok, events)

    def _sample(self, acts: list[_Active], logits: torch.Tensor) -> list[int | SamplingError]:
        """Rank 0 samples every request of the batch; the tokens (or -1 and the reason) reach every rank."""
        eng = self.eng
        if eng.rank == 0:
            tokens, errors = sample_batch(logits, [a.req.sampling for a in acts], [a.generator for a in acts])
            if self.record_top2:
                top = logits.float().topk(2, dim=-1).values.tolist()
                for a, (v1, v2) in zip(acts, top):
                    self.top2.setdefault(a.req.id, []).append((v1, v2))
        else:
            tokens, errors = [0] * len(acts), [""] * len(acts)
        if eng.group is not None:
            import torch.distributed as dist

            t = torch.tensor(tokens, dtype=torch.long, device=eng.device)
            dist.broadcast(t, dist.get_global_rank(eng.group, 0), group=eng.group)
            tokens = t.tolist()
            if min(tokens) < 0:
                box = [errors]
                dist.broadcast_object_list(box, dist.get_global_rank(eng.group, 0), group=eng.group)
                errors = box[0]
        return [SamplingError(errors[i]) if tok < 0 else tok for i, tok in enumerate(tokens)]

    def _sampled(self, act: _Active, tok, events: list[StepEvent]) -> None:
        """What a sampled token does to its request (the same on every rank)."""
        if isinstance(tok, SamplingError):
            self._fail(act, tok, events)
            return
        if tok in act.stop:
            act.reason = "stop"
            self._closing_or_finish(act, tok, events)
            return
        act.generated += 1
        events.append(StepEvent(act.req.id, "token", token=tok))
        if act.generated >= act.budget:
            act.reason = "length" if act.budget >= act.req.sampling.max_tokens else "context"
            self._closing_or_finish(act, tok, events)
            return
        act.last, act.phase = tok, "decode"

    def _closing_or_finish(self, act: _Active, tok: int, events: list[StepEvent]) -> None:
        if act.req.retain:  # the turn is kept: its last token's K/V goes in with the next decode batch
            act.last, act.phase = tok, "closing"
        else:
            self._finish(act, events, commit=False)

    # -- ending --------------------------------------------------------------------------------------

    def _end(self, rid: str, why: str, events: list[StepEvent]) -> None:
        """The scheduler ends a request: "cancel" rolls it back; "stop_sequence" finishes a generate (a
        retained one after its last token is in)."""
        act = self.active.get(rid)
        if act is None:
            return
        if why == "stop_sequence" and act.req.kind == "generate":
            if act.phase == "decode":
                act.reason = "stop_sequence"
                self._closing_or_finish(act, act.last, events)
            return  # "closing": it finishes in this step's decode batch anyway
        self._fail(act, RequestCancelled(f"request {rid} on session {act.req.session!r} was cancelled"), events)

    def _finish(self, act: _Active, events: list[StepEvent], *, commit: bool) -> None:
        retained = 0
        if commit:
            added = list(act.req.ids) + act.tokens
            self.eng.store.commit(act.req.session, act.kv.length, self.eng._meta(act.layout, act.meta, added))
            retained = act.layout.length - act.base
        self._close(act)
        self.active.pop(act.req.id, None)
        end = GenerationEnd(act.reason, len(act.req.ids), act.generated, retained)
        events.append(StepEvent(act.req.id, "done", end=end, computed=act.computed))

    def _fail(self, act: _Active, err: RingserveError, events: list[StepEvent]) -> None:
        self._close(act)
        if act.req.kind == "create":
            self.eng.drop(act.req.session)
        self.active.pop(act.req.id, None)
        events.append(StepEvent(act.req.id, "failed", error=err, computed=act.computed))

    def _close(self, act: _Active) -> None:
        """Release the lease (uncommitted slots go) and stop the prefill generator."""
        act.steps.close()
        self.eng.store.release(act.kv)

