"""A ringserve cluster for the control-plane tests: a real local Ray Serve with the gRPC proxy (its
receive size bounded as cluster/limits.py says), a Gateway with input limits, SP = 2 groups of a tiny
Llama whose end-of-turn tokens are never greedy (so answers run to max_tokens), and a real redis-server
the test can stop and restart."""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import grpc

from helpers import make_tiny_llama
from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.proto.ringserve.v1 import ringserve_pb2_grpc as pb_grpc


class Redis:
    """A redis-server of the test's own (append-only file, fsync always: a kill loses nothing) that can be
    stopped, restarted on the same port, paused and resumed."""

    def __init__(self, workdir: Path):
        import socket

        self.dir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        import subprocess

        import redis

        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)

    def kill(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


def make_chatty_llama(path: Path, max_positions: int = 4096) -> str:
    """A tiny random Llama whose special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) get logit 0 while
    the others are random: greedy decoding never ends a turn early."""
    import torch

    model = make_tiny_llama(path, max_positions=max_positions)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


class Cluster:
    def __init__(self, *, keys: dict, groups: int = 1, limits: dict | None = None, inputs: dict | None = None,
                 group: dict | None = None, billing: dict | None = None, extra: dict | None = None,
                 max_positions: int = 4096):
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        from ringserve.cluster.config import ApiKey, ServeConfig
        from ringserve.cluster.gateway import Gateway
        from ringserve.cluster.groups import SequenceParallelGroup
        from ringserve.cluster.limits import InputLimits, controller_options
        from ringserve.cluster.serve_app import APP_NAME, HEALTH, SERVICER, free_port

        self.dir = Path(tempfile.mkdtemp(prefix="ringserve-cp-"))
        self.model = make_chatty_llama(self.dir / "model", max_positions)
        self.redis = Redis(self.dir)
        self.port = free_port()
        self.keys = keys
        cfg = ServeConfig.from_dict({
            "grpc_port": self.port, "http_port": free_port(), "redis_url": self.redis.url, "model": self.model,
            "groups": groups, "sweep_interval_s": 1.0, "progress_chunk": 64,
            "limits": limits or {"max_sessions": 50, "max_tokens": 10**6},
            "group": {"sp": 2, "num_cpus_per_rank": 0.25, "kv_device_bytes": 64 << 20, "kv_host_bytes": 64 << 20,
                      "redis_url": self.redis.url, "prefill_chunk": 64, "block": 16, "collective_timeout_s": 20,
                      "call_timeout_s": 60, "kv_cold_idle_s": 1.0, **(group or {})},
            "billing": {"meter_interval_s": 0.5, "reconcile_every": 2, **(billing or {})},
            "api_keys": [vars(ApiKey.from_plain(k, t, admin=a)) for k, (t, a) in keys.items()],
            **(extra or {}),
        })
        self.cfg = cfg
        self.inputs = InputLimits.from_dict(inputs)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port},
                    grpc_options=gRPCOptions(port=self.port, grpc_servicer_functions=[SERVICER, HEALTH]),
                    controller_options=controller_options(self.inputs, max_positions))
        gs = [SequenceParallelGroup.options(name=f"group-{i}").bind(f"group-{i}", asdict(cfg.group))
              for i in range(groups)]
        app = Gateway.options(name="Gateway").bind({**cfg.to_dict(), "input": asdict(self.inputs)}, *gs)
        serve.run(app, name=APP_NAME, route_prefix="/")
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", -1),
                                                                    ("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.RingServeStub(self.channel)

    def md(self, key: str | None) -> list:
        return [("authorization", f"Bearer {key}")] if key is not None else []

    def group(self, i: int = 0):
        from ray import serve

        return serve.get_deployment_handle(f"group-{i}", app_name="ringserve")

    def computed(self, sid: str, i: int = 0) -> tuple[int, int]:
        """(prompt, generated) tokens the group's scheduler computed for a session."""
        return tuple(self.group(i).computed_tokens.remote(sid).result(timeout_s=30))

    def ledger(self):
        from ringserve.cluster.billing import Ledger

        return Ledger(self.redis.url, self.cfg.billing)

    def compute_records(self, tenant: str, sid: str) -> list[dict]:
        return [r for r in self.ledger().records(tenant, time.time() - 3600, time.time() + 60, sid)
                if r["kind"] == "compute"]

    def billed(self, tenant: str, sid: str) -> tuple[int, int]:
        """(prefill, generated) tokens of the session's compute records in the ledger."""
        recs = self.compute_records(tenant, sid)
        return sum(r["prefill_tokens"] for r in recs), sum(r["generated_tokens"] for r in recs)

    def redis_client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10)

    def registry(self):
        from ringserve.cluster.registry import Registry

        return Registry(self.redis.url)

    def wait(self, cond, timeout: float, every: float = 0.1, what: str = "condition"):
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            try:
                last = cond()
                if last:
                    return last
            except Exception as e:  # noqa: BLE001 - keep polling; report the last error
                last = e
            time.sleep(every)
        raise AssertionError(f"{what} not within {timeout} s (last: {last!r})")

    def close(self):
        self.channel.close()
        stop_ray()
        self.redis.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_ray() -> None:
    """End the module's local Ray with everything on it. Serve's own graceful shutdown is skipped (it drains
    each replica, ~5 s per module): the whole cluster goes with Ray. The driver's Serve client is forgotten
    so that the next module's serve.start makes a new one on its new cluster."""
    import ray
    from ray.serve import context

    ray.shutdown()
    context._set_global_client(None)


@contextmanager
def local_service(config: dict, *, ray_init: dict | None = None):
    """ringserve's own app (serve_app.start, as `ringserve serve` runs it) on a fresh local Ray of 2 CPUs with
    a LocalRedis: `config` is a ServeConfig dict without the ports and Redis URLs, which are filled in here.
    Yields the gRPC address."""
    import ray

    from ringserve.cluster.config import ServeConfig
    from ringserve.cluster.serve_app import LocalRedis, free_port, start

    redis = LocalRedis()
    port = free_port()
    cfg = ServeConfig.from_dict({**config, "grpc_port": port, "http_port": free_port(), "redis_url": redis.url,
                                 "group": {**config.get("group", {}), "redis_url": redis.url}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **(ray_init or {}))
    try:
        start(cfg)
        yield f"localhost:{port}"
    finally:
        stop_ray()
        redis.stop()


def create(c: Cluster, key: str, text: str | None = None, *, tokens=None, **kw) -> pb.Session:
    """CreateSession over the raw stub; returns the created Session."""
    req = pb.CreateSessionRequest(**kw)
    if tokens is not None:
        req.token_ids.ids.extend(tokens)
    else:
        req.text = text
    last = None
    for ev in c.stub.CreateSession(req, metadata=c.md(key), timeout=120):
        last = ev
    assert last is not None and last.HasField("session")
    return last.session


def generate(c: Cluster, key: str, name: str, text: str = "Tell me more.", *, timeout: float = 120,
             **kw) -> tuple[str, list[int], pb.GenerateResponse]:
    """Generate over the raw stub: (text, token ids, last message)."""
    out, ids, last = "", [], None
    if text is not None and not ({"token_ids", "messages"} & kw.keys()):  # one prompt form only
        kw["text"] = text
    for m in c.stub.Generate(pb.GenerateRequest(name=name, **kw), metadata=c.md(key), timeout=timeout):
        out += m.text_delta
        ids += list(m.token_ids)
        last = m
    return out, ids, last
