"""``client.schemas``: the JSON Schema registry (draft 2020-12) that workflow steps and
jobs are validated against::

    await client.schemas.register("order/v1", {"type": "object", "required": ["id"]})
    check = await client.schemas.validate("order/v1", {"name": "x"})
    [(v.pointer, v.message) for v in check.violations]   # [("", "'id' is a required ...")]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, cast

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import to_struct, to_value
from cordum.v1 import schema_pb2, schema_service_pb2, schema_service_pb2_grpc

__all__ = ["AsyncSchemasClient", "SchemasClient"]

S = schema_service_pb2
Stub = schema_service_pb2_grpc.SchemaServiceStub


def _register_request(schema_id: str, schema: Mapping[str, Any]) -> S.RegisterSchemaRequest:
    return S.RegisterSchemaRequest(id=schema_id, schema=to_struct(schema))


def _validate_request(schema_id: str, document: Any) -> S.ValidateDocumentRequest:
    return S.ValidateDocumentRequest(schema_id=schema_id, document=to_value(document))


class AsyncSchemasClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> schema_service_pb2_grpc.SchemaServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("schema_service_pb2_grpc.SchemaServiceAsyncStub", self._t.stub(Stub))

    async def register(self, schema_id: str, schema: Mapping[str, Any]) -> schema_pb2.Schema:
        """Register (or replace) a schema; it must itself be a valid draft 2020-12 schema."""
        request = _register_request(schema_id, schema)
        return await self._t.unary(self._stub.RegisterSchema, request)

    async def get(self, schema_id: str) -> schema_pb2.Schema:
        return await self._t.unary(self._stub.GetSchema, S.GetSchemaRequest(schema_id=schema_id))

    async def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> S.ListSchemasResponse:
        request = S.ListSchemasRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListSchemas, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[schema_pb2.Schema]:
        """Every registered schema, fetching pages as the iteration needs them."""

        async def fetch(token: str, size: int | None) -> S.ListSchemasResponse:
            return await self.list_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.schemas, page_size=page_size, limit=limit)

    async def delete(self, schema_id: str) -> None:
        await self._t.unary(self._stub.DeleteSchema, S.DeleteSchemaRequest(schema_id=schema_id))

    async def validate(self, schema_id: str, document: Any) -> S.ValidateDocumentResponse:
        """Check any JSON value against a registered schema: ``valid``, and each violation
        with the JSON pointer of the offending part of ``document``."""
        request = _validate_request(schema_id, document)
        return await self._t.unary(self._stub.ValidateDocument, request)


class SchemasClient:
    """The blocking twin of :class:`AsyncSchemasClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def register(self, schema_id: str, schema: Mapping[str, Any]) -> schema_pb2.Schema:
        return self._t.unary(self._stub.RegisterSchema, _register_request(schema_id, schema))

    def get(self, schema_id: str) -> schema_pb2.Schema:
        return self._t.unary(self._stub.GetSchema, S.GetSchemaRequest(schema_id=schema_id))

    def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> S.ListSchemasResponse:
        request = S.ListSchemasRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListSchemas, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[schema_pb2.Schema]:
        def fetch(token: str, size: int | None) -> S.ListSchemasResponse:
            return self.list_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.schemas, page_size=page_size, limit=limit)

    def delete(self, schema_id: str) -> None:
        self._t.unary(self._stub.DeleteSchema, S.DeleteSchemaRequest(schema_id=schema_id))

    def validate(self, schema_id: str, document: Any) -> S.ValidateDocumentResponse:
        return self._t.unary(self._stub.ValidateDocument, _validate_request(schema_id, document))
