"""The operations files are generated from, or checked against, the metric definitions in
cluster/metrics.py: the Grafana dashboard, the Helm chart's copies, the Prometheus alerting rules.
Also: what GroupRecorder exports from a group's per-rank stats, and the banner of `ringserve serve`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ringserve.cluster import grafana, metrics
from ringserve.cluster.metrics import METRICS, PANELS, SERVE_SERIES, GroupRecorder, Metric

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ringserve.json"
RULES = ROOT / "deploy" / "prometheus" / "ringserve-rules.yml"
KNOWN = {n for m in METRICS for n in m.exported()} | set(SERVE_SERIES.values())


def series_in(promql: str) -> set[str]:
    return set(re.findall(r"\bray_[a-zA-Z0-9_]+", promql))


def test_generated_files_are_up_to_date():
    for path, text in grafana.outputs(ROOT).items():
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `make grafana`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make grafana` and commit it"


def test_a_renamed_series_is_caught_before_it_breaks_a_panel(monkeypatch):
    """Rename a series in cluster/metrics.py: the panels follow the new name, so the committed
    dashboard is stale (the drift test fails) and it reads a series nobody defines any more."""
    import types

    src = Path(metrics.__file__).read_text().replace('"ringserve_kv_bytes"', '"ringserve_kv_resident_bytes"')
    renamed = types.ModuleType("metrics_renamed")
    monkeypatch.setitem(sys.modules, "metrics_renamed", renamed)  # dataclasses look their module up
    exec(compile(src, metrics.__file__, "exec"), renamed.__dict__)
    fresh = grafana.render(renamed.PANELS)
    assert "ray_ringserve_kv_resident_bytes" in fresh and fresh != DASHBOARD.read_text()
    defined = {n for m in renamed.METRICS for n in m.exported()} | set(SERVE_SERIES.values())
    committed = json.loads(DASHBOARD.read_text())
    used = set().union(*(series_in(t["expr"]) for p in committed["panels"] for t in p.get("targets", [])))
    assert "ray_ringserve_kv_bytes" in used - defined


def test_every_panel_reads_only_defined_series_and_every_metric_has_a_panel():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = set().union(*map(series_in, exprs))
    assert used <= KNOWN, f"panels read series nobody defines: {sorted(used - KNOWN)}"
    for m in METRICS:
        assert set(m.exported()) & used, f"{m.series} has no panel"


def test_the_dashboard_is_import_ready():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in panels)
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
    assert "__inputs" not in dash and dash["uid"] == "ringserve"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used_vars = {v for p in panels for t in p["targets"] for v in re.findall(r"\$(\w+)", t["expr"])}
    assert used_vars <= set(variables) | {"__rate_interval", "__range"}, used_vars
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert {"Sessions and KV", "Tier moves", "Billing", "Prefill and latency", "Ring attention", "Failures"} <= rows


def test_metric_definitions_enforce_the_naming_conventions():
    with pytest.raises(ValueError, match="_total"):
        Metric("x", "ringserve_things", "counter", "x")
    with pytest.raises(ValueError, match="_total"):
        Metric("x", "ringserve_things_total", "gauge", "x")
    with pytest.raises(ValueError, match="ringserve_"):
        Metric("x", "things_total", "counter", "x")
    with pytest.raises(ValueError, match="buckets"):
        Metric("x", "ringserve_latency_seconds", "histogram", "x")
    assert len({m.key for m in METRICS}) == len(METRICS) == len({m.name for m in METRICS})
    assert all(p.row and p.title and p.queries for p in PANELS)


def test_every_existing_series_name_is_kept():
    names = {m.name for m in METRICS}
    assert {"ringserve_sessions", "ringserve_kv_bytes", "ringserve_tier_moves_total", "ringserve_tier_move_bytes_total",
            "ringserve_tier_move_throughput_bytes_per_second", "ringserve_retention_token_seconds_total",
            "ringserve_prefill_tokens_total", "ringserve_prefill_throughput_tokens_per_second",
            "ringserve_time_to_first_token_seconds", "ringserve_inter_token_latency_seconds",
            "ringserve_ring_step_seconds", "ringserve_ring_comm_wait_ratio", "ringserve_redis_errors_total",
            "ringserve_session_restores_total", "ringserve_sessions_lost_total",
            "ringserve_billing_unmetered_sessions", "ringserve_billing_orphaned_intervals"} <= names


# ------------------------------------------------------------------------------------ alert rules

def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's `prometheus` package; `make test` installs it)")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True, timeout=60,
                       cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_cover_the_failures_and_read_defined_series():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"RingserveGroupDown", "RingserveRedisErrors", "RingserveSessionsLost",
            "RingserveBillingReconciliationMismatch", "RingserveKVTierNearFull",
            "RingserveBillingMeterStalled"} <= names
    for r in rules:
        used = series_in(r["expr"])
        assert used and used <= KNOWN, (r["alert"], sorted(used - KNOWN))
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


# ------------------------------------------------------------------------------------ GroupRecorder

class FakeMetric:
    def __init__(self, log, key):
        self.log, self.key = log, key

    def set(self, v, tags=None):
        self.log.append((self.key, "set", v, tags))

    def inc(self, v=1.0, tags=None):
        assert v > 0
        self.log.append((self.key, "inc", v, tags))

    def observe(self, v, tags=None):
        self.log.append((self.key, "observe", v, tags))

    def _record(self, v, tags=None):
        self.log.append((self.key, "prime", v, tags))


@pytest.fixture
def recorded(monkeypatch):
    log = []
    monkeypatch.setattr(metrics, "_METRICS", {m.key: FakeMetric(log, m.key) for m in METRICS})
    return log


def rank_stats(rank, *, moves=0, moved_bytes=0, steps=0, errors=0):
    from ringserve.workers.protocol import MoveCount, RankStats, StoreCounters, TierBytes

    return RankStats(rank=rank, device="cpu", sessions=1, kv_bytes=TierBytes(device=1000, host=0, redis=200),
                     free_device_bytes=3000, ring_steps=steps, ring_wait_s=0.1 * steps, busy_s=0.5 * steps,
                     counters=StoreCounters(moves={("device", "redis"): MoveCount(moves, moved_bytes, 0.01 * moves)},
                                            redis_errors=errors))


def test_group_recorder_exports_a_groups_rank_stats(recorded):
    r = GroupRecorder("group-3")
    r.record([rank_stats(0), rank_stats(1)])
    primed = {(k, tuple(sorted(t.items()))) for k, how, v, t in recorded if how == "prime"}
    assert ("redis_errors", (("group", "group-3"),)) in primed  # alerts see the first error
    assert ("moves", (("from_tier", "hbm"), ("group", "group-3"), ("to_tier", "redis"))) in primed
    assert not any(dict(t).get("from_tier") == dict(t).get("to_tier") for k, t in primed if k == "moves")
    sets = {(k, t.get("tier")): v for k, how, v, t in recorded if how == "set" and t and "tier" in t}
    assert sets[("kv_bytes", "hbm")] == 2000 and sets[("kv_bytes", "redis")] == 400
    assert sets[("kv_free_bytes", "hbm")] == 6000 and ("kv_free_bytes", "host") not in sets

    recorded.clear()
    r.record([rank_stats(0, moves=2, moved_bytes=500, steps=4, errors=1),
              rank_stats(1, moves=2, moved_bytes=500, steps=4)])
    incs: dict = {}
    for k, how, v, t in recorded:
        if how == "inc":
            incs[(k, tuple(sorted(t.items())))] = incs.get((k, tuple(sorted(t.items()))), 0) + v
    pair = (("from_tier", "hbm"), ("group", "group-3"), ("to_tier", "redis"))
    assert incs == {("moves", pair): 4, ("move_bytes", pair): 1000, ("redis_errors", (("group", "group-3"),)): 1}
    assert not [x for x in recorded if x[1] == "prime"]  # once per recorder
    (step,) = [v for k, how, v, t in recorded if k == "ring_step"]
    assert step == pytest.approx(0.5)
    (wait,) = [v for k, how, v, t in recorded if k == "comm_wait"]
    assert wait == pytest.approx(0.2)

    recorded.clear()
    r.record([rank_stats(0, moves=2, moved_bytes=500, steps=4, errors=1),
              rank_stats(1, moves=2, moved_bytes=500, steps=4)])  # nothing new happened
    assert not [x for x in recorded if x[1] in ("inc", "observe")]


# ------------------------------------------------------------------------------------ serve banner

def test_serve_banner_says_where_the_dashboard_is_and_how_to_sign_in():
    from ringserve.cluster.cli import serve_banner
    from ringserve.cluster.config import ServeConfig
    from ringserve.cluster.serve_app import RayInfo

    info = RayInfo(session_name="session_x", session_dir="/tmp/ray/session_x",
                   metrics_url="http://10.0.0.2:4000/metrics", dashboard_url="http://127.0.0.1:8265",
                   token_source="/home/op/.ray/auth_token",
                   service_discovery="/tmp/ray/session_x/prom_metrics_service_discovery.json")
    text = serve_banner(ServeConfig(grpc_port=50051), "rs-dev-k", "redis://127.0.0.1:6379/0", info)
    assert "localhost:50051" in text and "rs-dev-k" in text
    assert "Ray dashboard: http://127.0.0.1:8265" in text
    assert "Ray token file: /home/op/.ray/auth_token (`cat /home/op/.ray/auth_token`)" in text
    default = serve_banner(ServeConfig(), "k", "redis://x",
                           replace(info, token_source=str(Path.home() / ".ray" / "auth_token")))
    assert "(`ray get-auth-token` prints it)" in default
    assert "ssh -L 8265:127.0.0.1:8265" in text
    assert "Prometheus metrics: http://10.0.0.2:4000/metrics" in text and "prom_metrics_service_discovery" in text

    off = serve_banner(ServeConfig(), "k", "redis://x", replace(info, token_source=None))
    assert "authentication is off" in off
    no_dash = serve_banner(ServeConfig(), "k", "redis://x", replace(info, dashboard_url=None, token_source=None,
                                                                      service_discovery=None))
    assert "Ray dashboard" not in no_dash and "http://10.0.0.2:4000/metrics" in no_dash


# ------------------------------------------------------------------------------------ Helm chart

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (part of the test extra)")


def render(values: dict) -> list[dict]:
    out = helm_python.Chart.load(str(ROOT / "deploy" / "helm" / "ringserve")).render(values, name="rs", namespace="ml")
    return [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def test_chart_ships_the_dashboard_and_rules_behind_switches():
    ours = lambda docs: [d for d in docs if d["kind"] == "PrometheusRule" or "grafana" in d["metadata"]["name"]]  # noqa: E731
    assert not ours(render({}))
    docs = render({"metrics": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "ringserve"}},
                               "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}})
    (cm,) = [d for d in ours(docs) if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ringserve"}
    assert json.loads(cm["data"]["ringserve.json"]) == json.loads(DASHBOARD.read_text())
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(cm, "1.30", strict=True)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())  # the same rules, {{ $labels }} untouched


def test_chart_wires_the_ray_dashboard_to_grafana_and_prometheus_and_token_auth():
    head = lambda docs: next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]  # noqa: E731
    docs = render({"metrics": {"rayDashboard": {"grafanaHost": "http://grafana.monitoring.svc:80",
                                                "prometheusHost": "http://prom.monitoring.svc:9090"}}})
    spec = head(docs)
    env = {e["name"]: e.get("value") for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_GRAFANA_HOST"] == "http://grafana.monitoring.svc:80"
    assert env["RAY_PROMETHEUS_HOST"] == "http://prom.monitoring.svc:9090"
    assert "RAY_GRAFANA_IFRAME_HOST" not in env
    worker_env = {e["name"] for e in spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    assert "RAY_GRAFANA_HOST" not in worker_env
    assert spec["authOptions"] == {"mode": "token"}
    assert "authOptions" not in head(render({"rayAuth": {"mode": "disabled"}}))


@pytest.mark.parametrize("values", [
    {"rayAuth": {"mode": "tokens"}},
    {"metrics": {"rayDashboard": {"grafanaHost": "grafana:3000"}}},
    {"metrics": {"grafanaDashboard": {"enabled": "yes"}}},
    {"metrics": {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}},
    {"metrics": {"prometheusRule": {"enabld": True}}},
])
def test_chart_rejects_bad_ops_values(values):
    with pytest.raises(Exception, match="specifications of the schema"):
        render(values)


def test_sticky_gauges_keep_their_last_values_exported():
    from ringserve.cluster.metrics import StickyGauge

    log = []
    g = StickyGauge(FakeMetric(log, "comm_wait"))
    g.set(0.25, tags={"group": "group-0"})
    g.set(0.5, tags={"group": "group-1"})
    g.set(0.75, tags={"group": "group-0"})
    log.clear()
    g.refresh()
    assert sorted((v, t["group"]) for _, _, v, t in log) == [(0.5, "group-1"), (0.75, "group-0")]
