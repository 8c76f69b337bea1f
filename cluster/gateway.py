"""The `Gateway` ingress deployment: the ringserve.v1.RingServe gRPC service on Serve's gRPC proxy.

Authenticates (`authorization: Bearer <key>`, keys stored hashed), validates, keeps the session
registry in Redis, tokenizes and detokenizes, and forwards work to the session's
`SequenceParallelGroup` deployment. Method names equal the RPC names (Serve's gRPC contract);
each returns the response message, or yields them for streaming RPCs. Errors set a gRPC status
code and a readable message on `grpc_context` and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import asdict

import grpc
from google.protobuf import empty_pb2
from ray import serve

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb

from .billing import BelowMinimum, BillingError, Ledger, to_money
from .config import ServeConfig, hash_key
from .metrics import metrics, safe
from .registry import LimitExceeded, Registry, SessionRecord, new_session_id
from ringserve.workers.protocol import (ContextLimit, GenerationEnd, GroupCapacity, Progress, RingserveError,
                                        SamplingParams, SessionError, SessionInfo, Tier, stop_at)

log = logging.getLogger("ringserve.gateway")

NAME_RE = re.compile(r"^(?:sessions/)?(s-[0-9a-f]{16})$")
ROLES = ("system", "user", "assistant")
FINISH = {"stop": pb.STOP, "length": pb.LENGTH, "context": pb.CONTEXT_FULL, "stop_sequence": pb.STOP_SEQUENCE}
RETENTION = {pb.RETENTION_CLASS_UNSPECIFIED: "standard", pb.HOT: "hot", pb.STANDARD: "standard", pb.COLD: "cold"}
RETENTION_ENUM = {"hot": pb.HOT, "standard": pb.STANDARD, "cold": pb.COLD}
PERSIST = {pb.PERSIST_MODE_UNSPECIFIED: "on_demote", pb.ON_DEMOTE: "on_demote", pb.WRITE_THROUGH: "write_through"}
PERSIST_ENUM = {"on_demote": pb.ON_DEMOTE, "write_through": pb.WRITE_THROUGH}


class RpcError(Exception):
    """Ends a request with a gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self):
        return self.message


def _cause(e: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error."""
    return getattr(e, "cause", None) or e


def _ts(t: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Gateway:
    def __init__(self, cfg: dict, *groups):
        from ringserve.workers.loader import load_tokenizer

        self.cfg = ServeConfig.from_dict(cfg)
        self.registry = Registry(self.cfg.redis_url)
        self.ledger = Ledger(self.cfg.billing_redis_url or self.cfg.redis_url, self.cfg.billing,
                             on_metered=lambda tier, token_ms: safe(
                                 lambda: metrics()["token_seconds"].inc(token_ms / 1000, tags={"tier": tier})))
        self.rates = self.ledger.rates
        self.tok = load_tokenizer(self.cfg.model)
        self.keys = {k.sha256: k for k in self.cfg.api_keys}
        self._keys_mtime = None
        self._reload_keys()
        self.groups = {h.deployment_name: h for h in groups}
        self._context: ContextLimit | None = None  # the session limit, read from the model's config once
        self._stop = threading.Event()
        threading.Thread(target=self._sweep_loop, name="ringserve-expiry", daemon=True).start()
        threading.Thread(target=self._meter_loop, name="ringserve-meter", daemon=True).start()

    # ------------------------------------------------------------------------------ plumbing

    def _reload_keys(self) -> None:
        """Re-read api_keys_file when it changed (a rotated Kubernetes Secret is updated in place)."""
        path = self.cfg.api_keys_file
        if not path:
            return
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError as e:
            log.error("api_keys_file %s unreadable: %s", path, e)
            return
        if mtime == self._keys_mtime:
            return
        from .config import load_api_keys

        try:
            keys = load_api_keys(path)
        except Exception as e:  # keep the keys we have
            log.error("api_keys_file %s rejected: %s", path, e)
            return
        self.keys = {k.sha256: k for k in self.cfg.api_keys + keys}
        self._keys_mtime = mtime
        log.info("loaded %d API keys from %s", len(keys), path)

    def _auth(self, ctx) -> tuple[str, bool]:
        self._reload_keys()
        md = dict(ctx.invocation_metadata()) if ctx is not None else {}
        value = md.get("authorization", "")
        if not value:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing API key: send metadata 'authorization: Bearer <api key>'")
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization: use 'Bearer <api key>'")
        key = self.keys.get(hash_key(value[7:].strip()))
        if key is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return key.tenant, key.admin

    @staticmethod
    def _fail(ctx, e: BaseException):
        """Set the status for `e` on the gRPC context and end the call."""
        if isinstance(e, RpcError):
            code, msg = e.code, e.message
        else:
            code, msg = _status_of(_cause(e))
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error", exc_info=e)
        if ctx is not None:
            ctx.set_code(code)
            ctx.set_details(msg)
        # Serve turns an exception raised after set_code into that status (streams included)
        raise RuntimeError(msg) from None

    def _record(self, name: str, tenant: str, *, creating_ok: bool = False) -> SessionRecord:
        m = NAME_RE.match(name or "")
        if not m:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"session name {name!r} is malformed: expected 'sessions/s-' followed by 16 hex digits")
        rec = self.registry.get(m.group(1))
        if rec is None or rec.tenant != tenant:  # another tenant's session does not exist for you
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {m.group(1)} not found")
        if rec.expire_time <= time.time():
            self._delete(rec, rec.expire_time)
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {rec.id} expired at "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(rec.expire_time))} and was deleted")
        if rec.state != "ready" and not creating_ok:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"session {rec.id} is still being created; retry shortly")
        return rec

    def _ids(self, which: str, req, *, first: bool, generation: bool = False) -> list[int]:
        """Token ids of a text / token_ids / messages oneof. Text is one user turn and messages are
        turns, both rendered with the model's chat template: as the start of a conversation for a
        new session (`first`), else as its continuation. Token ids go in as they are."""
        if which == "text":
            if not req.text.strip():
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
            msgs = [{"role": "user", "content": req.text}]
            if first:
                return self.tok.encode_chat(msgs, add_generation_prompt=generation)
            return self.tok.encode_turn(msgs, add_generation_prompt=generation)
        if which == "token_ids":
            ids = list(req.token_ids.ids)
            if not ids:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "token_ids is empty")
            bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
            if bad:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"token ids out of the vocabulary [0, {self.tok.vocab_size}): {bad[:5]}")
            return ids
        if which == "messages":
            msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
            if not msgs:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "messages is empty")
            for m in msgs:
                if m["role"] not in ROLES:
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"message role {m['role']!r} is not one of {ROLES}")
                if not m["content"].strip():
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "a message has empty content")
            if first:
                return self.tok.encode_chat(msgs, add_generation_prompt=generation)
            return self.tok.encode_turn(msgs, add_generation_prompt=generation)
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "give the content as text, token_ids or messages")

    async def _limit(self) -> ContextLimit:
        """How many tokens a session may hold (prompt + answers): the rule the engine applies too."""
        if self._context is None:  # the rule the groups apply, from the model's config
            from ringserve.workers.loader import read_config

            g = self.cfg.group
            self._context = ContextLimit.of(read_config(self.cfg.model), g.max_context, g.max_context_beyond_model)
        c = self._context
        if self.cfg.max_prompt_tokens and self.cfg.max_prompt_tokens < c.max_tokens:
            return ContextLimit(self.cfg.max_prompt_tokens, "the service's max_prompt_tokens")
        return c

    def _session_pb(self, rec: SessionRecord, info: SessionInfo | None = None, usage: dict | None = None) -> pb.Session:
        s = pb.Session(name=f"sessions/{rec.id}", display_name=rec.display_name, tenant=rec.tenant,
                       size_tokens=rec.size_tokens, retention=RETENTION_ENUM.get(rec.retention, pb.STANDARD),
                       persist=PERSIST_ENUM.get(rec.persist, pb.ON_DEMOTE), create_time=_ts(rec.create_time),
                       expire_time=_ts(rec.expire_time), update_time=_ts(rec.update_time), group=rec.group,
                       kv_bytes=rec.kv_bytes, allow_quantized_kv=rec.allow_quantized_kv)
        if info is not None:
            s.tier = _tier_pb(info)
            s.kv_bytes = info.kv_bytes
        try:
            u = usage or self.ledger.session_usage(rec.id)
        except Exception as e:  # the ledger's Redis is down: show the session, leave billing empty
            log.warning("billing of %s unavailable: %s", rec.id, e)
            return s
        for t, v in u["token_seconds"].items():
            s.token_seconds[t] = v
        s.retention_cost, s.compute_cost = to_money(u["retention_nanos"]), to_money(u["compute_nanos"])
        s.cost_accrued = to_money(u["retention_nanos"] + u["compute_nanos"])
        s.currency = u["currency"]
        if u["billed_through"]:
            s.billed_through.CopyFrom(_ts(u["billed_through"]))
        return s

    async def _pick_group(self) -> str:
        caps = await asyncio.gather(*(h.capacity.remote() for h in self.groups.values()), return_exceptions=True)
        ok = [c for c in caps if isinstance(c, GroupCapacity) and c.healthy]
        if not ok:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no healthy worker group; retry shortly")
        return max(ok, key=lambda c: (c.free_kv_bytes, -c.sessions)).group

    def _delete(self, rec: SessionRecord, t: float | None = None):
        """Delete a session: its retention meter stops at t (the delete's commit time, or the expiry
        time), then its KV is freed and its record removed."""
        self.ledger.close(rec.id, t=time.time() if t is None else t)
        h = self.groups.get(rec.group)
        if h is not None:
            try:
                h.delete.remote(rec.id).result(timeout_s=60)
            except Exception as e:  # the KV also expires by its own TTL
                log.warning("could not free %s on %s: %s", rec.id, rec.group, e)
        self.registry.delete(rec)

    def _sweep_loop(self):
        while not self._stop.wait(self.cfg.sweep_interval_s):
            try:
                for rec in self.registry.expired(time.time()):
                    self._delete(rec, rec.expire_time)
            except Exception as e:  # Redis down: try again next round
                log.warning("expiry sweep failed: %s", e)

    def _meter_loop(self):
        """Every billing.meter_interval_s: let each group apply its retention policy and report tier
        moves, bill them at the time they happened, close intervals at the hour boundary, and now
        and then reconcile live sessions with open billing intervals."""
        passes = 0
        while not self._stop.wait(self.rates.meter_interval_s):
            passes += 1
            try:
                self.meter_pass(reconcile=passes % self.rates.reconcile_every == 0)
            except Exception as e:  # Redis down: the next pass catches up (events are idempotent)
                log.warning("metering pass failed: %s", e)

    def meter_pass(self, reconcile: bool = False) -> dict:
        out = {"moves": 0, "closed": 0}
        counts = {(t, c): 0 for t in ("hbm", "host", "redis", "moving", "lost") for c in ("hot", "standard", "cold")}
        for gid, h in self.groups.items():
            try:
                report = h.meter.remote().result(timeout_s=30)
            except Exception as e:  # busy or down: its sessions are metered on the next pass
                log.info("group %s did not report tiers: %s", gid, e)
                continue
            for sid, info in report.sessions.items():
                state = info.tier.api if info.state == "resident" and info.tier else info.state
                key = (state, info.retention)
                if key in counts:
                    counts[key] += 1
                out["moves"] += self._bill_moves(sid, info)
        out["closed"] = self.ledger.close_hours(time.time())
        for (tier, cls), n in counts.items():
            safe(lambda: metrics()["sessions"].set(n, tags={"tier": tier, "retention_class": cls}))
        if reconcile:
            rec = self.ledger.reconcile(self.registry.states())
            safe(lambda: metrics()["unmetered"].set(len(rec["unmetered"])))
            safe(lambda: metrics()["orphaned"].set(len(rec["orphaned"])))
            out["reconcile"] = rec
        return out

    @staticmethod
    def _prefilled(tokens: int, seconds: float) -> None:
        safe(lambda: metrics()["prefill_tokens"].inc(tokens))
        if seconds > 0:
            safe(lambda: metrics()["prefill_rate"].observe(tokens / seconds))

    def _bill_moves(self, sid: str, info: SessionInfo) -> int:
        """Bill the tier moves a group reported (as seconds ago) at the wall time they happened."""
        if not info.moves:
            return 0
        now = time.time()
        return self.ledger.observe(sid, [(m.number, now - m.seconds_ago, m.tier.api) for m in info.moves])

    async def _on_group(self, rec: SessionRecord, call):
        """Run call(handle) on the session's group; if the group no longer holds it (its replica was
        restarted), restore it from Redis — on that group, else on another — and run it again."""
        try:
            return await call(self.groups[rec.group])
        except Exception as e:
            if not isinstance(_cause(e), SessionError):
                raise
        await self._restore(rec)
        return await call(self.groups[rec.group])

    async def _restore(self, rec: SessionRecord):
        order = [rec.group] + [g for g in self.groups if g != rec.group]
        last = None
        for gid in order:
            try:
                await self.groups[gid].restore.remote(rec.id)
            except Exception as e:
                last = _cause(e)
                if isinstance(last, SessionError):  # never persisted: nothing to restore anywhere
                    break
                continue
            safe(lambda: metrics()["restores"].inc())
            if gid != rec.group:
                rec.group = gid
                self.registry.put(rec)
            return
        safe(lambda: metrics()["lost"].inc())
        self.ledger.close(rec.id, t=time.time())
        self.registry.delete(rec)
        raise RpcError(grpc.StatusCode.DATA_LOSS,
                       f"session {rec.id} was lost with its worker group and has no copy in Redis "
                       f"(persist mode {rec.persist}); create it again ({last})")

    # ------------------------------------------------------------------------------ the RPCs

    async def CreateSession(self, request: pb.CreateSessionRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            ids = self._ids(request.WhichOneof("content") or "", request, first=True)
            self.ledger.check_size(len(ids))
            (await self._limit()).check_add(0, len(ids))
            now = time.time()
            ttl = self._ttl(request, now)
            rec = SessionRecord(new_session_id(), tenant, "", len(ids), now, now + ttl, now,
                                retention=RETENTION[request.retention], persist=PERSIST[request.persist],
                                display_name=request.display_name[:256],
                                allow_quantized_kv=request.allow_quantized_kv)
            rec.group = await self._pick_group()
            created = self.registry.create(rec, max_sessions=self.cfg.limits.max_sessions,
                                           max_tokens=self.cfg.limits.max_tokens, request_id=request.request_id)
            if created.id != rec.id:  # an idempotent retry: the session exists already
                yield pb.CreateSessionEvent(session=self._session_pb(created))
                return
            opts = {"retention": rec.retention, "persist": rec.persist, "ttl_s": ttl,
                    "allow_quantized": rec.allow_quantized_kv}
            handle = self.groups[rec.group].options(stream=True)
            t_prefill = time.perf_counter()
            try:
                async for ev in handle.create.remote(rec.id, ids, opts, self.cfg.progress_chunk):
                    if isinstance(ev, Progress):
                        yield pb.CreateSessionEvent(progress=pb.Progress(tokens_done=ev.done, tokens_total=ev.total))
                    else:
                        info = ev
            except BaseException:
                self.registry.delete(rec)
                raise
            self._prefilled(len(ids), time.perf_counter() - t_prefill)
            if self.registry.get(rec.id) is None:  # deleted while its prefill finished: the delete wins
                await self.groups[rec.group].delete.remote(rec.id)
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"session {rec.id} was deleted while it was being created")
            rec.state, rec.update_time = "ready", time.time()
            try:  # metered from the commit of its creation; billed its prefill
                last = info.moves[-1] if info.moves else None
                self.ledger.open(rec.id, tenant, t=rec.update_time, tier=(last.tier if last else info.tier or Tier.DEVICE).api,
                                 tokens=len(ids), retention=rec.retention, group=rec.group, prefill_tokens=len(ids),
                                 move=last.number if last else 0)
                self.registry.put(rec)
            except BaseException:
                self._delete(rec)
                raise
            yield pb.CreateSessionEvent(session=self._session_pb(rec, info))
        except Exception as e:
            self._fail(grpc_context, e)

    def _ttl(self, request, now: float) -> float:
        which = request.WhichOneof("expiration")
        if which == "ttl":
            ttl = request.ttl.ToTimedelta().total_seconds()
        elif which == "expire_time":
            ttl = request.expire_time.ToDatetime().timestamp() - now
            if request.expire_time.ToNanoseconds() / 1e9 <= now:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "expire_time is in the past")
        else:
            ttl = self.cfg.default_ttl_s
        if ttl <= 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"ttl must be positive, got {ttl:g} s")
        if ttl > self.cfg.max_ttl_s:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"ttl {ttl:g} s exceeds the maximum of {self.cfg.max_ttl_s:g} s")
        return ttl

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            rec = self._record(request.name, tenant)
            try:
                info = await asyncio.wait_for(self._on_group(rec, lambda h: h.describe.remote(rec.id)), 30)
                self._bill_moves(rec.id, info)
            except asyncio.TimeoutError:
                info = None
            return self._session_pb(rec, info)
        except Exception as e:
            self._fail(grpc_context, e)

    async def ListSessions(self, request: pb.ListSessionsRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            size = request.page_size or 50
            if not 1 <= size <= 1000:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be within 1..1000, got {size}")
            try:
                offset = int(request.page_token or "0")
            except ValueError:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this server issued") from None
            recs, more = self.registry.list(tenant, offset=offset, count=size)
            try:  # one round trip for the page's billing, not two per session
                usage = self.ledger.sessions_usage([r.id for r in recs])
            except Exception:
                usage = {}
            return pb.ListSessionsResponse(sessions=[self._session_pb(r, usage=usage.get(r.id)) for r in recs],
                                           next_page_token=str(offset + size) if more else "")
        except Exception as e:
            self._fail(grpc_context, e)

    async def UpdateSession(self, request: pb.UpdateSessionRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            rec = self._record(request.session.name, tenant)
            paths = list(request.update_mask.paths)
            if not paths:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "update_mask is empty: name the fields to change")
            now = time.time()
            for p in paths:
                if p == "ttl":
                    ttl = request.session.ttl.ToTimedelta().total_seconds()
                    if not 0 < ttl <= self.cfg.max_ttl_s:
                        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"ttl must be within (0, {self.cfg.max_ttl_s:g}] s")
                    rec.expire_time = now + ttl
                elif p == "expire_time":
                    t = request.session.expire_time.ToNanoseconds() / 1e9
                    if not now < t <= now + self.cfg.max_ttl_s:
                        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "expire_time must be in the future, within max_ttl")
                    rec.expire_time = t
                elif p == "retention":
                    rec.retention = RETENTION[request.session.retention]
                else:
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"field {p!r} cannot be updated; updatable: ttl, expire_time, retention")
            rec.update_time = now
            await self._on_group(rec, lambda h: h.set_ttl.remote(rec.id, rec.expire_time - now))
            # an extension or a class change closes the billing interval (a new rate may apply)
            self.ledger.set_retention(rec.id, f"update:{int(now * 1000)}", t=now,
                                      retention=rec.retention if "retention" in paths else None)
            self.registry.put(rec)
            return self._session_pb(rec)
        except Exception as e:
            self._fail(grpc_context, e)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            rec = self._record(request.name, tenant, creating_ok=True)  # a delete cancels a create in progress
            await asyncio.get_running_loop().run_in_executor(None, self._delete, rec, time.time())
        except Exception as e:
            self._fail(grpc_context, e)
        return empty_pb2.Empty()

    async def AppendToSession(self, request: pb.AppendToSessionRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            rec = self._record(request.name, tenant)
            ids = self._ids(request.WhichOneof("content") or "", request, first=False)
            (await self._limit()).check_add(rec.size_tokens, len(ids), "the append")
            info = None

            async def run(h):
                out = []
                async for ev in h.options(stream=True).append.remote(rec.id, ids, self.cfg.progress_chunk):
                    out.append(ev)
                return out

            t_prefill = time.perf_counter()
            events = await self._on_group(rec, run)
            self._prefilled(len(ids), time.perf_counter() - t_prefill)
            for ev in events:
                if isinstance(ev, Progress):
                    yield pb.CreateSessionEvent(progress=pb.Progress(tokens_done=ev.done, tokens_total=ev.total))
                else:
                    info = ev
            delta = len(ids)
            rec.size_tokens += delta
            rec.update_time = time.time()
            self.ledger.resize(rec.id, f"size:{rec.size_tokens}", t=rec.update_time, tokens=rec.size_tokens,
                               compute=(delta, 0, 0), tenant=tenant)
            self._bill_moves(rec.id, info)
            self.registry.put(rec, size_delta=delta)
            yield pb.CreateSessionEvent(session=self._session_pb(rec, info))
        except Exception as e:
            self._fail(grpc_context, e)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            tenant, _ = self._auth(grpc_context)
            rec = self._record(request.name, tenant)
            which = request.WhichOneof("prompt") or ""
            ids = self._ids(which, request, first=False, generation=True)
            params = self._sampling(request)
            (await self._limit()).generate_budget(rec.size_tokens, len(ids), params["max_tokens"])
            stops = list(request.stop)
            if len(stops) > 8 or any(not s for s in stops):
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "stop takes at most 8 non-empty strings")
            # a retained turn is closed by the model's end-of-turn token; keep room for it
            stream = self.tok.stream()
            text, generated, finish = "", 0, pb.LENGTH
            pending: list[int] = []
            t_start = time.perf_counter()
            await self._ensure_held(rec)
            handle = self.groups[rec.group].options(stream=True)
            try:
                ttft, itl = metrics()["ttft"].observe, metrics()["itl"].observe
            except Exception:  # metrics unavailable: serve anyway
                ttft = itl = lambda v: None
            last = end = None
            stopped = False  # a stop string matched: the group ends the generation itself, one step later
            async for tok in handle.generate.remote(rec.id, ids, params, request.retain_turn, stops):
                if isinstance(tok, GenerationEnd):
                    end = tok
                    continue
                if stopped:
                    continue
                now_p = time.perf_counter()
                if last is None:
                    safe(ttft, now_p - t_start)
                else:
                    safe(itl, now_p - last)
                last = now_p
                generated += 1
                pending.append(tok)
                delta = stream.push(tok)
                if not delta:
                    continue
                text += delta
                cut = stop_at(text, stops)
                if cut is not None:
                    keep = delta[: max(0, len(delta) - (len(text) - cut))]
                    if keep:
                        yield pb.GenerateResponse(text_delta=keep, token_ids=pending, group=rec.group)
                    stopped = True
                    continue
                yield pb.GenerateResponse(text_delta=delta, token_ids=pending, group=rec.group)
                pending = []
            if not stopped:
                tail = stream.flush()
                if tail or pending:
                    yield pb.GenerateResponse(text_delta=tail, token_ids=pending, group=rec.group)
            finish = pb.STOP_SEQUENCE if stopped else (FINISH[end.reason] if end is not None else pb.STOP)
            if end is not None:
                generated = end.generated_tokens  # what the group computed, stop strings included
            cached = rec.size_tokens
            counts = (len(ids), cached, generated)
            now = time.time()
            if request.retain_turn:
                added = end.retained_tokens if end is not None else len(ids) + generated
                rec.size_tokens += added
                rec.update_time = now
                self.ledger.resize(rec.id, f"size:{rec.size_tokens}", t=now, tokens=rec.size_tokens, compute=counts,
                                   tenant=tenant)
                self.registry.put(rec, size_delta=added)
            else:
                event = f"gen:{request.request_id}" if request.request_id else f"gen:{new_session_id()}"
                self.ledger.charge(rec.id, tenant, event, t=now, prefill=len(ids), cached=cached, generated=generated)
            yield pb.GenerateResponse(
                finish_reason=finish, group=rec.group,
                usage=pb.Usage(prompt_tokens=len(ids), cached_tokens=cached, generated_tokens=generated,
                               cost=to_money(self.rates.compute_nanos(*counts)), currency=self.rates.currency))
        except Exception as e:
            self._fail(grpc_context, e)

    async def _ensure_held(self, rec: SessionRecord):
        """Before a stream starts: the group holds the session (restoring it if its replica restarted).
        Promotion to the device happens as the request starts: billed from here."""
        info = await self._on_group(rec, lambda h: h.describe.remote(rec.id))
        self._bill_moves(rec.id, info)

    def _sampling(self, request) -> dict:
        """The request's sampling values, checked by the one rule (`SamplingParams`); sent as a dict."""
        s = request.sampling
        n = request.max_tokens or 256
        if not 1 <= n <= self.cfg.max_generate_tokens:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"max_tokens must be within 1..{self.cfg.max_generate_tokens}, got {request.max_tokens}")
        try:
            p = SamplingParams(temperature=float(s.temperature), top_p=float(s.top_p or 1.0), top_k=int(s.top_k),
                               seed=int(s.seed) if s.HasField("seed") else None, max_tokens=n)
        except ValueError as e:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return asdict(p)

    async def Status(self, request: pb.StatusRequest, grpc_context=None):
        try:
            _, admin = self._auth(grpc_context)
            if not admin:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "Status needs an admin API key")
            caps = await asyncio.gather(*(h.capacity.remote() for h in self.groups.values()), return_exceptions=True)
            groups = []
            for gid, c in zip(self.groups, caps):
                if not isinstance(c, GroupCapacity):
                    groups.append(pb.GroupStatus(id=gid, healthy=False))
                    continue
                q = c.scheduler
                groups.append(pb.GroupStatus(
                    id=gid, healthy=c.healthy, sessions=c.sessions, kv_bytes=c.kv_bytes.api(),
                    free_kv_bytes=c.free_kv_bytes,
                    ranks=[pb.RankStatus(rank=r.rank, device=r.device, healthy=c.healthy, kv_bytes=r.kv_bytes.api(),
                                         free_kv_bytes=r.free_device_bytes) for r in c.ranks],
                    scheduler=pb.SchedulerStatus(
                        waiting=q.waiting, running=q.running, prefilling=q.prefilling, decoding=q.decoding,
                        steps=q.steps, last_batch=q.last_batch, prefill_tokens=q.prefill_tokens,
                        decode_tokens=q.decode_tokens, preemptions=q.preemptions, last_step_seconds=q.last_step_s)))
            try:
                redis_ok = bool(self.registry.client.ping())
                metered = len(self.ledger.open_sessions())
            except Exception:
                redis_ok, metered = False, 0
            return pb.StatusResponse(groups=groups, sessions=self.registry.count() if redis_ok else 0,
                                     redis_healthy=redis_ok, metered_sessions=metered)
        except Exception as e:
            self._fail(grpc_context, e)


    # ------------------------------------------------------------------------------ usage

    def _usage_scope(self, request, grpc_context) -> tuple[str, float, float, str | None]:
        """(tenant, start, end, session id) of a usage request, checked."""
        tenant, admin = self._auth(grpc_context)
        if request.tenant and request.tenant != tenant:
            if not admin:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                               "reading another tenant's usage needs an admin API key")
            tenant = request.tenant
        if not request.HasField("start_time"):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "start_time is required")
        start = request.start_time.ToNanoseconds() / 1e9
        end = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else time.time()
        self.ledger.check_range(start, end)
        sid = None
        if request.session:
            m = NAME_RE.match(request.session)
            if not m:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"session name {request.session!r} is malformed: "
                               "expected 'sessions/s-' followed by 16 hex digits")
            sid = m.group(1)
            if self.ledger.session_tenant(sid) != tenant:  # deleted sessions keep their usage
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"no usage of session {sid} for tenant {tenant!r}")
        return tenant, start, end, sid

    async def GetUsage(self, request: pb.GetUsageRequest, grpc_context=None):
        try:
            tenant, start, end, sid = self._usage_scope(request, grpc_context)
            by = {pb.USAGE_GROUP_BY_UNSPECIFIED: "session", pb.SESSION: "session", pb.TIER: "tier",
                  pb.DAY: "day"}.get(request.group_by)
            if by is None:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown group_by {request.group_by}")
            u = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.ledger.usage(tenant, start, end, by, session=sid))
            return pb.GetUsageResponse(line_items=[_line_pb(i) for i in u["line_items"]], total=_line_pb(u["total"]),
                                       currency=u["currency"], start_time=_ts(start), end_time=_ts(end),
                                       accruing_cost=to_money(u["accruing_nanos"]))
        except Exception as e:
            self._fail(grpc_context, e)

    async def ExportUsage(self, request: pb.ExportUsageRequest, grpc_context=None):
        try:
            tenant, start, end, sid = self._usage_scope(request, grpc_context)
            fmt = {pb.EXPORT_FORMAT_UNSPECIFIED: "jsonl", pb.JSONL: "jsonl", pb.CSV: "csv"}.get(request.format)
            if fmt is None:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown format {request.format}")
            for chunk in self.ledger.export(tenant, start, end, fmt, session=sid):
                if chunk:
                    yield pb.ExportUsageChunk(data=chunk.encode())
        except Exception as e:
            self._fail(grpc_context, e)

    # -------------------------------------------------------------- grpc.health.v1 (no API key needed)

    async def _health(self, service: str):
        from grpc_health.v1 import health_pb2

        if service not in ("", "ringserve.v1.RingServe"):
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        try:
            self.registry.client.ping()
            caps = await asyncio.wait_for(asyncio.gather(*(h.capacity.remote() for h in self.groups.values()),
                                                         return_exceptions=True), 10)
            ok = any(isinstance(c, GroupCapacity) and c.healthy for c in caps)
        except Exception:
            ok = False
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(self, request, grpc_context=None):
        try:
            return await self._health(request.service)
        except Exception as e:
            self._fail(grpc_context, e)

    async def Watch(self, request, grpc_context=None):
        """The current status, then again whenever it changes (checked every few seconds)."""
        try:
            last = None
            while True:
                st = await self._health(request.service)
                if st.status != last:
                    last = st.status
                    yield st
                await asyncio.sleep(5)
        except Exception as e:
            self._fail(grpc_context, e)


def _line_pb(line: dict) -> pb.UsageLineItem:
    item = pb.UsageLineItem(key=line["key"], prefill_tokens=line["prefill_tokens"],
                            cached_tokens=line["cached_tokens"], generated_tokens=line["generated_tokens"],
                            retention_cost=to_money(line["retention_nanos"]), compute_cost=to_money(line["compute_nanos"]),
                            cost=to_money(line["retention_nanos"] + line["compute_nanos"]), records=line["records"])
    for t, v in line["token_ms"].items():
        item.token_seconds[t] = v / 1000
    return item


def _tier_pb(info: SessionInfo) -> int:
    if info.state == "lost" or info.tier is None:
        return pb.LOST
    if info.state == "moving":
        return pb.MOVING
    return pb.Tier.Value(info.tier.api.upper())


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """gRPC status for an exception from the data plane (which names its own code), the registry or
    the ledger."""
    if isinstance(e, RingserveError):
        code = getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)
        return code, f"{e}; retry shortly" if code == grpc.StatusCode.UNAVAILABLE else str(e)
    if isinstance(e, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, BelowMinimum):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, BillingError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    import redis

    if isinstance(e, redis.ConnectionError):
        return grpc.StatusCode.UNAVAILABLE, f"the session registry (Redis) is unreachable: {e}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
