"""A real `redis-server` for the integration tests, on a free loopback port in a temp dir.

`redis_server` (session scope) starts one server for the whole run; outage tests stop and restart that
very process through `RedisServer.stop()` / `.start()` (SIGTERM: the server saves its RDB on the way
down, so data survives a restart) or `.kill()` (SIGKILL: data since the last save is gone).
`redis_url` (function scope) hands each test a running, empty server.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str, workdir: Path, *, aof: bool = False):
        self.binary, self.dir, self.aof = binary, workdir, aof
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        # A save point that never fires on its own, so SIGTERM writes dump.rdb and a restart reloads it.
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "86400 1",
                *(["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]), "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log"), "--proto-max-bulk-len", "512mb"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server (SIGTERM: it saves its data first) and wait until the port is closed."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        """Kill the server (SIGKILL): whatever was not saved is gone."""
        if self.running:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _started(workdir: Path, *, aof: bool = False) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    server = RedisServer(binary, workdir, aof=aof)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server():
    workdir = Path(tempfile.mkdtemp(prefix="ringserve-redis-"))
    server = _started(workdir)
    yield server
    server.kill()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server) -> str:
    """A running, empty server (restarted if an earlier test left it stopped)."""
    redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def aof_redis(tmp_path):
    """A redis-server of its own with the append-only file on (fsync on every write), as the chart
    runs the billing Redis: a SIGKILL loses nothing."""
    server = _started(tmp_path, aof=True)
    yield server
    server.kill()
