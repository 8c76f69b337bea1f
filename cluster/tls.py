"""TLS for the gRPC API, terminated by Serve's own gRPC proxy.

Ray Serve 2.60's `gRPCOptions` has no TLS setting: its proxy builds a `grpc.aio` server and opens one
plaintext port. It does call every entry of `grpc_servicer_functions` with that server before
starting it (that is how servicers get registered), so ringserve lists `add_tls_port` there: it adds
a TLS port to the same server. TLS then ends inside the proxy, with nothing in between — metadata,
status codes, streaming, deadlines and cancellation behave as on the plaintext port.

    Serve's gRPC proxy (every Ray node)
      [::]:grpc_port      plaintext   (Ray binds every interface; keep it inside: loopback, the pod, a NetworkPolicy)
      [::]:tls.port       TLS / mTLS  (what clients reach)

The proxy is a Ray actor, so it learns the TLS settings from its environment: `serve_app.start` gives
them to the Serve controller (`controller_options` runtime_env env_vars, which the proxies inherit);
on Kubernetes the chart sets them on the head pod:

    RINGSERVE_TLS_PORT, RINGSERVE_TLS_CERT, RINGSERVE_TLS_KEY, RINGSERVE_TLS_CLIENT_CA (optional: mTLS)

Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS, part of RAY_SERVE_THROUGHPUT_OPTIMIZED) would
also call the hook for each replica's own gRPC server, which would then try to take the TLS port:
ringserve leaves it off.

`proxy_env(cfg)` writes them, `from_env()` is the one place that reads them. Certificates are read
again when their files change (checked on each new connection), so a renewed certificate — a
Kubernetes Secret updated by cert-manager — is served without a restart.

As Ray binds the plaintext port on every interface, the gRPC adapter asks `transport_refusal` on
each call: with TLS configured (or `plaintext_peers: loopback`), a plaintext call from another host
is refused with PERMISSION_DENIED and a message naming the TLS port.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Mapping
from urllib.parse import unquote

from .config import ServeConfig, TlsConfig

ENV_PORT = "RINGSERVE_TLS_PORT"
ENV_CERT = "RINGSERVE_TLS_CERT"
ENV_KEY = "RINGSERVE_TLS_KEY"
ENV_CLIENT_CA = "RINGSERVE_TLS_CLIENT_CA"
# Serve's proxy reads its gRPC max send / receive message size from this variable when it starts
ENV_MAX_MESSAGE = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"

HOOK = "ringserve.cluster.tls.add_tls_port"  # a grpc_servicer_functions entry

log = logging.getLogger("ringserve.tls")


def proxy_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment Serve's gRPC proxy needs: its max message size and, when configured, TLS."""
    env = {ENV_MAX_MESSAGE: str(cfg.max_receive_bytes)}
    if cfg.tls is not None:
        env.update({ENV_PORT: str(cfg.tls.port), ENV_CERT: cfg.tls.cert_file, ENV_KEY: cfg.tls.key_file})
        if cfg.tls.client_ca_file:
            env[ENV_CLIENT_CA] = cfg.tls.client_ca_file
    return env


def from_env(environ: Mapping[str, str] = os.environ) -> TlsConfig | None:
    """The TLS settings of this Ray node (None: no TLS listener here)."""
    if not environ.get(ENV_CERT):
        return None
    missing = [k for k in (ENV_KEY, ENV_PORT) if not environ.get(k)]
    if missing:
        raise ValueError(f"{ENV_CERT} is set but {', '.join(missing)} is not: set all of {ENV_PORT}, {ENV_CERT}, "
                         f"{ENV_KEY} (and {ENV_CLIENT_CA} for client certificates)")
    return TlsConfig(cert_file=environ[ENV_CERT], key_file=environ[ENV_KEY],
                     client_ca_file=environ.get(ENV_CLIENT_CA) or None, port=int(environ[ENV_PORT]))


def check_files(tls: TlsConfig) -> None:
    """Fail early, naming the file, when the certificate, key or client CA cannot serve: unreadable,
    not PEM, or a key that does not belong to the certificate (checked with Python's ssl module)."""
    for what, path in (("certificate", tls.cert_file), ("private key", tls.key_file),
                       ("client CA bundle", tls.client_ca_file)):
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"TLS {what} {path}: {e.strerror}") from e
        if b"-----BEGIN " not in data:
            raise ValueError(f"TLS {what} {path} is not PEM (expected '-----BEGIN ...')")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as e:
        raise ValueError(f"TLS certificate {tls.cert_file} and key {tls.key_file} do not load together "
                         f"(a key of another certificate, or a password-protected key?): {e}") from e
    if tls.client_ca_file:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as e:
            raise ValueError(f"TLS client CA bundle {tls.client_ca_file} does not load: {e}") from e


class _ReloadingCertificates:
    """Certificate configuration for `grpc.dynamic_ssl_server_credentials`: gRPC calls it before each
    new connection's handshake; it re-reads the files when one of them changed (size or mtime, which a
    Secret volume's atomic symlink swap changes too) and otherwise returns None (keep the current one)."""

    def __init__(self, tls: TlsConfig):
        self.tls = tls
        self._lock = threading.Lock()
        self._stamp = None
        self.initial = self._load()

    def _files(self) -> list[str]:
        return [p for p in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if p]

    def _stat(self):
        out = []
        for p in self._files():
            s = os.stat(p)
            out.append((s.st_mtime_ns, s.st_size, s.st_ino))
        return tuple(out)

    def _load(self):
        import grpc

        stamp = self._stat()
        data = {}
        for p in self._files():
            with open(p, "rb") as f:
                data[p] = f.read()
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration(
            [(data[self.tls.key_file], data[self.tls.cert_file])],
            root_certificates=data[self.tls.client_ca_file] if self.tls.client_ca_file else None)

    def __call__(self):
        try:
            with self._lock:
                if self._stat() == self._stamp:
                    return None
                check_files(self.tls)  # a half-written renewal is not served: keep the old one
                config = self._load()
            log.info("TLS: serving the renewed certificate from %s", self.tls.cert_file)
            return config
        except Exception as e:  # keep serving the certificate we have
            log.warning("TLS: could not reload %s (%s); serving the previous certificate", self.tls.cert_file, e)
            return None


def server_credentials(tls: TlsConfig):
    """grpc.ServerCredentials for `tls`: the server's certificate, reloaded when its files change, and,
    with a client CA, client certificates required and verified against it (mTLS)."""
    import grpc

    certs = _ReloadingCertificates(tls)
    return grpc.dynamic_ssl_server_credentials(certs.initial, certs,
                                               require_client_authentication=bool(tls.client_ca_file))


def add_tls_port(_servicer, server) -> None:
    """Listed in Serve's `grpc_servicer_functions`: Serve calls it with its proxy's gRPC server before
    starting it. Adds the TLS listener this node's environment asks for (none when RINGSERVE_TLS_CERT
    is unset). Raises when the files are unusable, so a misconfigured node fails instead of serving
    without TLS."""
    tls = from_env()
    if tls is None:
        return
    if not hasattr(server, "add_secure_port"):
        raise TypeError(f"Serve passed {type(server).__name__} to its servicer functions, not a gRPC server: "
                        "this Ray version needs another way to add TLS (see cluster/tls.py)")
    check_files(tls)
    port = server.add_secure_port(f"[::]:{tls.port}", server_credentials(tls))
    if port == 0:
        raise RuntimeError(f"TLS port {tls.port} could not be bound (in use?)")
    log.info("TLS: gRPC on port %d (%s)", tls.port, "client certificates required" if tls.client_ca_file else
             "server certificate only")


def transport_refusal(cfg: ServeConfig, context) -> str | None:
    """Why this call may not go on over the transport it came by, or None when it may. `context` is
    the call's gRPC servicer context (Serve's RayServegRPCContext carries the proxy's `auth_context()`
    and `peer()`). TLS calls always may; plaintext ones from this host (loopback: the machine itself,
    `kubectl port-forward` into the pod) always may; plaintext from other hosts only without TLS
    configured and with `plaintext_peers: any`. The gRPC adapter answers PERMISSION_DENIED with it."""
    if is_tls(context) or is_loopback(context.peer()):
        return None
    if cfg.tls is not None:
        return f"plaintext gRPC is for this host only: connect with TLS on port {cfg.tls.port}"
    if cfg.plaintext_peers == "loopback":
        return ("plaintext gRPC is for this host only: the server must be started with TLS (ringserve serve "
                "--tls-cert, --tls-key) to serve other machines")
    return None


def is_tls(context) -> bool:
    """Whether the call came over TLS (gRPC's auth context names the transport's security)."""
    try:
        security = (context.auth_context() or {}).get("transport_security_type") or []
    except Exception:
        return False
    return any((v.decode() if isinstance(v, bytes) else v) == "ssl" for v in security)


def is_loopback(peer: str | None) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5432", "ipv6:%5B::1%5D:5432", "unix:/path") is
    this host. Anything unparsable is not."""
    if not peer:
        return False
    scheme, _, rest = peer.partition(":")
    if scheme == "unix":
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = unquote(rest).rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
