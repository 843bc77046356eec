"""Reading call metadata (gRPC metadata, or HTTP headers forwarded by Envoy)."""

from __future__ import annotations

import grpc

from cordum.server.services.caller import Caller


def header(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""


def idempotency_key(context: grpc.aio.ServicerContext) -> str:
    return header(context, "idempotency-key") or header(context, "x-idempotency-key")


def caller(context: grpc.aio.ServicerContext) -> Caller:
    """The authenticated caller (API-key auth fills this in; without keys, unscoped)."""
    principal = header(context, "x-principal-id")
    return Caller(tenant=None, principal=principal)
