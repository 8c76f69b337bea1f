"""The Gateway's background loops, each on its own thread (blocking calls: Redis, group handles'
.result()); any number of Gateway replicas may run them at once — every step is idempotent.

    expiry sweep     every sweep_interval_s: delete expired sessions (billed up to their expire time)
    meter pass       every billing.meter_interval_s, per group: bill its tier moves, settle the outcomes
                     in its journal (and acknowledge them), restore what a rebuilt group lost; then close
                     hour boundaries and update the session gauges
    reconciliation   every billing.reconcile_every passes: live sessions vs open billing intervals;
                     sessions a group holds without a record (freed); records stuck in "creating" whose
                     create is gone (removed); registry sizes behind their group's (raised); quota
                     reservations of requests whose Gateway died (freed)
"""

from __future__ import annotations

import logging
import threading
import time

from .metrics import metrics, safe
from .outcomes import GroupReport
from .rules import RpcError

log = logging.getLogger("ringserve.loops")

STUCK_CREATE_S = 120.0  # a "creating" record its group has no request for after this long is a dead create
REPORT_TIMEOUT_S = 30.0


class Loops:
    def __init__(self, service, *, sweep_interval_s: float):
        self.svc = service
        self.rates = service.rates
        self.sweep_interval_s = sweep_interval_s
        self._stop = threading.Event()
        self._acks: dict[str, list[str]] = {}  # group -> outcomes settled since its last report
        self._epochs: dict[str, str] = {}  # group -> the epoch whose sessions were checked
        self.passes = 0

    def start(self) -> None:
        threading.Thread(target=self._sweep_loop, name="ringserve-expiry", daemon=True).start()
        threading.Thread(target=self._meter_loop, name="ringserve-meter", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # -- expiry --------------------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval_s):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - Redis down: try again next round
                log.warning("expiry sweep failed: %s", e)

    def sweep(self, now: float | None = None) -> int:
        n = 0
        for rec in self.svc.registry.expired(time.time() if now is None else now):
            if rec.state == "creating":  # its expiry is set when it becomes ready (a dead create: reconciliation)
                continue
            self.svc.delete_now(rec, rec.expire_time)
            n += 1
        return n

    # -- metering ------------------------------------------------------------------------------------

    def _meter_loop(self) -> None:
        """Every billing.meter_interval_s: a meter pass; every reconcile_every passes, reconciliation."""
        while not self._stop.wait(self.rates.meter_interval_s):
            self.passes += 1
            try:
                self.meter_pass(reconcile=self.passes % self.rates.reconcile_every == 0)
            except Exception as e:  # noqa: BLE001 - Redis down: the next pass catches up (events are idempotent)
                log.warning("metering pass failed: %s", e)

    def meter_pass(self, reconcile: bool = False) -> dict:
        out = {"moves": 0, "closed": 0, "settled": 0, "restored": 0, "lost": 0}
        counts = {(t, c): 0 for t in ("hbm", "host", "redis", "moving", "lost") for c in ("hot", "standard", "cold")}
        reports: dict[str, GroupReport] = {}
        for gid, h in self.svc.groups.items():
            try:
                report = h.report.remote(self._acks.pop(gid, [])).result(timeout_s=REPORT_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - busy or down: its sessions are metered on the next pass
                log.info("group %s did not report: %s", gid, e)
                continue
            reports[gid] = report
            out["settled"] += self._settle(gid, report)
            for sid, info in (report.sessions or {}).items():
                state = info.tier.api if info.state == "resident" and info.tier else info.state
                key = (state, info.retention)
                if key in counts:
                    counts[key] += 1
                try:
                    out["moves"] += self.svc._bill_moves(sid, info)
                except Exception as e:  # noqa: BLE001 - one session's trouble does not stop the pass
                    log.warning("tier moves of %s not billed yet: %s", sid, e)
        out["closed"] = self.svc.ledger.close_hours(time.time())
        for (tier, cls), n in counts.items():
            safe(lambda: metrics()["sessions"].set(n, tags={"tier": tier, "retention_class": cls}))
        recovered = self._recover(reports)
        out["restored"], out["lost"] = recovered
        if reconcile:
            out["reconcile"] = self.reconcile(reports)
        return out

    def _settle(self, gid: str, report: GroupReport) -> int:
        """Settle the group's journaled outcomes; acknowledge those settled with its next report."""
        acked = self._acks.setdefault(gid, [])
        n = 0
        import redis

        for o in report.outcomes:
            try:
                self.svc.settle(o)
            except (redis.ConnectionError, redis.TimeoutError) as e:  # Redis down: the rest on a later pass
                log.warning("outcome %s of %s not settled yet: %s", o.bill.id, o.bill.session, e)
                break
            except Exception:  # noqa: BLE001 - kept (not acknowledged): retried every pass, and logged
                log.exception("outcome %s of %s could not be settled", o.bill.id, o.bill.session)
                continue
            acked.append(o.bill.id)
            n += 1
        return n

    # -- recovery ------------------------------------------------------------------------------------

    def _recover(self, reports: dict[str, GroupReport]) -> tuple[int, int]:
        """After a group's WorkerGroup was rebuilt (or its replica restarted), its sessions held only in
        memory are gone: restore the persisted ones (adopted into the Redis tier, loaded on their next
        request) and mark the others LOST, so the service is whole again without waiting for requests."""
        restored = lost = 0
        changed = {gid for gid, r in reports.items() if r.sessions is not None and self._epochs.get(gid) != r.epoch}
        if not changed:
            return 0, 0
        records = self.svc.registry.records()
        for gid in changed:
            r = reports[gid]
            for rec in records:
                if rec.group != gid or rec.state != "ready" or rec.id in r.sessions or rec.id in r.busy:
                    continue
                try:
                    self.svc.restore_now(rec, "redis")
                    restored += 1
                except RpcError as e:
                    if e.code.name == "DATA_LOSS":
                        lost += 1
                    else:  # transient: try again next pass
                        log.info("restoring %s after %s restarted: %s", rec.id, gid, e.message)
                        break
                except Exception as e:  # noqa: BLE001
                    log.warning("restoring %s after %s restarted: %s", rec.id, gid, e)
                    break
            else:
                self._epochs[gid] = r.epoch
        if restored or lost:
            log.warning("recovered sessions after a group restart: %d restored from Redis, %d lost", restored, lost)
        return restored, lost

    # -- reconciliation ------------------------------------------------------------------------------

    def reconcile(self, reports: dict[str, GroupReport]) -> dict:
        svc = self.svc
        records = {r.id: r for r in svc.registry.records()}
        rec = svc.ledger.reconcile({sid: r.state for sid, r in records.items()})
        safe(lambda: metrics()["unmetered"].set(len(rec["unmetered"])))
        safe(lambda: metrics()["orphaned"].set(len(rec["orphaned"])))
        now = time.time()
        freed, stuck, grown = [], [], []
        for gid, r in reports.items():
            if r.sessions is None:
                continue
            for sid, info in r.sessions.items():
                if sid in r.busy:
                    continue
                owner = records.get(sid)
                if owner is None:  # KV nobody owns (a create or a delete cut short): freed, Redis copy included
                    svc._drop(sid, [gid])
                    freed.append(sid)
                elif owner.group != gid:  # a stale second holder: forgotten, the owner's Redis copy kept
                    svc._call(gid, "forget", sid)
                    freed.append(sid)
                elif owner.state == "ready" and info.length > owner.size_tokens:  # a settle that never came
                    svc.registry.grow(sid, owner.tenant, info.length)
                    svc.ledger.resize(sid, f"size:{info.length}", t=now, tokens=info.length)
                    grown.append(sid)
            for sid, owner in records.items():
                if (owner.group == gid and owner.state == "creating" and sid not in r.busy
                        and now - owner.create_time > STUCK_CREATE_S):
                    svc._drop(sid, [gid])
                    svc.registry.delete(owner)
                    stuck.append(sid)
        released = svc.registry.release_expired(now)
        for what, ids in (("freed KV without a record", freed), ("removed dead creates", stuck),
                          ("raised sizes to their group's", grown)):
            if ids:
                log.warning("reconciliation %s: %s", what, ids)
        return {**rec, "freed": freed, "stuck": stuck, "grown": grown, "released": released}
