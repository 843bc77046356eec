"""Reading call metadata (gRPC metadata, or HTTP headers forwarded by Envoy)."""

from __future__ import annotations

from contextvars import ContextVar

import grpc

from cordum.server.services.caller import Caller

# Set by the auth interceptor (api/auth.py) for the task serving one RPC.
CURRENT_CALLER: ContextVar[Caller | None] = ContextVar("cordum_caller", default=None)


def header(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""


def idempotency_key(context: grpc.aio.ServicerContext) -> str:
    return header(context, "idempotency-key") or header(context, "x-idempotency-key")


def caller(context: grpc.aio.ServicerContext) -> Caller:
    """The authenticated caller; without API keys (no auth interceptor), an unscoped admin."""
    current = CURRENT_CALLER.get()
    if current is not None:
        return current
    return Caller(tenant=None, principal=header(context, "x-principal-id"))
