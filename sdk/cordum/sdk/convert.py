"""Python values to and from the API's messages: JSON documents (``google.protobuf.Value``
and ``Struct``), timestamps, job states, run and step statuses."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from cordum.v1 import job_pb2, job_service_pb2, run_pb2

__all__ = [
    "TERMINAL_RUN_STATUSES",
    "TERMINAL_STATES",
    "TERMINAL_STEP_STATUSES",
    "from_struct",
    "from_value",
    "is_run_terminal",
    "is_terminal",
    "optional_struct",
    "optional_value",
    "run_status_name",
    "state_name",
    "step_status_name",
    "to_struct",
    "to_timestamp",
    "to_value",
]

# Integral doubles beyond this cannot have been exact JSON integers, so they stay floats.
_MAX_SAFE_INT = 2**53

TERMINAL_STATES: frozenset[int] = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
        job_pb2.JOB_STATE_TIMEOUT,
        job_pb2.JOB_STATE_DENIED,
    }
)


TERMINAL_RUN_STATUSES: frozenset[int] = frozenset(
    {
        run_pb2.RUN_STATUS_SUCCEEDED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CANCELLED,
        run_pb2.RUN_STATUS_TIMED_OUT,
    }
)

TERMINAL_STEP_STATUSES: frozenset[int] = frozenset(
    {
        run_pb2.STEP_STATUS_SUCCEEDED,
        run_pb2.STEP_STATUS_FAILED,
        run_pb2.STEP_STATUS_CANCELLED,
        run_pb2.STEP_STATUS_TIMED_OUT,
        run_pb2.STEP_STATUS_SKIPPED,
    }
)


def is_terminal(state: int) -> bool:
    return state in TERMINAL_STATES


def is_run_terminal(status: int) -> bool:
    return status in TERMINAL_RUN_STATUSES


def state_name(state: int) -> str:
    """``JOB_STATE_RUNNING`` → ``RUNNING``."""
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def run_status_name(status: int) -> str:
    """``RUN_STATUS_WAITING`` → ``WAITING``."""
    return run_pb2.RunStatus.Name(status).removeprefix("RUN_STATUS_")  # type: ignore[arg-type]


def step_status_name(status: int) -> str:
    """``STEP_STATUS_SKIPPED`` → ``SKIPPED``."""
    return run_pb2.StepStatus.Name(status).removeprefix("STEP_STATUS_")  # type: ignore[arg-type]


def to_value(data: Any) -> struct_pb2.Value:
    """Any JSON-able Python value as a ``google.protobuf.Value``."""
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as plain Python. JSON has one number type and ``Value``
    stores it as a double, so integral numbers come back as ``int``: a worker's ``{"n": 1}``
    reads back as ``{"n": 1}``, not ``{"n": 1.0}``."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "struct_value":
        return {k: from_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    return getattr(value, kind)


def optional_value(message: Message, field: str) -> Any:
    """The decoded ``Value`` field, or ``None`` when it is absent."""
    return from_value(getattr(message, field)) if message.HasField(field) else None


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object (a mapping with string keys) as a ``google.protobuf.Struct``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a JSON object (a mapping), got {type(data).__name__}")
    struct = struct_pb2.Struct()
    json_format.ParseDict(data, struct)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as a plain ``dict`` (whole numbers as ``int``)."""
    return {k: from_value(v) for k, v in struct.fields.items()}


def optional_struct(message: Message, field: str) -> dict[str, Any] | None:
    """The decoded ``Struct`` field, or ``None`` when it is absent."""
    return from_struct(getattr(message, field)) if message.HasField(field) else None


def to_timestamp(when: datetime.datetime | timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    if isinstance(when, timestamp_pb2.Timestamp):
        return when
    if when.tzinfo is None:
        raise ValueError("naive datetime: pass an aware datetime (e.g. tz=datetime.UTC)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


# SubmitJobRequest fields that hold JSON (``google.protobuf.Value``) rather than scalars.
_JSON_FIELDS = ("input", "context")


def submit_request(fields: Mapping[str, Any]) -> job_service_pb2.SubmitJobRequest:
    """A ``SubmitJobRequest`` from keyword-style fields; ``None`` means "not set", and the
    JSON fields (``input``, ``context``) take any JSON-able value."""
    kwargs: dict[str, Any] = {}
    for name, raw in fields.items():
        if raw is None:
            continue
        kwargs[name] = to_value(raw) if name in _JSON_FIELDS else raw
    return job_service_pb2.SubmitJobRequest(**kwargs)


def as_submit_request(
    item: job_service_pb2.SubmitJobRequest | Mapping[str, Any],
) -> job_service_pb2.SubmitJobRequest:
    if isinstance(item, job_service_pb2.SubmitJobRequest):
        return item
    return submit_request(item)
