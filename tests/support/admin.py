"""Helpers for the config / policy / schema tests: error details over gRPC and REST,
and apps of their own (own namespace, own config dir) for tests that change global state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cordum.server.app import App

from support.cordum import app_settings, running_app


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """field → description of the google.rpc.BadRequest a failed call carries."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    out: dict[str, str] = {}
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def rest_violations(body: dict[str, Any]) -> dict[str, str]:
    """field → description from a REST error body (google.rpc.Status as JSON)."""
    out: dict[str, str] = {}
    for detail in body.get("details") or []:
        if detail.get("@type", "").endswith("google.rpc.BadRequest"):
            out.update({v["field"]: v["description"] for v in detail["field_violations"]})
    return out


def rest_reason(body: dict[str, Any]) -> str:
    for detail in body.get("details") or []:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail.get("reason", ""))
    return ""


@asynccontextmanager
async def own_app(
    nats_url: str, redis_url: str, config_dir: Path, **overrides: Any
) -> AsyncIterator[App]:
    """An app in a namespace of its own (or the one given), for tests that change
    namespace-wide state (system config, published policy)."""
    async with running_app(app_settings(nats_url, redis_url, config_dir, **overrides)) as app:
        yield app


async def keys_with(app: App, text: str) -> list[bytes]:
    assert app.redis is not None
    return list(await app.redis.keys(f"*{text}*"))
