"""ConfigService over gRPC: proto in, ConfigService call, proto out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.api.metadata import caller
from cordum.server.jsonvalue import from_struct, to_struct
from cordum.server.services.config_service import ConfigService
from cordum.server.stores.config import StoredConfig
from cordum.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc

Ctx = grpc.aio.ServicerContext


def document_proto(doc: StoredConfig) -> config_pb2.ConfigDocument:
    out = config_pb2.ConfigDocument(
        scope=doc.scope,
        scope_id=doc.scope_id,
        data=to_struct(doc.data),
        revision=doc.revision,
        meta=doc.meta,
        updated_by=doc.updated_by,
    )
    if doc.updated_at:
        stamp = Timestamp()
        stamp.FromJsonString(doc.updated_at)
        out.updated_at.CopyFrom(stamp)
    return out


class ConfigServicer(config_service_pb2_grpc.ConfigServiceServicer):
    def __init__(self, service: ConfigService) -> None:
        self._config = service

    async def GetConfig(
        self, request: config_service_pb2.GetConfigRequest, context: Ctx
    ) -> config_pb2.ConfigDocument:
        doc = await self._config.get(request.scope, request.scope_id, caller(context))
        return document_proto(doc)

    async def SetConfig(
        self, request: config_service_pb2.SetConfigRequest, context: Ctx
    ) -> config_pb2.ConfigDocument:
        doc = await self._config.set(
            request.scope,
            request.scope_id,
            from_struct(request.data) if request.HasField("data") else None,
            dict(request.meta),
            caller(context),
            expected_revision=(
                request.expected_revision if request.HasField("expected_revision") else None
            ),
        )
        return document_proto(doc)

    async def GetEffectiveConfig(
        self, request: config_service_pb2.GetEffectiveConfigRequest, context: Ctx
    ) -> config_pb2.EffectiveConfig:
        effective = await self._config.effective(
            request.org_id,
            request.team_id,
            request.workflow_id,
            request.step_id,
            caller(context),
        )
        return config_pb2.EffectiveConfig(
            version=effective.version, hash=effective.hash, data=to_struct(effective.data)
        )

    async def ReloadConfig(
        self, request: config_service_pb2.ReloadConfigRequest, context: Ctx
    ) -> config_service_pb2.ReloadConfigResponse:
        reloaded = await self._config.reload(caller(context))
        return config_service_pb2.ReloadConfigResponse(
            files=reloaded.files, document=document_proto(reloaded.document)
        )
