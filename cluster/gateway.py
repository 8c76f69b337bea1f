"""The `Gateway` ingress deployment: the ringserve.v1.RingServe gRPC service on Serve's gRPC proxy.

A thin adapter. Per call: authenticate (cluster/auth.py), count the call against its tenant's limit of
concurrent requests (cluster/limits.py), hand the parsed request to the session service
(cluster/sessions.py), render what it returns as proto messages, and turn any error into a gRPC status
with a sanitized message (cluster/rules.py: no internal addresses, stack text or other tenants' ids).
Method names equal the RPC names (Serve's gRPC contract); each returns the response message, or
yields them for streaming RPCs. The background loops (expiry, metering, reconciliation) are in
cluster/loops.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import empty_pb2
from ray import serve

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.workers.protocol import GroupCapacity, Progress, SessionInfo

from . import rules
from .auth import KeyRing, Principal
from .billing import HOUR_MS, Ledger, to_money
from .config import ServeConfig
from .limits import InputLimits, TenantGate
from .loops import Loops
from .metrics import metrics, safe
from .registry import Registry
from .rules import RpcError
from .tls import transport_refusal
from .sessions import Delta, Finished, SessionService, SessionView

log = logging.getLogger("ringserve.gateway")


def _ts(t: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Gateway:
    def __init__(self, cfg: dict, *groups):
        from ringserve.workers.loader import load_tokenizer

        raw = dict(cfg)
        inp = raw.pop("input", None)  # read here until ServeConfig carries it (cluster/limits.py)
        self.cfg = ServeConfig.from_dict(raw)
        self.limits = InputLimits.from_dict(inp if inp is not None else getattr(self.cfg, "input", None))
        registry = Registry(self.cfg.redis_url)
        ledger = Ledger(self.cfg.billing_redis_url or self.cfg.redis_url, self.cfg.billing,
                        on_metered=lambda tier, token_ms: safe(
                            lambda: metrics()["token_seconds"].inc(token_ms / 1000, tags={"tier": tier})))
        self.keys = KeyRing(self.cfg.api_keys, self.cfg.api_keys_file)
        self.gate = TenantGate(self.limits.max_concurrent_per_tenant)
        self.service = SessionService(self.cfg, self.limits, {h.deployment_name: h for h in groups}, registry, ledger,
                                      load_tokenizer(self.cfg.model))
        self.loops = Loops(self.service, sweep_interval_s=self.cfg.sweep_interval_s)
        self.loops.start()

    def __del__(self):
        loops = getattr(self, "loops", None)
        if loops is not None:
            loops.stop()

    # ------------------------------------------------------------------------------ plumbing

    def _who(self, ctx) -> Principal:
        """The caller, once its transport is allowed (cluster/tls.py: plaintext from other hosts only when
        configured so) and its key is known."""
        why = transport_refusal(self.cfg, ctx) if ctx is not None else None
        if why:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, why)
        return self.keys.authenticate(ctx.invocation_metadata() if ctx is not None else ())

    @staticmethod
    def _fail(ctx, e: BaseException, own: tuple[str, ...] = ()):
        """Set the status for `e` on the gRPC context (its message sanitized) and end the call."""
        code, msg = rules.status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s", msg, exc_info=e)
        msg = rules.sanitize(msg, set(own) | set(getattr(e, "sessions", ())))
        if ctx is not None:
            ctx.set_code(code)
            ctx.set_details(msg)
        # Serve turns an exception raised after set_code into that status (streams included)
        raise RuntimeError(msg) from None

    @staticmethod
    def _named(name: str) -> tuple[str, ...]:
        m = rules.SESSION_ID.fullmatch(name.removeprefix("sessions/")) if name else None
        return (m.group(0),) if m else ()

    def _session_pb(self, v: SessionView) -> pb.Session:
        rec, info, u = v.record, v.info, v.usage
        s = pb.Session(name=f"sessions/{rec.id}", display_name=rec.display_name, tenant=rec.tenant,
                       size_tokens=rec.size_tokens, retention=rules.RETENTION_ENUM.get(rec.retention, pb.STANDARD),
                       persist=rules.PERSIST_ENUM.get(rec.persist, pb.ON_DEMOTE), create_time=_ts(rec.create_time),
                       expire_time=_ts(rec.expire_time), update_time=_ts(rec.update_time), group=rec.group,
                       allow_quantized_kv=rec.allow_quantized_kv)
        if rec.state == "lost":
            s.tier = pb.LOST
        fmt = info.kv_format if info is not None and rec.state != "lost" else rec.kv_format
        s.kv_format, s.kv_keep_fraction = rules.kv_format_pb(fmt)
        if rec.state != "lost" and info is not None:
            s.tier = _tier_pb(info)
            s.kv_bytes, s.exact_kv_bytes, s.stored_kv_bytes = info.kv_bytes, info.exact_bytes, info.stored_bytes
            if info.tier is not None:  # its price now: the tier's rate for its tokens, times its bytes ratio
                rates = self.service.rates
                hour = rates.retention_nanos(rec.retention, info.tier.api, HOUR_MS * rec.size_tokens,
                                             info.stored_bytes, info.exact_bytes)
                s.retention_rate = to_money(hour)
                s.currency = rates.currency
        if u is None:
            return s
        for t, val in u["token_seconds"].items():
            s.token_seconds[t] = val
        s.retention_cost, s.compute_cost = to_money(u["retention_nanos"]), to_money(u["compute_nanos"])
        s.cost_accrued = to_money(u["retention_nanos"] + u["compute_nanos"])
        s.currency = u["currency"]
        if u["billed_through"]:
            s.billed_through.CopyFrom(_ts(u["billed_through"]))
        return s

    async def _view(self, v: SessionView) -> pb.Session:
        if v.usage is None:
            u = await self.service._usage([v.record.id])
            v = SessionView(v.record, v.info, u.get(v.record.id))
        return self._session_pb(v)

    async def _session_stream(self, ctx, run, own: tuple[str, ...]):
        """CreateSession / AppendToSession: Progress events, then the Session."""
        who = self._who(ctx)
        with self.gate.enter(who.tenant):
            async for ev in run(who.tenant):
                if isinstance(ev, Progress):
                    yield pb.CreateSessionEvent(progress=pb.Progress(tokens_done=ev.done, tokens_total=ev.total))
                else:
                    yield pb.CreateSessionEvent(session=await self._view(ev))

    # ------------------------------------------------------------------------------ the RPCs

    async def CreateSession(self, request: pb.CreateSessionRequest, grpc_context=None):
        try:
            async for ev in self._session_stream(grpc_context, lambda t: self.service.create(t, request), ()):
                yield ev
        except Exception as e:
            self._fail(grpc_context, e)

    async def AppendToSession(self, request: pb.AppendToSessionRequest, grpc_context=None):
        own = self._named(request.name)
        try:
            async for ev in self._session_stream(grpc_context, lambda t: self.service.append(t, request), own):
                yield ev
        except Exception as e:
            self._fail(grpc_context, e, own)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        own = self._named(request.name)
        try:
            who = self._who(grpc_context)
            with self.gate.enter(who.tenant):
                async for ev in self.service.generate(who.tenant, request):
                    if isinstance(ev, Delta):
                        yield pb.GenerateResponse(text_delta=ev.text, token_ids=list(ev.ids))
                    elif isinstance(ev, Finished):
                        yield pb.GenerateResponse(
                            finish_reason=rules.FINISH.get(ev.finish, pb.STOP), group=ev.group,
                            usage=pb.Usage(prompt_tokens=ev.prompt_tokens, cached_tokens=ev.cached_tokens,
                                           generated_tokens=ev.generated_tokens, cost=to_money(ev.cost_nanos),
                                           currency=self.service.rates.currency))
        except Exception as e:
            self._fail(grpc_context, e, own)

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None):
        own = self._named(request.name)
        try:
            who = self._who(grpc_context)
            with self.gate.enter(who.tenant):
                return self._session_pb(await self.service.get(who.tenant, rules.session_id(request.name)))
        except Exception as e:
            self._fail(grpc_context, e, own)

    async def ListSessions(self, request: pb.ListSessionsRequest, grpc_context=None):
        try:
            who = self._who(grpc_context)
            size = rules.page_size(request.page_size)
            offset = rules.page_offset(who.tenant, request.page_token)
            with self.gate.enter(who.tenant):
                views, nxt = await self.service.list(who.tenant, size, offset)
            return pb.ListSessionsResponse(sessions=[self._session_pb(v) for v in views],
                                           next_page_token=rules.page_token(who.tenant, nxt) if nxt else "")
        except Exception as e:
            self._fail(grpc_context, e)

    async def UpdateSession(self, request: pb.UpdateSessionRequest, grpc_context=None):
        own = self._named(request.session.name)
        try:
            who = self._who(grpc_context)
            with self.gate.enter(who.tenant):
                return await self._view(await self.service.update(who.tenant, request))
        except Exception as e:
            self._fail(grpc_context, e, own)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, grpc_context=None):
        own = self._named(request.name)
        try:
            who = self._who(grpc_context)
            with self.gate.enter(who.tenant):
                await self.service.delete(who.tenant, rules.session_id(request.name))
        except Exception as e:
            self._fail(grpc_context, e, own)
        return empty_pb2.Empty()

    async def Status(self, request: pb.StatusRequest, grpc_context=None):
        try:
            if not self._who(grpc_context).admin:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "Status needs an admin API key")
            svc = self.service
            caps = await asyncio.gather(*(asyncio.wait_for(h.capacity.remote(), 30) for h in svc.groups.values()),
                                        return_exceptions=True)
            groups = []
            for gid, c in zip(svc.groups, caps):
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

            def redis_state():
                try:
                    return bool(svc.registry.client.ping()), len(svc.ledger.open_sessions()), svc.registry.count()
                except Exception:  # noqa: BLE001
                    return False, 0, 0
            redis_ok, metered, count = await svc.io(redis_state)
            return pb.StatusResponse(groups=groups, sessions=count, redis_healthy=redis_ok, metered_sessions=metered)
        except Exception as e:
            self._fail(grpc_context, e)

    # ------------------------------------------------------------------------------ usage

    async def GetUsage(self, request: pb.GetUsageRequest, grpc_context=None):
        own = self._named(request.session)
        try:
            who = self._who(grpc_context)
            scope = rules.usage_scope(request, who.tenant, who.admin, time.time())
            by = rules.enum_value(rules.GROUP_BY, request.group_by, "group_by")
            with self.gate.enter(who.tenant):
                u = await self.service.usage(scope, by)
            return pb.GetUsageResponse(line_items=[_line_pb(i) for i in u["line_items"]], total=_line_pb(u["total"]),
                                       currency=u["currency"], start_time=_ts(scope.start), end_time=_ts(scope.end),
                                       accruing_cost=to_money(u["accruing_nanos"]))
        except Exception as e:
            self._fail(grpc_context, e, own)

    async def ExportUsage(self, request: pb.ExportUsageRequest, grpc_context=None):
        own = self._named(request.session)
        try:
            who = self._who(grpc_context)
            scope = rules.usage_scope(request, who.tenant, who.admin, time.time())
            fmt = rules.enum_value(rules.EXPORT_FORMAT, request.format, "format")
            with self.gate.enter(who.tenant):
                chunks = await self.service.export(scope, fmt)
            for chunk in chunks:
                if chunk:
                    yield pb.ExportUsageChunk(data=chunk.encode())
        except Exception as e:
            self._fail(grpc_context, e, own)

    # -------------------------------------------------------------- grpc.health.v1 (no API key needed)

    async def _health(self, service: str):
        from grpc_health.v1 import health_pb2

        if service not in ("", "ringserve.v1.RingServe"):
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {service[:64]!r}")
        svc = self.service
        try:
            await svc.io(svc.registry.client.ping)
            caps = await asyncio.wait_for(asyncio.gather(*(h.capacity.remote() for h in svc.groups.values()),
                                                         return_exceptions=True), 10)
            ok = any(isinstance(c, GroupCapacity) and c.healthy for c in caps)
        except Exception:  # noqa: BLE001
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

    # -------------------------------------------------------------- for tests and operators

    def meter_pass(self, reconcile: bool = False) -> dict:
        return self.loops.meter_pass(reconcile)


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
    """gRPC status of an exception from any layer (kept for callers of the old name)."""
    return rules.status_of(e)


RpcError = RpcError  # re-exported: older callers import it from here
