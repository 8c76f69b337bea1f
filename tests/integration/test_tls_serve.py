"""`ringserve serve --tls-cert --tls-key --tls-client-ca` as a user starts it (one server for the
module): the SDK with the CA and a client certificate talks (streams included), a plaintext client,
a client without a certificate and one with a certificate from another CA are refused, the
plaintext port serves this machine, and a message over --max-receive-bytes gets RESOURCE_EXHAUSTED
from Serve's proxy on both ports. The pieces alone: tests/unit/test_tls.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from certs import make_certs, needs_openssl
from helpers import TEXT, free_port_here, make_tiny_llama
from ringserve.client import AsyncClient, Client, ResourceExhausted, Unavailable

pytestmark = [pytest.mark.slow, needs_openssl]

KEY = "rs-tls-test-key"
MAX_RECEIVE = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d / "certs")
    model = d / "tiny"
    make_tiny_llama(model)
    port, plain = free_port_here(), free_port_here()
    server = subprocess.Popen(
        [sys.executable, "-m", "ringserve.cluster.cli", "serve", "--port", str(port), "--plaintext-port", str(plain),
         "--api-key", KEY, "--model", str(model), "--num-cpus", "2", "--no-dashboard",
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
         "--tls-client-ca", str(certs.client_ca), "--max-receive-bytes", str(MAX_RECEIVE)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    banner = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Ctrl-C stops everything" in line:  # the banner's last line
                break
        out = "".join(banner)
        assert "Ctrl-C stops everything" in out, out[-3000:]
        yield certs, port, plain, out
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def mtls_client(certs, port, **kw) -> Client:
    return Client(f"localhost:{port}", api_key=KEY, ca=str(certs.ca), client_cert=str(certs.client_cert),
                  client_key=str(certs.client_key), **kw)


def test_banner_says_what_is_served_how(served):
    _, port, plain, out = served
    assert f"gRPC over TLS on port {port}" in out and "client certificates required (mutual TLS)" in out
    assert f"plaintext gRPC for this machine only: localhost:{plain}" in out
    assert "secure=True, ca='ca.pem', client_cert=" in out


def test_sdk_with_the_ca_and_a_client_certificate_talks(served):
    certs, port, _, _ = served
    progress = []
    with mtls_client(certs, port, timeout=60, stream_timeout=120) as c:
        with c.create_session(TEXT[:300], ttl="10m", progress=lambda d, t: progress.append((d, t))) as s:
            assert s.size_tokens > 0 and progress and progress[-1][0] == progress[-1][1]
            g = s.generate("Ring attention", max_tokens=4)
            deltas = list(g)  # streamed over TLS
            assert g.usage.generated_tokens == 4 and "".join(deltas) == g.text()
        assert c.status().groups[0].healthy

    async def aio():
        async with AsyncClient(f"localhost:{port}", api_key=KEY, ca=str(certs.ca), client_cert=str(certs.client_cert),
                               client_key=str(certs.client_key), timeout=60) as c:
            return len((await c.status()).groups)
    assert asyncio.run(aio()) == 1


def test_plaintext_and_wrong_certificates_are_refused(served):
    certs, port, _, _ = served
    refused = [dict(), dict(ca=str(certs.ca)),
               dict(ca=str(certs.ca), client_cert=str(certs.stranger_cert), client_key=str(certs.stranger_key))]
    for kw in refused:  # plaintext, TLS without a client certificate, a certificate from another CA
        with Client(f"localhost:{port}", api_key=KEY, timeout=5, retries=0, **kw) as c:
            with pytest.raises(Unavailable):
                c.status()


def test_plaintext_port_serves_this_machine_and_the_cli_speaks_tls(served):
    certs, port, plain, _ = served
    with Client(f"localhost:{plain}", api_key=KEY, timeout=30) as c:
        assert len(c.status().groups) == 1
    r = subprocess.run([sys.executable, "-m", "ringserve.cluster.cli", "status", "--address", f"localhost:{port}",
                        "--api-key", KEY, "--ca", str(certs.ca), "--client-cert", str(certs.client_cert),
                        "--client-key", str(certs.client_key)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "group-0" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "ringserve.cluster.cli", "status", "--address", f"localhost:{port}",
                        "--api-key", KEY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "UNAVAILABLE" in r.stderr, r.stderr


def test_oversized_messages_are_refused_by_the_proxy_on_both_ports(served):
    certs, port, plain, _ = served
    big = "x" * (MAX_RECEIVE + 1024)
    for client in (mtls_client(certs, port, timeout=30, retries=0), Client(f"localhost:{plain}", api_key=KEY,
                                                                           timeout=30, retries=0)):
        with client as c:
            with pytest.raises(ResourceExhausted, match="larger than max"):
                c.create_session(big, ttl="1m")
            assert len(c.status().groups) == 1  # and the service goes on
