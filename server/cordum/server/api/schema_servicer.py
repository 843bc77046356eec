"""SchemaService over gRPC: proto in, SchemaService call, proto out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.errors import invalid_field
from cordum.server.jsonvalue import from_struct, from_value, to_struct
from cordum.server.services.schemas import SchemaService
from cordum.server.stores.schemas import StoredSchema
from cordum.v1 import schema_pb2, schema_service_pb2, schema_service_pb2_grpc

Ctx = grpc.aio.ServicerContext


def _ms(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def schema_proto(stored: StoredSchema) -> schema_pb2.Schema:
    return schema_pb2.Schema(
        id=stored.id,
        schema=to_struct(stored.schema),
        sha256=stored.sha256,
        created_at=_ms(stored.created_ms) if stored.created_ms else None,
        updated_at=_ms(stored.updated_ms) if stored.updated_ms else None,
    )


class SchemaServicer(schema_service_pb2_grpc.SchemaServiceServicer):
    def __init__(self, service: SchemaService) -> None:
        self._schemas = service

    async def RegisterSchema(
        self, request: schema_service_pb2.RegisterSchemaRequest, context: Ctx
    ) -> schema_pb2.Schema:
        schema = from_struct(request.schema) if request.HasField("schema") else None
        return schema_proto(await self._schemas.register(request.id, schema))

    async def GetSchema(
        self, request: schema_service_pb2.GetSchemaRequest, context: Ctx
    ) -> schema_pb2.Schema:
        return schema_proto(await self._schemas.get(request.schema_id))

    async def ListSchemas(
        self, request: schema_service_pb2.ListSchemasRequest, context: Ctx
    ) -> schema_service_pb2.ListSchemasResponse:
        page = await self._schemas.list(request.page_size, request.page_token)
        return schema_service_pb2.ListSchemasResponse(
            schemas=[schema_proto(s) for s in page.schemas], next_page_token=page.next_token
        )

    async def DeleteSchema(
        self, request: schema_service_pb2.DeleteSchemaRequest, context: Ctx
    ) -> schema_service_pb2.DeleteSchemaResponse:
        await self._schemas.delete(request.schema_id)
        return schema_service_pb2.DeleteSchemaResponse()

    async def ValidateDocument(
        self, request: schema_service_pb2.ValidateDocumentRequest, context: Ctx
    ) -> schema_service_pb2.ValidateDocumentResponse:
        if not request.HasField("document"):
            raise invalid_field("document", "required (any JSON value)")
        violations = await self._schemas.validate(request.schema_id, from_value(request.document))
        return schema_service_pb2.ValidateDocumentResponse(
            valid=not violations,
            violations=[
                schema_pb2.SchemaViolation(
                    pointer=v.pointer, message=v.message, schema_pointer=v.schema_pointer
                )
                for v in violations
            ],
        )
