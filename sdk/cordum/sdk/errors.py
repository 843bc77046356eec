"""Typed errors for the Cordum API.

Every error the platform returns is a ``google.rpc.Status`` with one ``ErrorInfo``
(domain ``cordum.io``, ``reason`` an ``ErrorReason`` name such as ``JOB_NOT_FOUND``) and, for
bad input, a ``BadRequest`` naming each offending field. :func:`from_grpc_error` turns a
failed call, sync or ``grpc.aio``, into the :class:`CordumError` subclass for its status
code, so callers can write ``except NotFound`` and read ``err.reason`` or
``err.field_violations`` without touching gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "Aborted",
    "AlreadyExists",
    "CordumError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WaitTimeout",
    "from_grpc_error",
    "from_status",
]

ERROR_DOMAIN = "cordum.io"


class CordumError(Exception):
    """A failed Cordum API call.

    ``reason`` is the ``ErrorInfo`` reason (``""`` when the failure did not come from the
    Cordum server, e.g. the connection was refused); ``field_violations`` maps each bad
    field to what is wrong with it.
    """

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field_violations: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field_violations: dict[str, str] = dict(field_violations or {})
        self.metadata: dict[str, str] = dict(metadata or {})
        # The full google.rpc.Status, for details this class does not surface.
        self.status = status

    def __str__(self) -> str:
        return f"{self.reason or self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, field_violations={self.field_violations!r})"
        )


class InvalidArgument(CordumError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CordumError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CordumError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CordumError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CordumError):
    """A concurrent change won: a compare-and-set (``expected_revision``) failed, or the
    resource was busy. Re-read and retry."""

    grpc_code = grpc.StatusCode.ABORTED


class Unavailable(CordumError):
    grpc_code = grpc.StatusCode.UNAVAILABLE

    @property
    def connection_failed(self) -> bool:
        """True when the server was never reached (no Cordum ErrorInfo came back); a
        server-side ``DEPENDENCY_UNAVAILABLE`` (Redis or NATS down) is False."""
        return not self.reason


class PermissionDenied(CordumError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CordumError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CordumError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(CordumError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class WaitTimeout(DeadlineExceeded):
    """A job (or a workflow run: ``kind="run"``) did not reach a terminal state within the
    caller's wait; it goes on. ``resource_id`` is its id, also as ``job_id`` or ``run_id``."""

    def __init__(self, resource_id: str, timeout: float | None, *, kind: str = "job") -> None:
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "WAIT_TIMEOUT",
            f"{kind} {resource_id} did not finish within {timeout:g}s"
            if timeout is not None
            else f"{kind} {resource_id} did not finish",
        )
        self.kind = kind
        self.resource_id = resource_id
        self.job_id = resource_id if kind == "job" else ""
        self.run_id = resource_id if kind == "run" else ""
        self.timeout = timeout


class Unimplemented(CordumError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CordumError):
    grpc_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[CordumError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _build(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> CordumError:
    reason = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                # Several problems with one field are kept, joined, rather than overwritten.
                previous = violations.get(v.field)
                violations[v.field] = f"{previous}; {v.description}" if previous else v.description
    cls = _BY_CODE.get(code, CordumError)
    return cls(code, reason, message, violations, metadata, status=status)


def from_status(status: status_pb2.Status) -> CordumError:
    """The typed error for a ``google.rpc.Status`` (as carried by a batch-submit result)."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _build(code, status.message, status)


def from_grpc_error(error: grpc.RpcError) -> CordumError:
    """The typed error for a failed call: a sync ``grpc.RpcError`` or a
    ``grpc.aio.AioRpcError`` (both expose ``code()``, ``details()`` and trailing metadata
    synchronously once the call has failed)."""
    call: Any = error
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(call, "details") else None) or str(error)
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(call) if hasattr(call, "trailing_metadata") else None
    except ValueError:
        # The rich status disagrees with the call's own code/message: trust the call.
        status = None
    return _build(code, message, status)
