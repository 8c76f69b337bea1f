"""ringserve.client: the Python SDK for a ringserve cluster (needs only grpcio and protobuf).

::

    from ringserve.client import Client

    client = Client("localhost:50051", api_key=KEY)
    with client.create_session(open("codebase.txt").read(), ttl="2h", progress=True) as s:
        for delta in s.generate("Where is the retry logic, and what bounds it?"):
            print(delta, end="", flush=True)
        s.extend(ttl="6h")
        print(s.refresh().cost_accrued, s.tier)
    # leaving the block deletes the session and stops its meter

Over TLS (the server's ``--tls-cert``): ``Client("rs.example.com:50051", api_key=KEY, secure=True,
ca="ca.pem")``; add ``client_cert=`` / ``client_key=`` where the server asks for client certificates.

Every failed call raises a :mod:`ringserve.client.errors` subclass of :class:`RingServeError`;
only UNAVAILABLE is retried (with backoff, inside the call's deadline). ``AsyncClient`` offers
the same calls on asyncio.
"""

from . import errors
from .aio import AsyncClient, AsyncGeneration, AsyncSession
from .client import Client
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RingServeError,
    Unauthenticated,
    Unavailable,
    Unknown,
    from_rpc_error,
)
from .session import Generation, Session, Usage

__all__ = [
    "Client",
    "AsyncClient",
    "Session",
    "AsyncSession",
    "Generation",
    "AsyncGeneration",
    "Usage",
    "errors",
] + errors.__all__  # the error classes, re-exported
