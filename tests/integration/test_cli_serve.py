"""`ringserve serve` as a user starts it, then the session / ask / status commands against it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TEXT, free_port_here, make_tiny_llama

pytestmark = pytest.mark.slow


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "ringserve.cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_serve_then_session_ask_status_delete(tmp_path):
    model = tmp_path / "tiny"
    make_tiny_llama(model)
    port, key = free_port_here(), "rs-test-key"
    env = {**os.environ, "RINGSERVE_ADDRESS": f"localhost:{port}", "RINGSERVE_API_KEY": key}
    server = subprocess.Popen([sys.executable, "-m", "ringserve.cluster.cli", "serve", "--port", str(port),
                               "--api-key", key, "--model", str(model), "--num-cpus", "2", "--no-dashboard"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    try:
        banner = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "development API key" in line:
                break
        out = "".join(banner)
        assert f"localhost:{port}" in out and key in out, out[-3000:]
        doc = tmp_path / "doc.txt"
        doc.write_text(TEXT[:300])  # the tiny model holds 256 tokens
        r = cli("session", "create", "--file", str(doc), "--ttl", "10m", env=env)
        assert r.returncode == 0, r.stderr
        name = r.stdout.split()[0]
        assert name.startswith("sessions/s-")
        r = cli("ask", name, "Ring attention", "--max-tokens", "5", env=env)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        r = cli("session", "set-format", name, "fp8", env=env)  # a smaller form, shown; never back up
        assert r.returncode == 0 and " fp8 " in r.stdout, r.stdout + r.stderr
        r = cli("session", "set-format", name, "exact", env=env)
        assert r.returncode == 2 and "FAILED_PRECONDITION" in r.stderr, r.stderr
        r = cli("status", env=env)
        assert r.returncode == 0 and "group-0" in r.stdout and "1 session(s), 1 metered" in r.stdout, r.stdout + r.stderr
        assert "Redis ok" in r.stdout and "rank 0" in r.stdout and "cpu" in r.stdout, r.stdout
        # the scheduler's line: nothing queued now, and the steps that served the create and the question
        assert "scheduler: 0 waiting, 0 running" in r.stdout and " 0 steps" not in r.stdout, r.stdout
        assert cli("session", "list", env=env).stdout.count("sessions/s-") == 1
        r = cli("usage", "--since", "24h", env=env)
        sid = name.split("/")[1]
        assert r.returncode == 0 and sid in r.stdout and "cost USD" in r.stdout and "total" in r.stdout, r.stdout
        r = cli("usage", "--since", "1h", "--format", "csv", env=env)
        assert r.returncode == 0 and r.stdout.startswith("id,event,tenant") and f"{sid}:c1" in r.stdout, r.stdout
        r = cli("usage", "--since", "1h", "--group-by", "week", env=env)
        assert r.returncode != 0 and "invalid choice" in r.stderr
        assert cli("session", "delete", name, env=env).returncode == 0
        r = cli("session", "get", name, env=env)
        assert r.returncode == 2 and "NOT_FOUND" in r.stderr
        # Ctrl-C: everything is down within cli.STOP_TIMEOUT_S (8 s) plus the exit itself (slack for a busy CI)
        t0 = time.monotonic()
        os.killpg(server.pid, signal.SIGINT)
        server.wait(60)
        assert time.monotonic() - t0 < 15, f"Ctrl-C took {time.monotonic() - t0:.1f} s"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
