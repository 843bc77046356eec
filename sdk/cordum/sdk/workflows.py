"""``client.workflows``: workflow definitions (DAGs of steps) — save, check, read, delete.

A definition can be given as a ``cordum.v1.workflow_pb2.Workflow``, as a ``dict`` in
upstream Cordum's JSON shape (steps keyed by id), or read from a JSON or YAML file with
:func:`load_workflow`::

    wf = await client.workflows.upsert(load_workflow("examples/workflows/hello.json"))
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from google.protobuf import json_format

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import workflow_pb2, workflow_service_pb2, workflow_service_pb2_grpc

__all__ = [
    "AsyncWorkflowsClient",
    "WorkflowSource",
    "WorkflowsClient",
    "as_workflow",
    "load_workflow",
    "parse_workflow",
]

W = workflow_service_pb2
Stub = workflow_service_pb2_grpc.WorkflowServiceStub

WorkflowSource = workflow_pb2.Workflow | Mapping[str, Any] | os.PathLike[str]
"""A definition: the message, a JSON-shaped mapping, or the path of a JSON/YAML file."""


def parse_workflow(data: Mapping[str, Any], *, source: str = "workflow") -> workflow_pb2.Workflow:
    """A ``Workflow`` from a JSON-shaped mapping (proto field names, or their lowerCamel
    JSON names). Unknown fields are refused rather than dropped: a misspelt ``depends_on``
    would otherwise change what the workflow does. Raises ``ValueError`` naming ``source``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a workflow is a JSON object, not {_kind(data)}")
    try:
        return json_format.ParseDict(_plain(data), workflow_pb2.Workflow())
    except json_format.ParseError as error:
        raise ValueError(f"{source}: {error}") from error


def load_workflow(path: str | os.PathLike[str]) -> workflow_pb2.Workflow:
    """Read a definition from a ``.json`` file, or a ``.yaml``/``.yml`` one (the same
    document written as YAML; any other suffix is read as YAML, which accepts JSON too).
    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it is not a
    workflow."""
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{file}: not valid {_format(file)}: {_one_line(error)}") from error
    return parse_workflow(data, source=str(file))


def as_workflow(workflow: WorkflowSource) -> workflow_pb2.Workflow:
    if isinstance(workflow, workflow_pb2.Workflow):
        return workflow
    if isinstance(workflow, os.PathLike):
        return load_workflow(workflow)
    return parse_workflow(workflow)


def _plain(value: Any) -> Any:
    # YAML reads unquoted times (delay_until: 2030-01-01T00:00:00Z) as datetimes and allows
    # non-string keys; the proto wants RFC 3339 strings and string map keys.
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _format(file: Path) -> str:
    return "JSON" if file.suffix.lower() == ".json" else "YAML"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _list_request(org_id: str | None, size: int | None, token: str) -> W.ListWorkflowsRequest:
    return W.ListWorkflowsRequest(org_id=org_id or "", page_size=size or 0, page_token=token)


class AsyncWorkflowsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> workflow_service_pb2_grpc.WorkflowServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("workflow_service_pb2_grpc.WorkflowServiceAsyncStub", self._t.stub(Stub))

    async def upsert(self, workflow: WorkflowSource) -> workflow_pb2.Workflow:
        """Create or replace a workflow and return it as stored (``revision`` bumped). An
        invalid definition raises :class:`~cordum.sdk.errors.InvalidArgument` with every
        problem in ``field_violations``, and nothing is stored."""
        request = W.UpsertWorkflowRequest(workflow=as_workflow(workflow))
        return await self._t.unary(self._stub.UpsertWorkflow, request)

    async def validate(self, workflow: WorkflowSource) -> W.ValidateWorkflowResponse:
        """Check a definition without storing it: ``valid`` and the ``problems`` found."""
        request = W.ValidateWorkflowRequest(workflow=as_workflow(workflow))
        return await self._t.unary(self._stub.ValidateWorkflow, request)

    async def get(self, workflow_id: str) -> workflow_pb2.Workflow:
        request = W.GetWorkflowRequest(workflow_id=workflow_id)
        return await self._t.unary(self._stub.GetWorkflow, request)

    async def list_page(
        self, *, org_id: str | None = None, page_size: int | None = None, page_token: str = ""
    ) -> W.ListWorkflowsResponse:
        """One page of workflows; pass ``next_page_token`` back for the next."""
        request = _list_request(org_id, page_size, page_token)
        return await self._t.unary(self._stub.ListWorkflows, request)

    def list(
        self,
        *,
        org_id: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[workflow_pb2.Workflow]:
        """Every workflow (of ``org_id``, default the caller's tenant), fetching pages as
        the iteration needs them; stops after ``limit`` when given."""

        async def fetch(token: str, size: int | None) -> W.ListWorkflowsResponse:
            return await self.list_page(org_id=org_id, page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.workflows, page_size=page_size, limit=limit)

    async def delete(self, workflow_id: str) -> None:
        """Delete a definition. Runs already started keep the definition they started with."""
        request = W.DeleteWorkflowRequest(workflow_id=workflow_id)
        await self._t.unary(self._stub.DeleteWorkflow, request)


class WorkflowsClient:
    """The blocking twin of :class:`AsyncWorkflowsClient`; same methods, same results."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def upsert(self, workflow: WorkflowSource) -> workflow_pb2.Workflow:
        request = W.UpsertWorkflowRequest(workflow=as_workflow(workflow))
        return self._t.unary(self._stub.UpsertWorkflow, request)

    def validate(self, workflow: WorkflowSource) -> W.ValidateWorkflowResponse:
        request = W.ValidateWorkflowRequest(workflow=as_workflow(workflow))
        return self._t.unary(self._stub.ValidateWorkflow, request)

    def get(self, workflow_id: str) -> workflow_pb2.Workflow:
        return self._t.unary(self._stub.GetWorkflow, W.GetWorkflowRequest(workflow_id=workflow_id))

    def list_page(
        self, *, org_id: str | None = None, page_size: int | None = None, page_token: str = ""
    ) -> W.ListWorkflowsResponse:
        request = _list_request(org_id, page_size, page_token)
        return self._t.unary(self._stub.ListWorkflows, request)

    def list(
        self,
        *,
        org_id: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[workflow_pb2.Workflow]:
        def fetch(token: str, size: int | None) -> W.ListWorkflowsResponse:
            return self.list_page(org_id=org_id, page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.workflows, page_size=page_size, limit=limit)

    def delete(self, workflow_id: str) -> None:
        self._t.unary(self._stub.DeleteWorkflow, W.DeleteWorkflowRequest(workflow_id=workflow_id))
