"""Build and start the ringserve Serve application.

    app = build_app(cfg)            # Gateway (ingress) + one SequenceParallelGroup deployment per group
    start(cfg)                      # serve.start with the gRPC proxy, then serve.run(app)

The gRPC proxy serves `ringserve.v1.RingServe` (plus reflection); Serve's HTTP proxy starts too
(KubeRay's readiness probe uses it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict

from .config import ServeConfig

SERVICER = "ringserve.proto.ringserve.v1.ringserve_pb2_grpc.add_RingServeServicer_to_server"
HEALTH = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"  # standard grpc.health.v1
APP_NAME = "ringserve"


def build_app(cfg: ServeConfig):
    from .gateway import Gateway
    from .groups import SequenceParallelGroup

    groups = [SequenceParallelGroup.options(name=f"group-{i}").bind(f"group-{i}", asdict(cfg.group))
              for i in range(cfg.groups)]
    return Gateway.options(name="Gateway").bind(cfg.to_dict(), *groups)


def start(cfg: ServeConfig, *, num_cpus: int | None = None):
    """Start Ray (if needed), Serve with the gRPC proxy, and the application; returns when ready."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not cfg.redis_url:
        raise ValueError("redis_url is required (ringserve serve starts a local redis-server when none is given)")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port},
                grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=[SERVICER, HEALTH],
                                         enable_reflection=True))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A redis-server on a free loopback port in a temp dir (for `ringserve serve` without a URL)."""

    def __init__(self, port: int | None = None, *, appendonly: bool = True):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `apt-get install redis-server`, or pass --redis-url")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ringserve-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes" if appendonly else "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def app_builder(args: dict):
    """Serve application builder, so a Serve config (or KubeRay's serveConfigV2) can deploy ringserve:

        applications:
          - name: ringserve
            import_path: ringserve.cluster.serve_app:app_builder
            args: {redis_url: "redis://redis:6379/0", groups: 2, group: {sp: 4, num_gpus_per_rank: 1}}

    `args` is a ServeConfig in dict form (the same keys as the YAML file of `ringserve serve`)."""
    return build_app(ServeConfig.from_dict(args))
