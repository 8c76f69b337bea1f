"""TLS pieces without Ray: the server credentials `add_tls_port` gives Serve's proxy (on a grpc.aio
server of our own, as Serve's proxy is one), the SDK's TLS arguments, certificate renewal without a
restart, the file checks, the environment that carries the settings to the proxy, and
`transport_refusal` on Serve's own RayServegRPCContext built from real TLS and plaintext calls.
The end-to-end run through `ringserve serve` is tests/integration/test_tls_serve.py."""

from __future__ import annotations

import asyncio
import shutil
import threading

import grpc
import grpc.aio
import pytest

from certs import make_certs, needs_openssl
from ringserve.client import AsyncClient, Client, PermissionDenied, Unavailable
from ringserve.cluster import tls
from ringserve.cluster.config import ServeConfig, TlsConfig
from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.proto.ringserve.v1 import ringserve_pb2_grpc

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


class Servicer(ringserve_pb2_grpc.RingServeServicer):
    """Status (unary) and ExportUsage (a stream), each refusing what `transport_refusal` refuses,
    judged on Serve's RayServegRPCContext as the Gateway sees it."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.seen = []  # (transport is TLS, peer) of each call

    def _check(self, context):
        from ray.serve.grpc_util import RayServegRPCContext

        ctx = RayServegRPCContext(context)
        self.seen.append((tls.is_tls(ctx), ctx.peer()))
        return tls.transport_refusal(self.cfg, ctx)

    async def Status(self, request, context):
        why = self._check(context)
        if why:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return pb.StatusResponse(sessions=7)

    async def ExportUsage(self, request, context):
        why = self._check(context)
        if why:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        for part in ("id,event\n", "a,b\n"):
            yield pb.ExportUsageChunk(data=part.encode())


class Server:
    """A grpc.aio server on its own event loop thread: a plaintext port and a TLS port made by
    tls.add_tls_port from the environment (exactly what Serve's proxy runs)."""

    def __init__(self, cfg: ServeConfig, monkeypatch, *, listen: str = "127.0.0.1"):
        self.servicer = Servicer(cfg)
        for k, v in tls.proxy_env(cfg).items():
            monkeypatch.setenv(k, v)
        if cfg.tls and not cfg.tls.client_ca_file:
            monkeypatch.delenv(tls.ENV_CLIENT_CA, raising=False)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(cfg, listen), self.loop).result(10)

    async def _start(self, cfg, listen):
        self.server = grpc.aio.server()
        ringserve_pb2_grpc.add_RingServeServicer_to_server(self.servicer, self.server)
        self.plain_port = self.server.add_insecure_port(f"{listen}:0")
        tls.add_tls_port(None, self.server)  # listens on [::]:tls.port
        await self.server.start()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def free_port() -> int:
    from ringserve.cluster.serve_app import free_port

    return free_port()


@pytest.fixture
def make_server(monkeypatch):
    servers = []

    def make(cfg, **kw):
        servers.append(Server(cfg, monkeypatch, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def tls_cfg(certs, *, mtls: bool, **kw) -> ServeConfig:
    return ServeConfig(tls=TlsConfig(str(certs.server_cert), str(certs.server_key),
                                     str(certs.client_ca) if mtls else None, port=free_port()), **kw)


def test_sdk_with_the_ca_talks_over_tls_and_a_plaintext_client_is_refused(certs, make_server):
    cfg = tls_cfg(certs, mtls=False)
    srv = make_server(cfg)
    address = f"localhost:{cfg.tls.port}"
    with Client(address, secure=True, ca=str(certs.ca), timeout=5) as c:
        assert c.status().sessions == 7
        assert "".join(c.export_usage("1h")) == "id,event\na,b\n"  # a stream over TLS
    with Client(address, ca=certs.ca.read_bytes(), timeout=5) as c:  # PEM bytes; ca alone implies TLS
        assert c.status().sessions == 7

    async def aio():
        async with AsyncClient(address, secure=True, ca=str(certs.ca), timeout=5) as c:
            return (await c.status()).sessions
    assert asyncio.run(aio()) == 7
    assert srv.servicer.seen and all(is_tls for is_tls, _ in srv.servicer.seen)
    # a plaintext client gets no answer from the TLS port: the handshake fails, nothing is served
    calls = len(srv.servicer.seen)
    with Client(address, timeout=3, retries=0) as c, pytest.raises(Unavailable):
        c.status()
    # a client that trusts another CA refuses the server
    with Client(address, ca=str(certs.client_ca), timeout=3, retries=0) as c, pytest.raises(Unavailable):
        c.status()
    # the name in the certificate must match: 127.0.0.1 is in it, "ringserve.test" is not
    with Client(f"127.0.0.1:{cfg.tls.port}", ca=str(certs.ca), timeout=5) as c:
        assert c.status().sessions == 7
    with Client(f"127.0.0.1:{cfg.tls.port}", ca=str(certs.ca), server_name="ringserve.test", timeout=3,
                retries=0) as c, pytest.raises(Unavailable):
        c.status()
    assert len(srv.servicer.seen) == calls + 1  # only the good one reached the service


def test_mtls_requires_a_client_certificate_from_the_client_ca(certs, make_server):
    cfg = tls_cfg(certs, mtls=True)
    srv = make_server(cfg)
    address = f"localhost:{cfg.tls.port}"
    with Client(address, ca=str(certs.ca), client_cert=str(certs.client_cert), client_key=str(certs.client_key),
                timeout=5) as c:
        assert c.status().sessions == 7
    for kw in ({}, {"client_cert": str(certs.stranger_cert), "client_key": str(certs.stranger_key)}):
        with Client(address, ca=str(certs.ca), timeout=3, retries=0, **kw) as c, pytest.raises(Unavailable):
            c.status()
    assert len(srv.servicer.seen) == 1


def test_plaintext_is_for_loopback_callers_once_tls_is_on(certs, make_server):
    """transport_refusal judged on RayServegRPCContext from real calls: TLS from anywhere, plaintext
    from this host; a plaintext call from another address is refused, naming the TLS port."""
    import socket

    cfg = tls_cfg(certs, mtls=False)
    srv = make_server(cfg, listen="0.0.0.0")
    with Client(f"127.0.0.1:{srv.plain_port}", timeout=5) as c:
        assert c.status().sessions == 7
    assert srv.servicer.seen[-1] == (False, srv.servicer.seen[-1][1]) and \
        srv.servicer.seen[-1][1].startswith("ipv4:127.0.0.1:")
    # this machine's own non-loopback address stands in for "another host"
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("10.255.255.255", 1))
        own = s.getsockname()[0]
        s.close()
    except OSError:
        own = None
    if own is None or own.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    with Client(f"{own}:{srv.plain_port}", timeout=5, retries=0) as c, pytest.raises(PermissionDenied) as e:
        c.status()
    assert f"connect with TLS on port {cfg.tls.port}" in str(e.value)
    with Client(f"{own}:{cfg.tls.port}", ca=str(certs.ca), server_name="localhost", timeout=5) as c:
        assert c.status().sessions == 7  # TLS from the same address is fine


class FakeContext:
    def __init__(self, peer, security=b"insecure"):
        self._peer, self._security = peer, security

    def peer(self):
        return self._peer

    def auth_context(self):
        return {"transport_security_type": [self._security]}


@pytest.mark.parametrize("peer, loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.8.9.1:1", True), ("ipv6:[::1]:5000", True),
    ("ipv6:%5B::1%5D:5000", True), ("ipv6:[::ffff:127.0.0.1]:5", True), ("unix:/tmp/s", True),
    ("ipv4:10.1.2.3:5000", False), ("ipv6:[fe80::1%25eth0]:5", False), ("ipv6:%5B2001:db8::1%5D:1", False),
    ("", False), ("garbage", False), ("ipv4:not-an-ip:1", False),
])
def test_loopback_peers(peer, loopback):
    assert tls.is_loopback(peer) is loopback


def test_transport_rules_by_config():
    remote, local = FakeContext("ipv4:10.0.0.9:1"), FakeContext("ipv4:127.0.0.1:1")
    remote_tls = FakeContext("ipv4:10.0.0.9:1", b"ssl")
    with_tls = ServeConfig(tls=TlsConfig("c.pem", "k.pem", port=9443))
    assert tls.transport_refusal(ServeConfig(), remote) is None  # plaintext from anywhere, as configured
    assert "started with TLS" in tls.transport_refusal(ServeConfig(plaintext_peers="loopback"), remote)
    assert "TLS on port 9443" in tls.transport_refusal(with_tls, remote)
    for cfg in (ServeConfig(), ServeConfig(plaintext_peers="loopback"), with_tls):
        assert tls.transport_refusal(cfg, local) is None and tls.transport_refusal(cfg, remote_tls) is None
    with pytest.raises(ValueError, match="plaintext_peers"):
        ServeConfig(plaintext_peers="lan")


def test_certificate_renewal_is_served_without_a_restart(certs, make_server, tmp_path):
    """The files behind the TLS port are replaced (as a Secret volume's are): new connections get
    the new certificate; a broken replacement keeps the old one in service."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(certs.server_cert, live / "tls.crt")
    shutil.copy(certs.server_key, live / "tls.key")
    cfg = ServeConfig(tls=TlsConfig(str(live / "tls.crt"), str(live / "tls.key"), port=free_port()))
    make_server(cfg)
    address = f"localhost:{cfg.tls.port}"
    with Client(address, ca=str(certs.ca), timeout=5) as c:
        assert c.status().sessions == 7
    renewed = make_certs(tmp_path / "renewed")  # a new CA and server certificate
    (live / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\nhalf written")  # mid-rotation: ignored
    with Client(address, ca=str(certs.ca), timeout=5) as c:
        assert c.status().sessions == 7
    shutil.copy(renewed.server_cert, live / "tls.crt")
    shutil.copy(renewed.server_key, live / "tls.key")
    with Client(address, ca=str(renewed.ca), timeout=5) as c:  # a new channel: a new handshake
        assert c.status().sessions == 7
    with Client(address, ca=str(certs.ca), timeout=3, retries=0) as c, pytest.raises(Unavailable):
        c.status()


def test_env_round_trip_and_the_servicer_list():
    from ringserve.cluster.serve_app import GRPC_SERVICER_FUNCTIONS

    cfg = ServeConfig(max_receive_bytes=1 << 20, tls=TlsConfig("/t/c.pem", "/t/k.pem", "/t/ca.pem", port=9443))
    env = tls.proxy_env(cfg)
    assert env[tls.ENV_MAX_MESSAGE] == str(1 << 20)
    assert tls.from_env(env) == cfg.tls
    assert tls.from_env(tls.proxy_env(ServeConfig())) is None
    with pytest.raises(ValueError, match="RINGSERVE_TLS_KEY"):
        tls.from_env({tls.ENV_CERT: "/t/c.pem", tls.ENV_PORT: "1"})
    assert tls.HOOK in GRPC_SERVICER_FUNCTIONS  # Serve's proxy calls it with its server
    from ray._common.utils import import_attr

    assert import_attr(tls.HOOK) is tls.add_tls_port  # importable by that path, as the proxy does


def test_config_checks():
    assert ServeConfig().max_receive_bytes == 64 << 20
    with pytest.raises(ValueError, match="max_receive_bytes"):
        ServeConfig(max_receive_bytes=0)
    with pytest.raises(ValueError, match="its own port"):
        ServeConfig(grpc_port=9000, tls=TlsConfig("c", "k", port=9000))
    cfg = ServeConfig.from_dict({"max_receive_bytes": 1000, "tls": {"cert_file": "c", "key_file": "k", "port": 1},
                                 "input": {"max_concurrent_per_tenant": 3}})
    assert cfg.tls == TlsConfig("c", "k", None, 1) and ServeConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.input.max_concurrent_per_tenant == 3  # the Gateway's other bounds ride along (cluster/limits.py)
    with pytest.raises(ValueError, match="set the top-level max_receive_bytes only"):  # one knob for the proxy
        ServeConfig.from_dict({"input": {"max_receive_bytes": 5}})


def test_unusable_files_are_named(certs, tmp_path):
    good = dict(cert_file=str(certs.server_cert), key_file=str(certs.server_key))
    tls.check_files(TlsConfig(**good, client_ca_file=str(certs.client_ca)))
    with pytest.raises(ValueError, match="no-such.pem"):
        tls.check_files(TlsConfig(cert_file=str(tmp_path / "no-such.pem"), key_file=good["key_file"]))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="junk.pem is not PEM"):
        tls.check_files(TlsConfig(**good, client_ca_file=str(tmp_path / "junk.pem")))
    with pytest.raises(ValueError, match="do not load together"):  # the client's key with the server's cert
        tls.check_files(TlsConfig(cert_file=good["cert_file"], key_file=str(certs.client_key)))


def test_sdk_tls_arguments_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        Client("localhost:1", ca=str(certs.ca), client_cert=str(certs.client_cert))
    with pytest.raises(ValueError, match="cannot read the CA bundle"):
        Client("localhost:1", ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="server_name is for TLS"):
        Client("localhost:1", server_name="x")


def test_serve_banner_says_plaintext_or_tls():
    from ringserve.cluster.cli import serve_banner

    plain = serve_banner(ServeConfig(plaintext_peers="loopback"), "k", "redis://x", None)
    assert "gRPC on localhost:50051" in plain and "PLAINTEXT (no TLS), for clients on this machine" in plain
    assert "--tls-cert and --tls-key" in plain and "secure=True" not in plain
    cfg = ServeConfig(grpc_port=41000, tls=TlsConfig("/c/server.pem", "/c/server.key", "/c/clients.pem", port=50051))
    banner = serve_banner(cfg, "k", "redis://x", None)
    assert "gRPC over TLS on port 50051" in banner and "signed by /c/clients.pem" in banner
    assert "plaintext gRPC for this machine only: localhost:41000" in banner and "PLAINTEXT" not in banner
    assert "Client('localhost:50051', api_key='k', secure=True, ca='ca.pem', client_cert=" in banner
