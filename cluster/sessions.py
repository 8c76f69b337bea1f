"""The session service: create, append, generate, get, list, update, delete, restore — and settling what
each request did (billing, quotas, the registry). No gRPC types leave it: it takes the parsed request
messages and yields typed events; cluster/gateway.py renders them.

One token-budget rule: `protocol.ContextLimit` (the groups' own), lowered by the service's
`max_prompt_tokens`. Before any tokenizing, content that cannot fit is refused by a size bound derived
from it (cluster/rules.py `check_size`); tokenizing runs on a thread pool, off the event loop; Redis
calls run on another pool, so a slow Redis never stalls other requests.

Consistency (the registry, cluster/registry.py, is compare-and-set; the ledger's events are
idempotent):
  * every create / append / generate carries a `Bill` with a server-side id; its `Outcome` (the tokens
    the group computed, however the request ended) is settled by `settle` — by this service when the
    stream ends, by a task when the client went away, and again by the meter pass from the group's
    journal: the compute record's id is the bill id, so it is written once;
  * a delete wins: settling never writes a record that is gone (no revival), and the tenant's tokens
    leave its count once;
  * appends and retained turns reserve their possible growth against the tenant's token limit before
    they run; `request_id` makes a create, an append or a retained turn idempotent, checked against a
    hash of the request's content;
  * a session its group no longer holds is restored from Redis, only with the registry's length on
    every rank; a missing or corrupt copy makes it LOST (the record says so; DATA_LOSS now,
    FAILED_PRECONDITION afterwards), a transient failure leaves it as it is (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator

import grpc

from ringserve.workers.protocol import (ContextLimit, ContextLimitError, GenerationEnd, GroupCapacity,
                                        KVCapacityError, KVDataLossError, Progress, SessionError, SessionInfo, Tier,
                                        stop_at)

from . import rules
from .billing import Ledger
from .metrics import metrics, safe
from .outcomes import Bill, Outcome, new_bill_id
from .registry import KeyReused, Registry, SessionRecord, new_session_id
from .rules import RpcError

log = logging.getLogger("ringserve.sessions")

CALL_TIMEOUT_S = 60.0  # control calls to a group (describe, restore, delete, ...)
RESERVATION_TTL_S = 6 * 3600.0  # a request's quota reservation is freed after this if never settled


def cause(e: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error."""
    return getattr(e, "cause", None) or e


def token_bytes(tok) -> tuple[int, bool]:
    """(the longest token's bytes, whether the tokenizer normalizes text): what the size bound needs."""
    b = tok.backend
    longest = 1
    for i in range(tok.vocab_size):
        s = b.decode([i], skip_special_tokens=False)
        longest = max(longest, len(s.encode("utf-8")))
    return longest, b.normalizer is not None


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class SessionView:
    """A session as the API shows it: its record, and its group's view when known."""

    record: SessionRecord
    info: SessionInfo | None = None
    usage: dict | None = None


@dataclass(frozen=True)
class Delta:
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    finish: str  # "stop" | "length" | "context" | "stop_sequence"
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    cost_nanos: int
    group: str


@dataclass
class _Stream:
    """A Generate stream's text state: detokenizing, cutting at a stop string."""

    decoder: object
    stops: list[str]
    text: str = ""
    pending: list[int] = field(default_factory=list)
    stopped: bool = False


class SessionService:
    def __init__(self, cfg, limits, groups: dict, registry: Registry, ledger: Ledger, tokenizer):
        self.cfg, self.limits, self.groups = cfg, limits, groups
        self.registry, self.ledger, self.tok = registry, ledger, tokenizer
        self.rates = ledger.rates
        self._context: ContextLimit | None = None
        self._tok_pool = ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="ringserve-tokenize")
        self._io_pool = ThreadPoolExecutor(16, thread_name_prefix="ringserve-io")
        self.max_token_bytes, self.normalizes = token_bytes(tokenizer)
        self._tasks: set = set()

    # -- plumbing ------------------------------------------------------------------------------------

    async def io(self, fn, *args, **kw):
        """A blocking call (Redis, a group handle's .result()) on the I/O pool."""
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, partial(fn, *args, **kw))

    def limit(self) -> ContextLimit:
        """How many tokens a session may hold (prompt + answers): the rule the engine applies too."""
        if self._context is None:  # the rule the groups apply, from the model's config
            from ringserve.workers.loader import read_config

            g = self.cfg.group
            self._context = ContextLimit.of(read_config(self.cfg.model), g.max_context, g.max_context_beyond_model)
        c = self._context
        if self.cfg.max_prompt_tokens and self.cfg.max_prompt_tokens < c.max_tokens:
            return ContextLimit(self.cfg.max_prompt_tokens, "the service's max_prompt_tokens")
        return c

    def check_size(self, c: rules.Content, length: int, room: int, what: str) -> None:
        lim = self.limit()
        rules.check_size(c, room=room, max_tokens=lim.max_tokens, length=length, vocab=self.tok.vocab_size,
                         max_token_bytes=self.max_token_bytes, normalizes=self.normalizes, what=what)

    async def tokenize(self, c: rules.Content, *, first: bool, generation: bool = False) -> list[int]:
        """Token ids of content: text is one user turn and messages are turns, both rendered with the
        model's chat template (as the start of a conversation for a new session, else as its
        continuation); token ids go in as they are. Runs on the tokenizer pool."""
        if c.kind == "token_ids":
            return list(c.ids)
        msgs = c.as_messages()
        fn = self.tok.encode_chat if first else self.tok.encode_turn
        return await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, partial(fn, msgs, add_generation_prompt=generation))

    def _call(self, gid: str, method: str, *args, timeout_s: float = CALL_TIMEOUT_S):
        """A control call on a group, blocking (from the I/O pool or a loop thread)."""
        return getattr(self.groups[gid], method).remote(*args).result(timeout_s=timeout_s)

    def _spawn(self, coro) -> None:
        try:
            t = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a generator closed by the garbage collector): the meter pass settles
            coro.close()
            return
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- records -------------------------------------------------------------------------------------

    async def record(self, sid: str, tenant: str, *, creating_ok: bool = False, lost_ok: bool = False) -> SessionRecord:
        rec = await self.io(self.registry.get, sid)
        if rec is None or rec.tenant != tenant:  # another tenant's session does not exist for you
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {sid} not found", sessions=(sid,))
        if rec.expire_time <= time.time() and rec.state != "creating":  # a create in flight expires once ready
            await self.io(self.delete_now, rec, rec.expire_time)
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {rec.id} expired at "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(rec.expire_time))} and was deleted",
                           sessions=(sid,))
        if rec.state == "creating" and not creating_ok:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"session {rec.id} is still being created; retry shortly", sessions=(sid,))
        if rec.state == "lost" and not lost_ok:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"session {rec.id} is LOST ({rec.lost}); delete it and create it again", sessions=(sid,))
        return rec

    async def pick_group(self) -> str:
        caps = await asyncio.gather(*(asyncio.wait_for(h.capacity.remote(), 15) for h in self.groups.values()),
                                    return_exceptions=True)
        ok = [c for c in caps if isinstance(c, GroupCapacity) and c.healthy]
        if not ok:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no healthy worker group; retry shortly")
        return max(ok, key=lambda c: (c.free_kv_bytes, -c.sessions)).group

    # -- settling ------------------------------------------------------------------------------------

    def settle(self, out: Outcome, *, info: SessionInfo | None = None, result: dict | None = None) -> None:
        """Book what a request did, idempotently (any number of calls, in any order with a delete, leave the
        same state): its compute is charged once (event `c:{bill}`); a finished create becomes ready and
        metered; a finished append or retained turn raises the session's size; the quota reservation
        and the idempotency key are settled. Blocking (Redis)."""
        b, now = out.bill, time.time()
        if out.computed > 0:
            cached = b.cached if b.kind == "generate" else 0
            self.ledger.charge(b.session, b.tenant, f"c:{b.id}", t=now, prefill=out.prompt_tokens, cached=cached,
                               generated=out.generated_tokens)
        if b.kind == "create":
            self._settle_create(out, now, info)
        elif out.status == "done" and out.length:
            self.registry.grow(b.session, b.tenant, out.length, b.id if b.reservation else "")
            stored = {"kv_bytes": info.stored_bytes, "exact_bytes": info.exact_bytes} if info is not None else {}
            self.ledger.resize(b.session, f"size:{out.length}", t=now, tokens=out.length, **stored)
        elif b.reservation:
            self.registry.release(b.tenant, b.id)
        if b.idem:
            if out.status == "done":
                counts = {"prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
                          "cached_tokens": b.cached, "finish": out.finish, "length": out.length}
                self.registry.idem_done(b.idem, b.id, {**counts, **(result or {})})
            else:
                self.registry.idem_release(b.idem, b.id)

    def _settle_create(self, out: Outcome, now: float, info: SessionInfo | None) -> None:
        b = out.bill
        rec = self.registry.get(b.session)
        if out.status != "done":
            if rec is not None and rec.state == "creating":
                self.registry.delete(rec)  # frees its quota and its request_id (the group rolled it back)
            return
        if rec is None or rec.state != "creating":
            if rec is None:  # deleted while its prefill finished: the delete wins
                self._drop(b.session, self.groups_of(b.session, None))
            return
        tier, move = Tier.DEVICE.api, 0
        if info is not None and info.moves:
            tier, move = info.moves[-1].tier.api, info.moves[-1].number
        stored = {}
        if info is not None:  # priced by its stored bytes from the start
            stored = {"kv_format": info.kv_format, "kv_bytes": info.stored_bytes, "exact_bytes": info.exact_bytes}
        # metered from the commit of its creation; then ready (a delete in between closes the interval)
        self.ledger.open(b.session, b.tenant, t=now, tier=tier, tokens=out.length, retention=rec.retention,
                         group=rec.group, move=move, **stored)

        def ready(r: SessionRecord):
            if r.state == "creating":
                r.state, r.update_time, r.size_tokens = "ready", now, max(r.size_tokens, out.length)
                if r.ttl_s:
                    r.expire_time = now + r.ttl_s
        if self.registry.update(b.session, ready) is None:
            self.ledger.close(b.session, t=now)
            self._drop(b.session, [rec.group])

    def groups_of(self, sid: str, rec: SessionRecord | None) -> list[str]:
        return [rec.group] if rec is not None and rec.group in self.groups else list(self.groups)

    def _drop(self, sid: str, gids) -> None:
        for gid in gids:
            try:
                self._call(gid, "delete", sid)
            except Exception as e:  # noqa: BLE001 - the KV also expires by its own TTL
                if not isinstance(cause(e), SessionError):
                    log.warning("could not free %s on %s: %s", sid, gid, e)

    def _settle_after(self, gid: str, bill: Bill) -> None:
        """A stream whose client went away: settle its outcome once the group has ended the request (the
        meter pass would do it too, from the journal; this is sooner)."""
        async def run():
            for _ in range(1200):
                try:
                    out = await self.groups[gid].outcome.remote(bill.id)
                except Exception:  # noqa: BLE001 - group restarting: the meter pass settles
                    return
                if isinstance(out, Outcome):
                    try:
                        await self.io(self.settle, out)
                    except Exception as e:  # noqa: BLE001 - Redis down: the meter pass settles
                        log.warning("settling %s later: %s", bill.id, e)
                    return
                if out is None:
                    return
                await asyncio.sleep(0.1)
        self._spawn(run())

    async def _run(self, gid: str, bill: Bill, stream, on_item, *, n_prompt: int):
        """Drive a group stream, handing every item but the Outcome to `on_item` (which may yield); returns
        the Outcome. A stream that breaks without one (the group's replica died) is settled from what
        reached us: the prompt, if a token came back, and the tokens that did."""
        out = None
        seen = 0
        try:
            async for item in stream:
                if isinstance(item, Outcome):
                    out = item
                    continue
                if isinstance(item, int):
                    seen += 1
                async for ev in on_item(item):
                    yield ev
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away: end the group's request too. Serve cancels a child request only when
            # the handler's task is cancelled; a handler generator that is closed instead (GeneratorExit)
            # would leave the group computing the whole answer for no one
            stream.cancel()
            self._settle_after(gid, bill)
            raise
        except Exception as e:  # noqa: BLE001
            out = Outcome(bill, "failed", n_prompt if seen else 0, seen, error=cause(e))
        if out is None:
            out = Outcome(bill, "failed", error=RpcError(grpc.StatusCode.UNAVAILABLE, "the worker group stopped "
                                                          "answering; retry shortly"))
        yield out

    # -- create --------------------------------------------------------------------------------------

    async def create(self, tenant: str, request) -> AsyncIterator:
        """Progress events, then the created session (a SessionView)."""
        c = rules.content(request, "content")
        lim = self.limit()
        self.check_size(c, 0, lim.max_tokens, "the content")
        now = time.time()
        ttl = rules.ttl(request, now, default_s=self.cfg.default_ttl_s, max_s=self.cfg.max_ttl_s)
        retention = rules.enum_value(rules.RETENTION, request.retention, "retention")
        persist = rules.enum_value(rules.PERSIST, request.persist, "persist")
        name = rules.display_name(request.display_name)
        rid = rules.request_id(request.request_id)
        fmt = rules.kv_format(request.kv_format, request.kv_keep_fraction)
        ids = await self.tokenize(c, first=True)
        self.ledger.check_size(len(ids))
        lim.check_add(0, len(ids))
        # a ttl counts from the moment the session is ready (settle), not from this request: a long prefill
        # never eats its lifetime; an absolute expire_time stays as given
        rec = SessionRecord(new_session_id(), tenant, "", len(ids), now, now + ttl, now, retention=retention,
                            persist=persist, display_name=name, allow_quantized_kv=request.allow_quantized_kv,
                            kv_format=str(fmt),
                            ttl_s=0.0 if request.WhichOneof("expiration") == "expire_time" else ttl)
        rec.group = await self.pick_group()
        try:
            created = await self.io(self.registry.create, rec, max_sessions=self.cfg.limits.max_sessions,
                                    max_tokens=self.cfg.limits.max_tokens, request_id=rid,
                                    content_hash=rules.request_hash(request) if rid else "")
        except KeyReused as e:
            raise rules.invalid(str(e)) from None
        if created.id != rec.id:  # an idempotent retry
            if created.state == "creating":
                raise RpcError(grpc.StatusCode.ABORTED, f"a create with this request_id is still running (session "
                               f"{created.id}); retry when it has finished", sessions=(created.id,))
            yield SessionView(created)
            return
        bill = Bill(new_bill_id(), tenant, rec.id, "create")
        opts = {"retention": retention, "persist": persist, "ttl_s": ttl, "allow_quantized": rec.allow_quantized_kv,
                "kv_format": fmt.name, "keep_fraction": fmt.keep_fraction}
        handle = self.groups[rec.group].options(stream=True)
        info = None
        t0 = time.perf_counter()

        async def item(ev):
            nonlocal info
            if isinstance(ev, Progress):
                yield ev
            elif isinstance(ev, SessionInfo):
                info = ev

        out = None
        async for ev in self._run(rec.group, bill, handle.create.remote(rec.id, ids, opts, self.cfg.progress_chunk,
                                                                          bill), item, n_prompt=len(ids)):
            if isinstance(ev, Outcome):
                out = ev
            else:
                yield ev
        if out.status == "done":
            self._prefilled(len(ids), time.perf_counter() - t0)
        await self.io(self.settle, out, info=info)
        if out.error is not None:
            raise _own(out.error, rec.id)
        done = await self.io(self.registry.get, rec.id)
        if done is None or done.state != "ready":
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {rec.id} was deleted while it was being created",
                           sessions=(rec.id,))
        yield SessionView(done, info)

    # -- idempotency ---------------------------------------------------------------------------------

    async def _claim(self, tenant: str, rid: str, *, kind: str, sid: str, content_hash: str, bill: str, group: str):
        """Claim request_id for this attempt: returns the Idem ("new": run; "done": replay its result).
        An earlier attempt still running is ABORTED; one that ended unsettled is settled first."""
        kw = dict(kind=kind, session=sid, content_hash=content_hash, bill=bill, group=group,
                  ttl_s=self.limits.idempotency_ttl_s)
        try:
            st = await self.io(self.registry.idem_begin, tenant, rid, **kw)
            if st.state != "pending":
                return st
            prior = None
            if st.group in self.groups:
                try:
                    prior = await asyncio.wait_for(self.groups[st.group].outcome.remote(st.bill), 15)
                except Exception:  # noqa: BLE001 - cannot tell now
                    prior = "running"
            if prior == "running":
                raise RpcError(grpc.StatusCode.ABORTED, "an earlier request with this request_id is still running; "
                               "retry when it has finished")
            if isinstance(prior, Outcome):
                await self.io(self.settle, prior)
                st = await self.io(self.registry.idem_begin, tenant, rid, **kw)
            else:  # its group no longer knows it (restarted): this attempt takes the key over
                st = await self.io(self.registry.idem_begin, tenant, rid, takeover=st.bill, **kw)
        except KeyReused as e:
            raise rules.invalid(str(e)) from None
        if st.state == "pending":
            raise RpcError(grpc.StatusCode.ABORTED, "another request with this request_id is running; retry when "
                           "it has finished")
        return st

    # -- append --------------------------------------------------------------------------------------

    async def append(self, tenant: str, request) -> AsyncIterator:
        """Progress events, then the updated session (a SessionView). request_id: applied once."""
        sid = rules.session_id(request.name)
        rec = await self.record(sid, tenant)
        c = rules.content(request, "content")
        rid = rules.request_id(request.request_id)
        lim = self.limit()
        self.check_size(c, rec.size_tokens, lim.max_tokens - rec.size_tokens, "the append")
        ids = await self.tokenize(c, first=False)
        lim.check_add(rec.size_tokens, len(ids), "the append")
        bill = Bill(new_bill_id(), tenant, sid, "append", reservation=len(ids),
                    idem=self.registry.idem_key(tenant, rid))
        if rid:
            st = await self._claim(tenant, rid, kind="append", sid=sid, content_hash=rules.request_hash(request),
                                   bill=bill.id, group=rec.group)
            if st.state == "done":  # applied before: the session as it is now
                yield SessionView(await self.io(self.registry.get, sid) or rec)
                return
        try:
            await self.io(self.registry.reserve, tenant, bill.id, len(ids), max_tokens=self.cfg.limits.max_tokens,
                          ttl_s=RESERVATION_TTL_S)
        except BaseException:  # refused, or cancelled: nothing held stays held (releases are idempotent)
            await self.io(self.settle, Outcome(bill, "failed"))
            raise
        info = None
        t0 = time.perf_counter()

        async def item(ev):
            nonlocal info
            if isinstance(ev, Progress):
                yield ev
            elif isinstance(ev, SessionInfo):
                info = ev

        out = None
        try:
            gid = (await self.ensure_held(rec)).group or rec.group
            stream = self.groups[gid].options(stream=True).append.remote(sid, ids, self.cfg.progress_chunk, bill)
        except BaseException as e:
            await self.io(self.settle, Outcome(bill, "failed", error=e))
            raise
        async for ev in self._run(gid, bill, stream, item, n_prompt=len(ids)):
            if isinstance(ev, Outcome):
                out = ev
            else:
                yield ev
        if out.status == "done":
            self._prefilled(len(ids), time.perf_counter() - t0)
        await self.io(self.settle, out, info=info)
        if out.error is not None:
            raise await self._failed(rec, out.error)
        now = await self.io(self.registry.get, sid)
        if now is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {sid} was deleted while the append ran", sessions=(sid,))
        self._bill_moves(sid, info)
        yield SessionView(now, info)

    # -- generate ------------------------------------------------------------------------------------

    async def generate(self, tenant: str, request) -> AsyncIterator:
        """Delta events (text and the tokens behind it), then one Finished. A retained turn with a
        request_id is retained once; its repeat replays the result."""
        sid = rules.session_id(request.name)
        rec = await self.record(sid, tenant)
        c = rules.content(request, "prompt")
        params = rules.sampling(request, self.cfg.max_generate_tokens)
        stops = rules.stops(request)
        rid = rules.request_id(request.request_id)
        lim = self.limit()
        self.check_size(c, rec.size_tokens, lim.max_tokens - rec.size_tokens - 1, "the prompt")
        ids = await self.tokenize(c, first=False, generation=True)
        budget = lim.generate_budget(rec.size_tokens, len(ids), params["max_tokens"])
        retain = request.retain_turn
        bill = Bill(new_bill_id(), tenant, sid, "generate", cached=rec.size_tokens, retain=retain,
                    reservation=len(ids) + budget + 1 if retain else 0,
                    idem=self.registry.idem_key(tenant, rid) if retain else "")
        if bill.idem:
            st = await self._claim(tenant, rid, kind="turn", sid=sid, content_hash=rules.request_hash(request),
                                   bill=bill.id, group=rec.group)
            if st.state == "done":  # retained before: its answer again, not billed again
                r = st.result or {}
                yield Delta(r.get("text", ""), tuple(r.get("ids", ())))
                yield Finished(r.get("finish", "stop"), r.get("prompt_tokens", 0), r.get("cached_tokens", 0),
                               r.get("generated_tokens", 0), 0, rec.group)
                return
        if retain:
            try:
                await self.io(self.registry.reserve, tenant, bill.id, bill.reservation,
                              max_tokens=self.cfg.limits.max_tokens, ttl_s=RESERVATION_TTL_S)
            except BaseException:  # refused, or cancelled: nothing held stays held (releases are idempotent)
                await self.io(self.settle, Outcome(bill, "failed"))
                raise
        try:
            gid = (await self.ensure_held(rec)).group or rec.group
            stream = self.groups[gid].options(stream=True).generate.remote(sid, ids, params, retain, stops, bill)
        except BaseException as e:
            await self.io(self.settle, Outcome(bill, "failed", error=e))
            raise
        st = _Stream(self.tok.stream(), stops)
        try:
            ttft, itl = metrics()["ttft"].observe, metrics()["itl"].observe
        except Exception:  # noqa: BLE001 - metrics unavailable: serve anyway
            ttft = itl = lambda v: None
        t_start, last = time.perf_counter(), None
        end: GenerationEnd | None = None

        async def item(tok):
            nonlocal last, end
            if isinstance(tok, GenerationEnd):
                end = tok
                return
            if st.stopped:  # a stop string matched: the group ends the generation itself, one step later
                return
            now_p = time.perf_counter()
            safe(ttft if last is None else itl, now_p - (t_start if last is None else last))
            last = now_p
            st.pending.append(tok)
            delta = st.decoder.push(tok)
            if not delta:
                return
            st.text += delta
            cut = stop_at(st.text, stops)
            if cut is not None:
                keep = delta[: max(0, len(delta) - (len(st.text) - cut))]
                st.text = st.text[:cut]
                st.stopped = True
                if keep:
                    yield Delta(keep, tuple(st.pending))
                return
            yield Delta(delta, tuple(st.pending))
            st.pending = []

        out = None
        sent_ids: list[int] = []
        async for ev in self._run(gid, bill, stream, item, n_prompt=len(ids)):
            if isinstance(ev, Outcome):
                out = ev
            else:
                sent_ids += ev.ids
                yield ev
        if out.error is None and not st.stopped:
            tail = st.decoder.flush()
            if tail or st.pending:
                st.text += tail
                sent_ids += st.pending
                yield Delta(tail, tuple(st.pending))
        finish = "stop_sequence" if st.stopped else (out.finish or (end.reason if end is not None else "stop"))
        result = {"text": st.text, "ids": sent_ids, "finish": finish} if retain else None
        try:
            await self.io(self.settle, out, result=result)
        except Exception as e:  # noqa: BLE001 - Redis down: the answer stands; the meter pass bills it from the journal
            if out.error is None:
                log.warning("Generate on %s answered; its billing waits for the meter pass: %s", sid, e)
            else:
                raise
        if out.error is not None:
            raise await self._failed(rec, out.error)
        cached = rec.size_tokens
        nanos = self.rates.compute_nanos(out.prompt_tokens, cached, out.generated_tokens)
        yield Finished(finish, out.prompt_tokens, cached, out.generated_tokens, nanos, gid)

    # -- reading -------------------------------------------------------------------------------------

    async def ensure_held(self, rec: SessionRecord, to: str = "device") -> SessionInfo:
        """The group holds the session (restoring it if its group lost it). Tier moves are billed."""
        try:
            info = await self.groups[rec.group].describe.remote(rec.id)
        except Exception as e:  # noqa: BLE001
            if not isinstance(cause(e), SessionError):
                raise cause(e) from None
            info = await self.io(self.restore_now, rec, to)
        await self.io(self._bill_moves, rec.id, info)
        return info

    async def get(self, tenant: str, sid: str) -> SessionView:
        rec = await self.record(sid, tenant, lost_ok=True)
        info = None
        if rec.state == "ready":
            try:  # a session its group lost is adopted from Redis without loading it
                info = await asyncio.wait_for(self.ensure_held(rec, to="redis"), 30)
            except RpcError as e:  # lost now: show it so; a transient failure: show the record
                if e.code == grpc.StatusCode.DATA_LOSS:
                    rec = await self.io(self.registry.get, sid) or rec
            except Exception as e:  # noqa: BLE001 - its group is busy or restarting: the record alone
                log.info("GetSession %s without its group's view: %s", sid, e)
        usage = await self._usage([rec.id])
        return SessionView(rec, info, usage.get(rec.id))

    async def list(self, tenant: str, size: int, offset: int) -> tuple[list[SessionView], int | None]:
        recs, more = await self.io(self.registry.list, tenant, offset=offset, count=size)
        by_group: dict[str, list[str]] = {}
        for r in recs:
            if r.state == "ready" and r.group in self.groups:
                by_group.setdefault(r.group, []).append(r.id)
        infos: dict[str, SessionInfo] = {}
        answers = await asyncio.gather(*(asyncio.wait_for(self.groups[g].describe_many.remote(ids), 10)
                                         for g, ids in by_group.items()), return_exceptions=True)
        for a in answers:
            if isinstance(a, dict):
                infos.update(a)
        usage = await self._usage([r.id for r in recs])
        return [SessionView(r, infos.get(r.id), usage.get(r.id)) for r in recs], (offset + size if more else None)

    async def _usage(self, sids: list[str]) -> dict:
        try:  # one round trip for a page's billing
            return await self.io(self.ledger.sessions_usage, sids)
        except Exception as e:  # noqa: BLE001 - the ledger's Redis is down: show the sessions, billing empty
            log.warning("billing of %d sessions unavailable: %s", len(sids), e)
            return {}

    # -- update / delete -----------------------------------------------------------------------------

    async def update(self, tenant: str, request) -> SessionView:
        sid = rules.session_id(request.session.name, "session.name")
        now = time.time()
        change = rules.update(request, now, max_s=self.cfg.max_ttl_s)
        rec = await self.record(sid, tenant, lost_ok=True)
        if change.kv_format is not None and rec.state != "ready":
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid} is lost: its KV format cannot change",
                           sessions=(sid,))
        info = None
        if rec.state == "ready":
            await self.ensure_held(rec, to="redis")
            if change.kv_format is not None:  # first: a refused change (upward) changes nothing else
                f = change.kv_format
                try:
                    info = await self.groups[rec.group].set_format.remote(sid, f.name, f.keep_fraction)
                except Exception as e:  # noqa: BLE001 - the group's refusal, with its status
                    raise _own(cause(e), sid) from None
            if change.expire_time is not None:
                await self.groups[rec.group].set_ttl.remote(sid, change.expire_time - now)
            if change.retention is not None:
                await self.groups[rec.group].set_retention.remote(sid, change.retention)
        converted = time.time()

        def apply(r: SessionRecord):
            if change.expire_time is not None:
                r.expire_time = change.expire_time
            if change.retention is not None:
                r.retention = change.retention
            if info is not None:
                r.kv_format = info.kv_format
            r.update_time = now
        done = await self.io(self.registry.update, sid, apply)
        if done is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {sid} not found", sessions=(sid,))
        if info is not None:  # priced by its new bytes from the moment they replaced the old ones
            await self.io(self.ledger.set_format, sid, f"format:{done.version}", t=converted,
                          kv_format=info.kv_format, kv_bytes=info.stored_bytes, exact_bytes=info.exact_bytes)
        if change.expire_time is not None or change.retention is not None:
            # an extension or a class change closes the billing interval (a new rate may apply)
            await self.io(self.ledger.set_retention, sid, f"update:{done.version}", t=now, retention=change.retention)
        return SessionView(done, info)

    async def delete(self, tenant: str, sid: str) -> None:
        rec = await self.record(sid, tenant, creating_ok=True, lost_ok=True)  # a delete cancels a create in progress
        await self.io(self.delete_now, rec, time.time())

    def delete_now(self, rec: SessionRecord, t: float) -> None:
        """Delete a session: its retention meter stops at t (the delete's commit time, or the expiry time),
        its KV is freed at the next step of its group (a request running on it is ended), then its record
        is removed. Each step is idempotent, so a delete that failed half way is completed by a retry."""
        self.ledger.close(rec.id, t=t)
        self._drop(rec.id, self.groups_of(rec.id, rec))
        self.registry.delete(rec)

    # -- restore -------------------------------------------------------------------------------------

    def restore_now(self, rec: SessionRecord, to: str = "device") -> SessionInfo:
        """Adopt a session its group no longer holds from Redis, with the registry's length on every rank. A
        transient failure (Redis or the group unavailable, no room) leaves the session as it is; a missing
        or failing copy makes it LOST. Only its own group restores it (another group only if its group is
        no longer configured): a group that is merely slow may still hold it, and two holders of one
        session must never exist. Blocking."""
        order = [rec.group] if rec.group in self.groups else list(self.groups)
        transient: BaseException | None = None
        for gid in order:
            try:
                info = self._call(gid, "restore", rec.id, rec.size_tokens, to)
            except Exception as e:  # noqa: BLE001
                c = cause(e)
                if isinstance(c, KVDataLossError):
                    self.mark_lost(rec, f"its copy in Redis cannot be used: {c}")
                    raise RpcError(grpc.StatusCode.DATA_LOSS, f"session {rec.id} was lost: {c}; delete it and "
                                   "create it again", sessions=(rec.id,)) from None
                if isinstance(c, SessionError):  # never persisted: no copy anywhere
                    self.mark_lost(rec, f"its worker group lost it and it had no copy in Redis (persist mode "
                                        f"{rec.persist})")
                    raise RpcError(grpc.StatusCode.DATA_LOSS, f"session {rec.id} was lost with its worker group "
                                   f"and has no copy in Redis (persist mode {rec.persist}); create it again",
                                   sessions=(rec.id,)) from None
                transient = c
                continue
            safe(lambda: metrics()["restores"].inc())
            if gid != rec.group:
                def move(r: SessionRecord, gid=gid):
                    r.group = gid
                self.registry.update(rec.id, move)
                rec.group = gid
            if info.retention != rec.retention:
                self._call(gid, "set_retention", rec.id, rec.retention)
            return info
        if isinstance(transient, KVCapacityError):
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"session {rec.id} is kept in Redis but no worker "
                           f"group has room to load it now ({transient}); retry later", sessions=(rec.id,))
        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"session {rec.id} is kept in Redis but could not be restored "
                       "now (a dependency is unavailable); retry shortly", sessions=(rec.id,))

    async def _failed(self, rec: SessionRecord, error: BaseException) -> BaseException:
        """The error to raise for a request on the session that failed; a copy of its KV that failed its
        checks (DATA_LOSS) makes the session LOST first, so every later request says so
        (FAILED_PRECONDITION) instead of trying the bad copy again."""
        c = cause(error)
        if isinstance(c, KVDataLossError):
            await self.io(self.mark_lost, rec, f"its copy in Redis cannot be used: {c}")
        return _own(error, rec.id)

    def mark_lost(self, rec: SessionRecord, reason: str) -> None:
        """The session's KV is gone: its record says LOST (kept until deleted or expired, so its owner sees
        it) and its retention meter stops."""
        safe(lambda: metrics()["lost"].inc())

        def lost(r: SessionRecord):
            r.state, r.lost, r.update_time = "lost", reason, time.time()
        if self.registry.update(rec.id, lost) is not None:
            self.ledger.close(rec.id, t=time.time())
        log.warning("session %s is lost: %s", rec.id, reason)

    # -- billing helpers -----------------------------------------------------------------------------

    def _bill_moves(self, sid: str, info: SessionInfo | None) -> int:
        """Bill the tier moves a group reported (as seconds ago) at the wall time they happened."""
        if info is None or not info.moves:
            return 0
        now = time.time()
        return self.ledger.observe(sid, [(m.number, now - m.seconds_ago, m.tier.api) for m in info.moves])

    @staticmethod
    def _prefilled(tokens: int, seconds: float) -> None:
        safe(lambda: metrics()["prefill_tokens"].inc(tokens))
        if seconds > 0:
            safe(lambda: metrics()["prefill_rate"].observe(tokens / seconds))

    # -- usage ---------------------------------------------------------------------------------------

    async def usage(self, scope: rules.UsageScope, group_by: str) -> dict:
        await self._check_usage_session(scope)
        return await self.io(self.ledger.usage, scope.tenant, scope.start, scope.end, group_by, session=scope.session)

    async def export(self, scope: rules.UsageScope, fmt: str) -> list[str]:
        await self._check_usage_session(scope)
        return await self.io(lambda: list(self.ledger.export(scope.tenant, scope.start, scope.end, fmt,
                                                             session=scope.session)))

    async def _check_usage_session(self, scope: rules.UsageScope) -> None:
        self.ledger.check_range(scope.start, scope.end)
        if scope.session and await self.io(self.ledger.session_tenant, scope.session) != scope.tenant:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no usage of session {scope.session} for your tenant",
                           sessions=(scope.session,))


def _own(e: BaseException, sid: str) -> BaseException:
    """An error about the caller's own session may name it."""
    if isinstance(e, RpcError):
        return RpcError(e.code, e.message, sessions=tuple(e.sessions) + (sid,))
    code, msg = rules.status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        return e
    return RpcError(code, msg, sessions=(sid,))


__all__ = ["SessionService", "SessionView", "Delta", "Finished", "ContextLimitError"]
