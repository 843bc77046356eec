"""SchemaService over native gRPC: register (2020-12 checked), get, list with page tokens,
delete, validate with JSON pointers, and the key layout other services read."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from cordum.server.app import App
from cordum.server.jsonvalue import from_struct
from cordum.server.stores.schemas import get_schema
from cordum.v1 import schema_service_pb2, schema_service_pb2_grpc

from support.admin import error_reason, field_violations, keys_with

S = schema_service_pb2

ORDER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "items"],
    "properties": {
        "id": {"type": "string", "minLength": 3},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
        "a/b": {"type": "boolean"},
    },
    "additionalProperties": False,
}


def stub(channel: grpc.aio.Channel) -> schema_service_pb2_grpc.SchemaServiceStub:
    return schema_service_pb2_grpc.SchemaServiceStub(channel)


def struct(data: dict[str, object]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def value(data: object) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


async def test_register_get_validate_delete(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    schemas = stub(channel)
    schema_id = f"orders/{prefix}/v1"
    created = await schemas.RegisterSchema(
        S.RegisterSchemaRequest(id=schema_id, schema=struct(ORDER))
    )
    assert created.id == schema_id
    assert from_struct(created.schema) == ORDER
    assert len(created.sha256) == 64
    assert created.created_at == created.updated_at

    got = await schemas.GetSchema(S.GetSchemaRequest(schema_id=schema_id))
    assert from_struct(got.schema) == ORDER and got.sha256 == created.sha256

    # The layout the workflow engine reads: <prefix>schema:<id> holds the schema as JSON.
    assert cordum.redis is not None
    ns = cordum.settings.namespace
    assert json.loads(await cordum.redis.get(f"{ns}schema:{schema_id}")) == ORDER
    assert await get_schema(cordum.redis, ns, schema_id) == ORDER
    assert await get_schema(cordum.redis, ns, f"{schema_id}-nope") is None

    good = await schemas.ValidateDocument(
        S.ValidateDocumentRequest(
            schema_id=schema_id, document=value({"id": "abc", "items": [{"name": "x", "qty": 2}]})
        )
    )
    assert good.valid and not good.violations

    bad = await schemas.ValidateDocument(
        S.ValidateDocumentRequest(
            schema_id=schema_id,
            document=value(
                {"id": "ab", "items": [{"qty": 1.5}, {"name": 7}], "a/b": "yes", "extra": 1}
            ),
        )
    )
    assert not bad.valid
    found = {(v.pointer, v.schema_pointer) for v in bad.violations}
    assert found == {
        ("", "/additionalProperties"),
        ("/a~1b", "/properties/a~1b/type"),
        ("/id", "/properties/id/minLength"),
        ("/items/0", "/properties/items/items/required"),
        ("/items/0/qty", "/properties/items/items/properties/qty/type"),
        ("/items/1/name", "/properties/items/items/properties/name/type"),
    }
    assert all(v.message for v in bad.violations)

    # Replacing keeps created_at, moves updated_at.
    replaced = await schemas.RegisterSchema(
        S.RegisterSchemaRequest(id=schema_id, schema=struct({"type": "string"}))
    )
    assert replaced.created_at == created.created_at
    assert replaced.sha256 != created.sha256

    await schemas.DeleteSchema(S.DeleteSchemaRequest(schema_id=schema_id))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await schemas.GetSchema(S.GetSchemaRequest(schema_id=schema_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(gone.value) == "SCHEMA_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await schemas.DeleteSchema(S.DeleteSchemaRequest(schema_id=schema_id))
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    assert await keys_with(cordum, prefix) == []


async def test_list_pages_through_every_schema_in_id_order(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    schemas = stub(channel)
    ids = [f"page-{prefix}/{i:02d}" for i in range(7)]
    for schema_id in reversed(ids):
        await schemas.RegisterSchema(
            S.RegisterSchemaRequest(id=schema_id, schema=struct({"type": "object"}))
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await schemas.ListSchemas(S.ListSchemasRequest(page_size=3, page_token=token))
        pages += 1
        seen += [s.id for s in page.schemas]
        token = page.next_page_token
        if not token:
            break
    mine = [i for i in seen if i.startswith(f"page-{prefix}/")]
    assert mine == ids
    assert pages >= 3
    for schema_id in ids:
        await schemas.DeleteSchema(S.DeleteSchemaRequest(schema_id=schema_id))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await schemas.ListSchemas(S.ListSchemasRequest(page_size=-1, page_token="%%%"))
    assert set(field_violations(info.value)) == {"page_size", "page_token"}


async def test_invalid_schemas_and_ids_are_refused_naming_the_field(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    schemas = stub(channel)
    cases = [
        (S.RegisterSchemaRequest(id=f"ok-{prefix}"), {"schema"}),
        (S.RegisterSchemaRequest(schema=struct({"type": "object"})), {"id"}),
        (S.RegisterSchemaRequest(id=f"bad id:{prefix}", schema=struct({})), {"id"}),
        (
            S.RegisterSchemaRequest(
                id=f"ok-{prefix}", schema=struct({"type": "nope", "minLength": -1})
            ),
            {"schema.type", "schema.minLength"},
        ),
        (
            S.RegisterSchemaRequest(
                id=f"ok-{prefix}",
                schema=struct({"$schema": "http://json-schema.org/draft-07/schema#"}),
            ),
            {"schema.$schema"},
        ),
        (
            S.RegisterSchemaRequest(
                id=f"ok-{prefix}", schema=struct({"properties": {"a": {"type": 3}}})
            ),
            {"schema.properties.a.type"},
        ),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await schemas.RegisterSchema(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert set(field_violations(info.value)) == fields, request
    assert await keys_with(cordum, prefix) == []

    with pytest.raises(grpc.aio.AioRpcError) as no_doc:
        await schemas.ValidateDocument(S.ValidateDocumentRequest(schema_id=f"ok-{prefix}"))
    assert set(field_violations(no_doc.value)) == {"document"}
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await schemas.ValidateDocument(
            S.ValidateDocumentRequest(schema_id=f"none-{prefix}", document=value(1))
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_dangling_ref_fails_validation_as_a_precondition(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    schemas = stub(channel)
    schema_id = f"ref-{prefix}"
    await schemas.RegisterSchema(
        S.RegisterSchemaRequest(id=schema_id, schema=struct({"$ref": "#/$defs/missing"}))
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await schemas.ValidateDocument(
            S.ValidateDocumentRequest(schema_id=schema_id, document=value({}))
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await schemas.DeleteSchema(S.DeleteSchemaRequest(schema_id=schema_id))
