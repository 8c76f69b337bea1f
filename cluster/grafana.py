"""The Grafana dashboard of ringserve, rendered from the panel list in cluster/metrics.py.

    python -m ringserve.cluster.grafana           # (make grafana) write the files below
    python -m ringserve.cluster.grafana --check   # exit 1 if any of them is stale

writes deploy/grafana/ringserve.json (import-ready: the data source is the variable `datasource`)
and the copies the Helm chart ships (`deploy/helm/ringserve/files/`: the dashboard for Grafana's
sidecar, and deploy/prometheus/ringserve-rules.yml for a PrometheusRule), since Helm reads only
files inside the chart. Edit panels in cluster/metrics.py and alerts in deploy/prometheus/, never
the generated files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .billing import Rates
from .metrics import PANELS, TIERS, Panel

UID = "ringserve"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH, HEIGHT = 12, 8  # two panels side by side; Grafana's grid is 24 wide


def _variables() -> list[dict]:
    standard = Rates().retention["standard"]
    prices = [{"name": f"price_{t}", "label": f"{t} price per 1M token-hours", "type": "textbox",
               "query": f"{standard[t]:g}", "current": {"text": f"{standard[t]:g}", "value": f"{standard[t]:g}"},
               "hide": 0, "description": "billing.retention rate of the tier (cluster config); default: standard class"}
              for t in TIERS]
    sessions = "label_values(ray_ringserve_sessions, SessionName)"
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "options": [], "refresh": 1, "regex": ""},
        {"name": "SessionName", "label": "Ray cluster", "type": "query", "datasource": DATASOURCE,
         "definition": sessions, "query": {"query": sessions, "refId": "SessionName"},
         "description": "Ray session name of the cluster(s) to show (a restarted Ray cluster gets a new one)",
         "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2, "sort": 1, "hide": 0,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []},
        *prices,
    ]


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": p.title, "description": p.help, "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit, "min": 0, "custom": {
            "fillOpacity": 25 if p.stack else 5, "lineWidth": 1, "showPoints": "never", "spanNulls": True,
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"}}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DATASOURCE, "expr": q, "legendFormat": legend, "range": True,
                     "refId": chr(ord("A") + i)} for i, (q, legend) in enumerate(p.queries)],
    }


def dashboard(source: tuple[Panel, ...] = PANELS) -> dict:
    panels, y, pid, row = [], 0, 1, None
    col = 0
    for p in source:
        if p.row != row:
            if col:  # finish the half-filled line of the previous row
                y += HEIGHT
            panels.append({"id": pid, "type": "row", "title": p.row, "collapsed": False, "panels": [],
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            pid, y, col, row = pid + 1, y + 1, 0, p.row
        panels.append(_panel(p, pid, col * WIDTH, y))
        pid += 1
        col = (col + 1) % 2
        if col == 0:
            y += HEIGHT
    return {
        "uid": UID, "title": "ringserve", "tags": ["ringserve", "ray"], "editable": True,
        "description": "ringserve sessions, KV tiers, billing, latency, ring attention and failures "
                       "(generated from cluster/metrics.py)",
        "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": _variables()},
        "panels": panels,
    }


def render(source: tuple[Panel, ...] = PANELS) -> str:
    return json.dumps(dashboard(source), indent=2, ensure_ascii=False) + "\n"


def outputs(root: Path) -> dict[Path, str]:
    """Every generated file under the repository root, with its content."""
    rules = (root / "deploy" / "prometheus" / "ringserve-rules.yml").read_text()
    files = root / "deploy" / "helm" / "ringserve" / "files"
    return {root / "deploy" / "grafana" / "ringserve.json": render(),
            files / "grafana-ringserve.json": render(),
            files / "prometheus-rules.yml": rules}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path.cwd()
    if not (root / "deploy" / "prometheus").is_dir():
        print("error: run from the repository root (deploy/ not found)", file=sys.stderr)
        return 2
    stale = [p for p, text in outputs(root).items() if not p.exists() or p.read_text() != text]
    if "--check" in argv:
        for p in stale:
            print(f"{p.relative_to(root)} is stale: run `make grafana`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(outputs(root)[p])
        print(f"wrote {p.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
