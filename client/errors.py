"""Typed exceptions for every status code the ringserve API uses.

Every SDK call converts a failed RPC (``grpc.RpcError``) into a subclass of
:class:`RingServeError`, so callers catch what they mean::

    from ringserve.client import errors

    try:
        s = client.get_session("s-3f9c")
    except errors.NotFound:
        ...  # expired, deleted, or owned by another tenant

Arguments the SDK can check before sending anything (an unknown retention class, a ttl it cannot
parse) raise ``ValueError`` / ``TypeError`` instead, as Python APIs do. The meaning of each code
is documented at the top of ``proto/ringserve/v1/ringserve.proto``.
"""

from __future__ import annotations

import grpc

__all__ = [
    "RingServeError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "DataLoss",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
    "Cancelled",
    "Unknown",
    "from_rpc_error",
]


class RingServeError(Exception):
    """A ringserve call failed.

    Attributes:
        code: the ``grpc.StatusCode`` of the failure.
        message: the server's readable message (what to fix, or when to retry).
        details: the call's trailing metadata as a dict (key -> str, or bytes for ``-bin`` keys);
            this is where structured error details travel, e.g. ``grpc-status-details-bin``.
        attempts: how many times the SDK sent the call (> 1 after UNAVAILABLE retries).
    """

    #: The status code a subclass stands for; the base class covers codes without a subclass.
    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str = "", *, code: grpc.StatusCode | None = None,
                 details: dict[str, str | bytes] | None = None, attempts: int = 1):
        super().__init__(message)
        self.code = code if code is not None else self.grpc_code
        self.message = message
        self.details = dict(details or {})
        self.attempts = attempts

    def __str__(self) -> str:
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.code.name}: {self.message}{tries}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, attempts={self.attempts})"


class InvalidArgument(RingServeError):
    """Malformed request: empty text, bad sampling values, bad name, bad UTF-8. Fix the request."""
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RingServeError):
    """No such session for this tenant (never existed, deleted, or expired)."""
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RingServeError):
    """The resource already exists."""
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RingServeError):
    """The API key is valid but may not do this (e.g. ``status()`` needs an admin key)."""
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RingServeError):
    """Missing or unknown API key: pass ``api_key=`` to the client."""
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(RingServeError):
    """A tenant quota (sessions, tokens) or the cluster's KV capacity is reached; free sessions or wait."""
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RingServeError):
    """The session cannot do this in its current state; retrying unchanged will not help."""
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RingServeError):
    """The operation lost a conflict; retry the whole higher-level operation."""
    grpc_code = grpc.StatusCode.ABORTED


class DataLoss(RingServeError):
    """The session's retained KV failed its checksums and was dropped: create the session again."""
    grpc_code = grpc.StatusCode.DATA_LOSS


class Unavailable(RingServeError):
    """The server or one of its dependencies is down; the SDK already retried with backoff."""
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RingServeError):
    """The call's deadline passed: raise ``timeout`` / ``stream_timeout`` for long calls."""
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RingServeError):
    """A server bug (or a server that broke the wire contract): report it with the message."""
    grpc_code = grpc.StatusCode.INTERNAL


class Cancelled(RingServeError):
    """The call was cancelled before it finished."""
    grpc_code = grpc.StatusCode.CANCELLED


class Unknown(RingServeError):
    """The server failed without a more precise code."""
    grpc_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[RingServeError]] = {
    cls.grpc_code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                ResourceExhausted, FailedPrecondition, Aborted, DataLoss, Unavailable,
                DeadlineExceeded, Internal, Cancelled, Unknown)
}


def rpc_code(e: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed RPC (UNKNOWN for a bare ``grpc.RpcError`` that carries none)."""
    code = getattr(e, "code", None)
    return (code() if callable(code) else None) or grpc.StatusCode.UNKNOWN


def from_rpc_error(e: grpc.RpcError, *, attempts: int = 1) -> RingServeError:
    """The typed error for a sync ``grpc.RpcError`` or a ``grpc.aio.AioRpcError``.

    Codes without a dedicated subclass (e.g. UNIMPLEMENTED, OUT_OF_RANGE) give the base class,
    whose ``.code`` still says which one it was.
    """
    code = rpc_code(e)
    details = getattr(e, "details", None)
    message = (details() if callable(details) else None) or ""
    trailing = getattr(e, "trailing_metadata", None)
    metadata = {key: value for key, value in (trailing() if callable(trailing) else None) or ()}
    return _BY_CODE.get(code, RingServeError)(message, code=code, details=metadata, attempts=attempts)
