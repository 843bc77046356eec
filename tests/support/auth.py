"""Apps with API keys for the auth tests: two tenants (acme, beta) with a viewer, an operator
and an admin each, plus an admin key for every tenant (`platform`); and generic callers for
any RPC by its full method name (requests built from JSON)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from cordum.server.api.registry import platform_services, safety_kernel_service
from cordum.server.app import App

from support.cordum import app_settings, running_app

TENANTS = ("acme", "beta")
ROLES = ("viewer", "operator", "admin")


def key_of(name: str) -> str:
    """The secret of key `name` (`acme-viewer`, `beta-admin`, `platform`, ...)."""
    return f"test-{name}-0123456789abcdef"


# name -> (tenant, role)
KEYS: dict[str, tuple[str, str]] = {
    **{f"{t}-{r}": (t, r) for t in TENANTS for r in ROLES},
    "platform": ("*", "admin"),
}


def api_keys_json() -> str:
    return json.dumps(
        [
            {"key": key_of(name), "name": name, "tenant": tenant, "role": role}
            for name, (tenant, role) in KEYS.items()
        ]
    )


def md(name: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting key `name`."""
    return (("x-api-key", key_of(name)),)


@asynccontextmanager
async def keyed_app(
    nats_url: str, redis_url: str, config_dir: Path, **overrides: Any
) -> AsyncIterator[App]:
    settings = app_settings(nats_url, redis_url, config_dir, api_keys=api_keys_json(), **overrides)
    async with running_app(settings) as app:
        yield app


def all_methods() -> list[MethodDescriptor]:
    return [m for s in [*platform_services(), safety_kernel_service()] for m in s.methods]


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def request_of(method: MethodDescriptor, body: dict[str, Any] | None = None) -> Message:
    cls = message_factory.GetMessageClass(method.input_type)
    return json_format.ParseDict(body or {}, cls())


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    body: dict[str, Any] | None = None,
    *,
    key: str | None,
    stream_wait_s: float = 0.5,
) -> grpc.StatusCode:
    """Call `method` with a request built from `body`, presenting key `key` (None: no key);
    the status code it ends with (OK for a stream still open after `stream_wait_s`)."""
    path = method_path(method)
    request = request_of(method, body)
    out_cls = message_factory.GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": out_cls.FromString,
    }
    metadata = md(key) if key else None
    try:
        if method.client_streaming:
            stream_unary = channel.stream_unary(path, **kwargs)

            async def nothing() -> AsyncIterator[Message]:
                return
                yield

            await stream_unary(nothing(), metadata=metadata, timeout=10)
        elif method.server_streaming:
            stream = channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10)
            try:
                await asyncio.wait_for(stream.read(), stream_wait_s)
            except TimeoutError:
                pass
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def method_named(path: str) -> MethodDescriptor:
    """The method of `/package.Service/Method`."""
    found = next((m for m in all_methods() if method_path(m) == path), None)
    assert found is not None, f"no method {path}"
    return found


async def rpc(
    channel: grpc.aio.Channel, path: str, body: dict[str, Any] | None = None, *, key: str
) -> dict[str, Any]:
    """A unary (or the first message of a server-streaming) call by method path, as protojson
    with proto field names; raises AioRpcError."""
    method = method_named(path)
    request = request_of(method, body)
    out_cls = message_factory.GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": out_cls.FromString,
    }
    if method.server_streaming:
        stream = channel.unary_stream(path, **kwargs)(request, metadata=md(key), timeout=10)
        try:
            reply = await stream.read()
        finally:
            stream.cancel()
    else:
        reply = await channel.unary_unary(path, **kwargs)(request, metadata=md(key), timeout=10)
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)
