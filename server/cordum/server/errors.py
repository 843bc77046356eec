"""Domain errors and their gRPC form.

Services raise `CordumError` (never grpc types); the gRPC layer turns it into a
google.rpc.Status with one ErrorInfo (domain `cordum.io`, reason from the ErrorReason
enum) and, for bad input, a BadRequest listing every offending field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cordum.v1 import error_reason_pb2

ERROR_DOMAIN = "cordum.io"
Reason = error_reason_pb2.ErrorReason.ValueType


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class CordumError(Exception):
    code: grpc.StatusCode
    reason: Reason
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    @property
    def reason_name(self) -> str:
        return error_reason_pb2.ErrorReason.Name(self.reason).removeprefix("ERROR_REASON_")

    def to_status_proto(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason_name, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        details = [_pack(info)]
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        return status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=details
        )


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}
assert _CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] == code_pb2.INVALID_ARGUMENT


def invalid(violations: Iterable[FieldViolation], message: str = "") -> CordumError:
    items = list(violations)
    text = message or "; ".join(f"{v.field}: {v.description}" for v in items)
    return CordumError(
        grpc.StatusCode.INVALID_ARGUMENT,
        error_reason_pb2.ERROR_REASON_INVALID_ARGUMENT,
        text or "invalid argument",
        items,
    )


def invalid_field(name: str, description: str) -> CordumError:
    return invalid([FieldViolation(name, description)])


def not_found(reason: Reason, message: str) -> CordumError:
    return CordumError(grpc.StatusCode.NOT_FOUND, reason, message)


def failed_precondition(reason: Reason, message: str) -> CordumError:
    return CordumError(grpc.StatusCode.FAILED_PRECONDITION, reason, message)


def permission_denied(message: str, field_name: str = "") -> CordumError:
    violations = [FieldViolation(field_name, message)] if field_name else []
    return CordumError(
        grpc.StatusCode.PERMISSION_DENIED,
        error_reason_pb2.ERROR_REASON_PERMISSION_DENIED,
        f"{field_name}: {message}" if field_name else message,
        violations,
    )


def unauthenticated(message: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.UNAUTHENTICATED, error_reason_pb2.ERROR_REASON_UNAUTHENTICATED, message
    )


def unavailable(message: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.UNAVAILABLE, error_reason_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE, message
    )


def not_implemented(message: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.UNIMPLEMENTED, error_reason_pb2.ERROR_REASON_NOT_IMPLEMENTED, message
    )


class Violations:
    """Collects every problem of a request before failing, so the caller sees all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid(self.items)
