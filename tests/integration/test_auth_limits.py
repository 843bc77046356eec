"""Limits, each refused with a clear error naming the field: every id a request addresses
is checked against its character set, and every list refuses a negative page size."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from support.admin import field_violations
from support.auth import all_methods, method_named, method_path, request_of

BAD = "bad id\n!"

# Request fields that address something by id (top level).
ID_FIELDS = {
    "job_id",
    "run_id",
    "workflow_id",
    "trace_id",
    "step_id",
    "schema_id",
    "bundle_id",
    "artifact_ptr",
    "resource",
    "scope_id",
    "memory_id",
    "org_id",
    "tenant_id",
    "tenant",
    "id",
}

# (method, field) -> the other fields the call needs to reach the check of `field`.
CONTEXT: dict[tuple[str, str], dict[str, Any]] = {
    ("/cordum.v1.ConfigService/SetConfig", "scope_id"): {"scope": "team", "data": {}},
    ("/cordum.v1.ConfigService/GetConfig", "scope_id"): {"scope": "team"},
    ("/cordum.v1.RunService/ApproveStep", "run_id"): {"step_id": "ok"},
    ("/cordum.v1.RunService/RejectStep", "run_id"): {"step_id": "ok"},
    ("/cordum.v1.RunService/ApproveStep", "workflow_id"): {"run_id": "ok", "step_id": "ok"},
    ("/cordum.v1.RunService/RejectStep", "workflow_id"): {"run_id": "ok", "step_id": "ok"},
    ("/cordum.v1.RunService/CancelRun", "workflow_id"): {"run_id": "ok"},
    ("/cordum.v1.RunService/CancelRun", "run_id"): {},
    **{
        (f"/cordum.v1.PolicyService/{m}", f): {"topic": "job.t.x"}
        for m in ("EvaluatePolicy", "SimulatePolicy", "ExplainPolicy")
        for f in ("tenant", "org_id", "workflow_id", "step_id", "team_id")
    },
    **{
        ("/cordum.v1.JobService/SubmitJob", f): {"prompt": "x", "topic": "job.t.x"}
        for f in ("job_id", "trace_id", "tenant_id", "org_id", "memory_id")
    },
    ("/cordum.v1.SchemaService/ValidateDocument", "schema_id"): {"document": {}},
}

# Id-like fields that address nothing (the policy is asked about a job that may not exist).
EXEMPT: dict[tuple[str, str], str] = {
    **{
        (f"/cordum.v1.PolicyService/{m}", f): "describes the job asked about; addresses nothing"
        for m in ("EvaluatePolicy", "SimulatePolicy", "ExplainPolicy")
        for f in ("job_id", "memory_id")
    },
}


def id_calls() -> list[tuple[str, str]]:
    out = []
    for method in all_methods():
        if method.client_streaming or method.containing_service.full_name.startswith(
            "cordum.agent"
        ):
            continue
        for field in method.input_type.fields:
            if (
                field.name in ID_FIELDS
                and field.type == FieldDescriptor.TYPE_STRING
                and not field.is_repeated
            ):
                out.append((method_path(method), field.name))
    return out


async def _call(
    channel: grpc.aio.Channel, path: str, body: dict[str, Any]
) -> grpc.aio.AioRpcError | None:
    method = method_named(path)
    request = request_of(method, body)
    out = message_factory.GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": out.FromString,
    }
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, **kwargs)(request, timeout=10)
            try:
                await stream.read()
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(path, **kwargs)(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error
    return None


@pytest.mark.parametrize(("path", "field"), id_calls())
async def test_a_bad_id_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, path: str, field: str
) -> None:
    if (path, field) in EXEMPT:
        pytest.skip(EXEMPT[(path, field)])
    error = await _call(channel, path, {**CONTEXT.get((path, field), {}), field: BAD})
    assert error is not None, f"{path} accepted {field}={BAD!r}"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    violations = field_violations(error)
    assert any(
        v == field or v.endswith(f".{field}") or v.startswith(f"{field}") for v in violations
    ), (violations, error.details())


def list_calls() -> list[str]:
    return [
        method_path(m)
        for m in all_methods()
        if "page_size" in m.input_type.fields_by_name and not m.client_streaming
    ]


def test_every_list_rpc_is_covered() -> None:
    assert len(list_calls()) >= 12


@pytest.mark.parametrize("path", list_calls())
async def test_page_sizes_are_bounded(channel: grpc.aio.Channel, path: str) -> None:
    """A negative page size is refused naming the field; a huge one is cut to the list's
    maximum rather than refused (upstream's clients ask for big pages)."""
    context = {"job_id": "nope"} if path.endswith("ListJobDecisions") else {}
    context |= {"run_id": "nope"} if path.endswith("GetRunTimeline") else {}
    error = await _call(channel, path, {**context, "page_size": -1})
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, path
    assert "page_size" in field_violations(error), (path, error.details())
    huge = await _call(channel, path, {**context, "page_size": 1_000_000})
    assert huge is None or huge.code() == grpc.StatusCode.NOT_FOUND, (path, huge.details())
