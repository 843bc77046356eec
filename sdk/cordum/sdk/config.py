"""``client.config``: scoped configuration (system → org → team → workflow → step).

Documents are JSON objects, passed in as ``dict`` and returned in the API's messages
(``ConfigDocument.data`` is a ``Struct``: read it with :func:`cordum.sdk.convert.from_struct`)::

    doc = await client.config.get("org", "acme")
    await client.config.set("org", "acme", {"budget": 10}, expected_revision=doc.revision)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import to_struct
from cordum.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc

__all__ = ["AsyncConfigClient", "ConfigClient"]

C = config_service_pb2
Stub = config_service_pb2_grpc.ConfigServiceStub


def _set_request(
    scope: str,
    scope_id: str,
    data: Mapping[str, Any],
    meta: Mapping[str, str] | None,
    expected_revision: int | None,
) -> C.SetConfigRequest:
    request = C.SetConfigRequest(
        scope=scope, scope_id=scope_id, data=to_struct(data), meta=dict(meta or {})
    )
    if expected_revision is not None:
        request.expected_revision = expected_revision
    return request


def _effective_request(
    org_id: str | None, team_id: str | None, workflow_id: str | None, step_id: str | None
) -> C.GetEffectiveConfigRequest:
    return C.GetEffectiveConfigRequest(
        org_id=org_id or "",
        team_id=team_id or "",
        workflow_id=workflow_id or "",
        step_id=step_id or "",
    )


class AsyncConfigClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> config_service_pb2_grpc.ConfigServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("config_service_pb2_grpc.ConfigServiceAsyncStub", self._t.stub(Stub))

    async def get(self, scope: str = "", scope_id: str = "") -> config_pb2.ConfigDocument:
        """The document at one scope (default: ``system``/``default``)."""
        request = C.GetConfigRequest(scope=scope, scope_id=scope_id)
        return await self._t.unary(self._stub.GetConfig, request)

    async def set(
        self,
        scope: str,
        scope_id: str,
        data: Mapping[str, Any],
        *,
        meta: Mapping[str, str] | None = None,
        expected_revision: int | None = None,
    ) -> config_pb2.ConfigDocument:
        """Replace the document at one scope. With ``expected_revision`` the write is a
        compare-and-set: :class:`~cordum.sdk.errors.Aborted` when someone wrote first."""
        request = _set_request(scope, scope_id, data, meta, expected_revision)
        return await self._t.unary(self._stub.SetConfig, request)

    async def effective(
        self,
        *,
        org_id: str | None = None,
        team_id: str | None = None,
        workflow_id: str | None = None,
        step_id: str | None = None,
    ) -> config_pb2.EffectiveConfig:
        """Every scope that applies merged, system first, with its version and hash."""
        request = _effective_request(org_id, team_id, workflow_id, step_id)
        return await self._t.unary(self._stub.GetEffectiveConfig, request)

    async def reload(self) -> C.ReloadConfigResponse:
        """Have the server load its ``config/*.yaml`` defaults into the system scope now."""
        return await self._t.unary(self._stub.ReloadConfig, C.ReloadConfigRequest())


class ConfigClient:
    """The blocking twin of :class:`AsyncConfigClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def get(self, scope: str = "", scope_id: str = "") -> config_pb2.ConfigDocument:
        request = C.GetConfigRequest(scope=scope, scope_id=scope_id)
        return self._t.unary(self._stub.GetConfig, request)

    def set(
        self,
        scope: str,
        scope_id: str,
        data: Mapping[str, Any],
        *,
        meta: Mapping[str, str] | None = None,
        expected_revision: int | None = None,
    ) -> config_pb2.ConfigDocument:
        request = _set_request(scope, scope_id, data, meta, expected_revision)
        return self._t.unary(self._stub.SetConfig, request)

    def effective(
        self,
        *,
        org_id: str | None = None,
        team_id: str | None = None,
        workflow_id: str | None = None,
        step_id: str | None = None,
    ) -> config_pb2.EffectiveConfig:
        request = _effective_request(org_id, team_id, workflow_id, step_id)
        return self._t.unary(self._stub.GetEffectiveConfig, request)

    def reload(self) -> C.ReloadConfigResponse:
        return self._t.unary(self._stub.ReloadConfig, C.ReloadConfigRequest())
