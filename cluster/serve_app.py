"""Build and start the ringserve Serve application.

    app = build_app(cfg)            # Gateway (ingress) + one SequenceParallelGroup deployment per group
    info = start(cfg, LocalRay())   # Ray (with its dashboard), Serve with the gRPC proxy, the app
    stop(redis, timeout_s=8)        # all of it again, bounded in time

The gRPC proxy serves `ringserve.v1.RingServe` (plus reflection); Serve's HTTP proxy starts too
(KubeRay's readiness probe uses it). With `cfg.tls` the same proxy also listens with TLS on its own
port (cluster/tls.py); its max message size is `cfg.max_receive_bytes`. Both reach the proxy as
environment variables (`proxy_env`) of the Serve controller, whose children the proxies are.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ServeConfig
from .tls import HOOK as TLS_HOOK
from .tls import check_files, proxy_env

SERVICER = "ringserve.proto.ringserve.v1.ringserve_pb2_grpc.add_RingServeServicer_to_server"
HEALTH = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"  # standard grpc.health.v1
# what Serve's gRPC proxy registers: the API, health, and the hook that adds the TLS port (a no-op
# on a node whose environment asks for no TLS)
GRPC_SERVICER_FUNCTIONS = (SERVICER, HEALTH, TLS_HOOK)
APP_NAME = "ringserve"
DEFAULT_RAY_TOKEN_FILE = str(Path.home() / ".ray" / "auth_token")  # where Ray keeps a local cluster's token


def build_app(cfg: ServeConfig):
    from .gateway import Gateway
    from .groups import SequenceParallelGroup

    groups = [SequenceParallelGroup.options(name=f"group-{i}").bind(f"group-{i}", asdict(cfg.group))
              for i in range(cfg.groups)]
    return Gateway.options(name="Gateway").bind(cfg.to_dict(), *groups)


@dataclass(frozen=True)
class LocalRay:
    """How `ringserve serve` starts Ray on this machine (on Kubernetes, KubeRay starts it)."""

    num_cpus: int | None = None  # None: every CPU
    dashboard: bool = False  # the Ray dashboard (and the metrics service-discovery file it writes)
    dashboard_host: str = "127.0.0.1"  # loopback: reach it from elsewhere through an SSH tunnel
    dashboard_port: int | None = None  # None: 8265, or the next free port
    token_file: str | None = None  # Ray's auth token (RAY_AUTH_TOKEN_PATH), created when missing


@dataclass(frozen=True)
class RayInfo:
    """Where the operator finds what `start` started."""

    session_name: str  # Ray's SessionName label on every metric of this cluster
    session_dir: str
    metrics_url: str  # this node's Prometheus endpoint
    dashboard_url: str | None = None
    token_source: str | None = None  # where the dashboard's token is; None: no authentication
    service_discovery: str | None = None  # Prometheus file_sd file (written by the dashboard)


def start(cfg: ServeConfig, local: LocalRay | None = None, *, num_cpus: int | None = None) -> RayInfo | None:
    """Start Ray (if needed), Serve with the gRPC proxy, and the application; returns when ready.
    Returns where the dashboard and metrics are when this call started Ray, else None."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not cfg.redis_url:
        raise ValueError("redis_url is required (ringserve serve starts a local redis-server when none is given)")
    if cfg.tls is not None:
        check_files(cfg.tls)
        _check_port_free(cfg.tls.port, "tls.port")
    local = local or LocalRay(num_cpus=num_cpus)
    info = None
    if not ray.is_initialized():
        if local.token_file:
            _use_token_file(local.token_file)
        ctx = ray.init(num_cpus=local.num_cpus, include_dashboard=local.dashboard,
                       dashboard_host=local.dashboard_host, dashboard_port=local.dashboard_port, log_to_driver=False)
        info = _ray_info(ctx, local)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port},
                grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
                                         enable_reflection=True),
                # the proxies are the controller's children and inherit these: max message size, TLS
                controller_options={"runtime_env": {"env_vars": proxy_env(cfg)}})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return info


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ValueError(f"{what} {port} is not free ({e.strerror}): choose another port") from e


def _use_token_file(path: str) -> None:
    """Make Ray read its auth token from `path` (RAY_AUTH_TOKEN_PATH), creating a random one (mode
    0600) when the file does not exist yet."""
    p = Path(path).expanduser()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(p.resolve())


def _token_source() -> str | None:
    """Where Ray takes its token from, in Ray's own order of precedence; None: authentication is off."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the environment variable RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_RAY_TOKEN_FILE


def _ray_info(ctx, local: LocalRay) -> RayInfo:
    a = ctx.address_info
    session_dir = a["session_dir"]
    host = a.get("node_ip_address") or "127.0.0.1"
    sd = None
    if local.dashboard:
        sd = os.path.join(session_dir, "prom_metrics_service_discovery.json")
    url = ctx.dashboard_url
    return RayInfo(session_name=os.path.basename(session_dir), session_dir=session_dir,
                   metrics_url=f"http://{host}:{a['metrics_export_port']}/metrics",
                   dashboard_url=(url if url.startswith("http") else f"http://{url}") if local.dashboard and url else None,
                   token_source=_token_source() if local.dashboard else None, service_discovery=sd)


@dataclass(frozen=True)
class Stopped:
    clean: bool  # Serve and Ray shut down through their own calls (else their processes were stopped)
    killed: tuple[str, ...] = ()  # "name (pid)" of the processes still running at the deadline, killed


def stop(redis: "LocalRedis | None" = None, *, timeout_s: float = 8.0) -> Stopped:
    """Stop what `start` started — Serve (its replicas get what is left of the time but 3 s), Ray
    (daemons and workers), then the local redis-server — within about `timeout_s`. If Serve does
    not finish in time, Ray's processes are killed under it instead of calling ray.shutdown() while
    Serve still uses the worker (that ends this process on the spot); the caller should then exit
    without Ray's exit hooks (os._exit). Processes of ours still running at the end are killed."""
    import psutil

    deadline = time.monotonic() + timeout_s
    left = lambda reserve=0.0: max(0.1, deadline - time.monotonic() - reserve)  # noqa: E731
    me = psutil.Process()
    ours = set(me.children(recursive=True))  # Ray's daemons and workers, redis-server
    keep = {redis.proc.pid} if redis is not None else set()
    clean = True

    import ray

    if ray.is_initialized():
        from ray import serve

        t = _thread(serve.shutdown)
        t.join(left(3.0))
        ours |= set(me.children(recursive=True))
        if t.is_alive():
            clean = False
        else:
            t = _thread(ray.shutdown)
            t.join(min(2.0, left(1.5)))
            clean = not t.is_alive()
        if not clean:  # nothing of Ray's holds durable state: kill it outright
            ray_procs = [p for p in ours if p.pid not in keep]
            for p in ray_procs:
                _signal(p, signal.SIGKILL)
            _wait_gone(ray_procs, 0.5)
    if redis is not None:  # last, and gracefully: it writes its append-only file on the way down
        redis.stop(timeout_s=min(1.5, left(0.5)))
    alive = _wait_gone(ours, left())
    killed = []
    for p in alive:
        killed.append(f"{_name(p)} ({p.pid})")
        _signal(p, signal.SIGKILL)
    _wait_gone(alive, 0.5)
    return Stopped(clean, tuple(killed))


def _wait_gone(procs, timeout_s: float) -> list:
    """Wait until every process has exited; returns those still running. A zombie counts as gone
    (in a container whose init does not reap, Ray's orphaned workers stay zombies)."""
    import psutil

    def running(p) -> bool:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                return True
            p.wait(0)  # reap it, if it is our own child
        except (psutil.Error, ChildProcessError):
            pass
        return False

    end = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if running(p)]
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.05)


def _thread(fn) -> threading.Thread:
    t = threading.Thread(target=_quietly, args=(fn,), daemon=True)
    t.start()
    return t


def _name(p) -> str:
    try:
        return " ".join(p.cmdline()[:2])[:80] or p.name()
    except Exception:
        return "?"


def _signal(p, sig) -> None:
    try:
        p.send_signal(sig)
    except Exception:  # gone already
        pass


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        pass


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
        # its own session, so a Ctrl-C in the terminal does not stop it before Serve is down; and it
        # dies with this process if that is killed outright
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes" if appendonly else "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
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

    def stop(self, timeout_s: float = 5.0):
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def app_builder(args: dict):
    """Serve application builder, so a Serve config (or KubeRay's serveConfigV2) can deploy ringserve:

        applications:
          - name: ringserve
            import_path: ringserve.cluster.serve_app:app_builder
            args: {redis_url: "redis://redis:6379/0", groups: 2, group: {sp: 4, num_gpus_per_rank: 1}}

    `args` is a ServeConfig in dict form (the same keys as the YAML file of `ringserve serve`)."""
    return build_app(ServeConfig.from_dict(args))
