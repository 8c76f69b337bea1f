"""Operations, end to end, against one `ringserve serve` started as a user starts it (dashboard on):

- a real Prometheus (Debian's `prometheus`), configured from deploy/prometheus/, scrapes the local
  Ray cluster while a session is created, asked, demoted and billed; every PromQL query of every
  panel of deploy/grafana/ringserve.json returns a series, and the alerting rules load and evaluate;
- a real browser (Debian's chromium + chromedriver, driven by selenium) opens the dashboard URL the
  server printed, signs in with the Ray token it pointed at, and sees the ringserve application with
  its Gateway and group-* deployments running (screenshots under the test's tmp dir);
- SIGTERM stops the server within 10 s, leaving no process and no listening port behind.

The tests share the server and run in this order; the last one stops it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import TEXT, make_tiny_llama

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEY = "rs-ops-test-key"
MARK = "RINGSERVE_OPS_TEST_MARK"  # every process the server starts inherits it: how we find them all
STOP_WITHIN_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


class Server:
    """`ringserve serve` in its own process group; its output is read continuously (never blocks)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.mark = uuid.uuid4().hex
        self.grpc_port, self.http_port, self.dashboard_port = free_port(), free_port(), free_port()
        model = tmp / "tiny"
        make_tiny_llama(model)
        config = tmp / "cluster.yaml"
        config.write_text(yaml.safe_dump({
            "sweep_interval_s": 1.0,
            "group": {"sp": 2, "num_cpus_per_rank": 0.25, "kv_device_bytes": 64 << 20, "kv_host_bytes": 64 << 20,
                      "kv_cold_idle_s": 2.0},  # a cold session idle 2 s is demoted to Redis
            "billing": {"meter_interval_s": 1.0, "reconcile_every": 2},
        }))
        env = {**os.environ, MARK: self.mark,
               "RAY_metrics_report_interval_ms": "2000"}  # Ray exports metrics every 2 s, not 10
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_AUTH_MODE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ringserve.cluster.cli", "serve", "--config", str(config), "--model", str(model),
             "--port", str(self.grpc_port), "--http-port", str(self.http_port), "--api-key", KEY, "--num-cpus", "2",
             "--dashboard-port", str(self.dashboard_port), "--ray-token-file", str(tmp / "ray-token")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            if text in line:
                return "".join(self.output)
        raise AssertionError(f"`ringserve serve` did not print {text!r} (exit {self.proc.poll()}):\n"
                             + "".join(self.output)[-4000:])

    def banner(self, pattern: str) -> str:
        m = re.search(pattern, "".join(self.output))
        assert m, f"{pattern!r} not in the output of `ringserve serve`:\n" + "".join(self.output)[-3000:]
        return m.group(1)

    def processes(self) -> list:
        """Every live process carrying this server's mark (the server and everything it started)."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get(MARK) == self.mark:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for p in self.processes():
            try:
                p.kill()
            except Exception:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (`make test` installs it)")
    srv = Server(tmp_path_factory.mktemp("ops"))
    try:
        srv.wait_for("development API key", timeout=300)
        srv.info = {
            "dashboard": srv.banner(r"Ray dashboard: (\S+)"),
            "token_file": srv.banner(r"Ray token file: (\S+)"),
            "redis_port": int(srv.banner(r"Redis redis://127\.0\.0\.1:(\d+)/")),
            "metrics": srv.banner(r"Prometheus metrics: http://(\S+)/metrics"),
            "sd_file": srv.banner(r"for Prometheus file_sd: (\S+)"),
            "session": srv.banner(r"\(Ray session (\S+)\)"),
        }
        yield srv
    finally:
        srv.kill()


# ------------------------------------------------------------------------------------ Prometheus

class Prometheus:
    def __init__(self, binary: str, tmp: Path, sd_file: str):
        self.port = free_port()
        cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        cfg["rule_files"] = [str(ROOT / "deploy" / "prometheus" / f) for f in cfg["rule_files"]]
        (job,) = cfg["scrape_configs"]
        job["file_sd_configs"][0]["files"] = [sd_file]  # this server's session, not the newest one
        job["file_sd_configs"][0]["refresh_interval"] = "1s"
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200:
                    return
            except Exception:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list:
        return self.api("query", query=promql)["result"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def dashboard_queries(session: str) -> list[tuple[str, str]]:
    """(panel, PromQL) of every query of the committed dashboard, its variables filled in the way
    Grafana does: template variables take their current value, $__rate_interval and $__range a window."""
    dash = json.loads((ROOT / "deploy" / "grafana" / "ringserve.json").read_text())
    values = {"__rate_interval": "1m", "__range": "10m", "SessionName": session}
    for v in dash["templating"]["list"]:
        if v["type"] == "textbox":
            values[v["name"]] = v["current"]["value"]
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], t["expr"])
            out.append((p["title"], expr))
    assert len(out) >= 20
    return out


def test_prometheus_scrapes_every_panel_while_a_session_is_created_asked_demoted_and_billed(server, tmp_path):
    from ringserve.client import Client

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's `prometheus` is not installed (`make test` installs it with apt-get)")
    prom = Prometheus(binary, tmp_path, server.info["sd_file"])
    try:
        with Client(f"localhost:{server.grpc_port}", api_key=KEY, timeout=120) as client:
            s = client.create_session(TEXT[:300], ttl="10m", retention="cold")  # the tiny model holds 256 tokens
            assert s.generate("Ring attention", max_tokens=6).text()
            deadline = time.monotonic() + 60
            while s.refresh().tier != "redis":  # idle cold sessions are demoted after 2 s
                assert time.monotonic() < deadline, f"session not demoted: tier {s.tier}"
                time.sleep(0.5)
            assert s.generate("Ring attention", max_tokens=4).text()  # promoted back to answer
            deadline = time.monotonic() + 60
            while not (s.refresh().token_seconds.get("redis", 0) > 0 and s.cost_accrued > 0):
                assert time.monotonic() < deadline, f"not billed: {s.token_seconds} {s.cost_accrued}"
                time.sleep(0.5)

            queries = dashboard_queries(server.info["session"])
            empty: list = queries
            deadline = time.monotonic() + 120
            while empty and time.monotonic() < deadline:
                empty = [(title, q) for title, q in empty if not prom.query(q)]
                if empty:
                    time.sleep(2)
            assert not empty, "panel queries without a series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)
            s.delete()

        # the dashboard's cluster picker offers this Ray session
        names = prom.api("label/SessionName/values", **{"match[]": "ray_ringserve_sessions"})
        assert server.info["session"] in names

        # the alerting rules load, evaluate without error, and read series that exist
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups if g["name"] == "ringserve" for r in g["rules"]]
        assert len(rules) >= 8 and all(r["type"] == "alerting" for r in rules)
        deadline = time.monotonic() + 30
        while any(r.get("lastEvaluation", "").startswith("0001") for r in rules) and time.monotonic() < deadline:
            time.sleep(1)
            rules = [r for g in prom.api("rules")["groups"] if g["name"] == "ringserve" for r in g["rules"]]
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        series = {n for r in rules for n in re.findall(r"\bray_\w+", r["query"])}
        # (over the last minutes: Ray re-exports a gauge only when it is set, so a busy node leaves gaps)
        missing = [n for n in sorted(series) if not prom.query(f'group(last_over_time({{__name__="{n}"}}[5m]))')]
        assert not missing, f"alert rules read series Prometheus does not have: {missing}"
        firing = [r["name"] for r in rules if r["state"] == "firing"]
        assert not firing, f"alerts fire on a healthy cluster: {firing}"
    finally:
        prom.stop()


# ------------------------------------------------------------------------------------ browser

def _browser(tmp_path: Path):
    """A headless chromium through Debian's chromedriver; skips (with the reason) when it cannot start."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make test` installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (part of the test extra)")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver_bin, log_output=str(tmp_path / "chromedriver.log")),
                                options=opts)
    except WebDriverException as e:
        pytest.skip(f"the browser could not start on this machine: {e.msg or e}")


def test_the_printed_dashboard_shows_ringserve_running_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = server.info["dashboard"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url  # loopback by default
    assert int(url.rsplit(":", 1)[1]) == server.dashboard_port
    token = Path(server.info["token_file"]).read_text().strip()
    assert token
    with pytest.raises(urllib.error.HTTPError) as e:  # the API refuses requests without the token
        urllib.request.urlopen(f"{url}/api/serve/applications/", timeout=10)
    assert e.value.code == 401

    driver = _browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 60, poll_frequency=0.5)
        driver.get(url)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']"))
        wait.until(lambda d: "Authentication Token Required" in d.find_element(By.TAG_NAME, "body").text)  # shown
        driver.save_screenshot(str(tmp_path / "1-sign-in.png"))
        box.send_keys(token + Keys.ENTER)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']"))

        driver.get(f"{url}/#/serve")

        def app_running(d):
            rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "tr") if "ringserve" in r.text]
            return rows if rows and "RUNNING" in rows[0] else None

        rows = wait.until(app_running)
        driver.save_screenshot(str(tmp_path / "2-serve-applications.png"))
        assert "RUNNING" in rows[0]

        driver.get(f"{url}/#/serve/applications/ringserve")

        def deployments_healthy(d):
            found = {}
            for r in d.find_elements(By.CSS_SELECTOR, "tr"):
                name = r.text.split()[0] if r.text.split() else ""
                if name == "Gateway" or re.fullmatch(r"group-\d+", name):
                    found[name] = r.text
            ok = found and "Gateway" in found and any(n.startswith("group-") for n in found)
            return found if ok and all("HEALTHY" in t for t in found.values()) else None

        deployments = wait.until(deployments_healthy)
        driver.save_screenshot(str(tmp_path / "3-ringserve-deployments.png"))
        assert set(deployments) == {"Gateway", "group-0"}, deployments
    finally:
        driver.quit()
    shots = sorted(tmp_path.glob("*.png"))
    assert len(shots) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots)


# ------------------------------------------------------------------------------------ stop

def owner(port: int) -> str:
    """Who listens on `port` (for the failure message)."""
    import psutil

    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN:
            try:
                p = psutil.Process(c.pid)
                return f"pid {c.pid} {p.cmdline()[:4]} {'(ours)' if MARK in p.environ() else '(not ours)'}"
            except Exception as e:
                return f"pid {c.pid} ({e})"
    return "unknown"


def test_sigterm_stops_everything_within_10_s_leaving_no_process_or_port(server):
    host, metrics_port = server.info["metrics"].rsplit(":", 1)
    ports = {"gRPC": ("127.0.0.1", server.grpc_port), "Serve HTTP": ("127.0.0.1", server.http_port),
             "dashboard": ("127.0.0.1", server.dashboard_port), "redis-server": ("127.0.0.1", server.info["redis_port"]),
             "metrics": (host, int(metrics_port))}
    assert all(listening(p, h) for h, p in ports.values()), {n: listening(p, h) for n, (h, p) in ports.items()}
    before = server.processes()
    assert len(before) >= 5, [p.name() for p in before]  # the CLI, redis-server, Ray daemons, workers

    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ringserve serve` still running {STOP_WITHIN_S} s after SIGTERM:\n" + "".join(server.output)[-2000:])
    took = time.monotonic() - t0
    assert rc == 0, "".join(server.output)[-2000:]
    assert took < STOP_WITHIN_S
    left = server.processes()
    assert not left, f"processes left behind: {[(p.pid, p.name(), p.cmdline()[:3]) for p in left]}"
    still = {n: (p, owner(p)) for n, (h, p) in ports.items() if listening(p, h)}
    assert not still, f"ports still listening after stop (port, owner): {still}"
    assert "stopping ringserve (SIGTERM)" in "".join(server.output)
