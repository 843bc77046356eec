"""``client.context``: the context engine, which builds model windows from a memory within
a token budget and records each turn into that memory::

    window = await client.context.build_window(
        "chat-42", {"prompt": "and in French?"}, mode="chat", model="gpt-4o"
    )
    [(m.role, m.content) for m in window.messages]
    await client.context.update_memory(
        "chat-42", {"prompt": "and in French?"}, model_response="Bonjour", mode="chat"
    )

Modes: ``raw`` (the payload only; no memory read or written), ``chat`` (history, then the
payload) and ``rag`` (running summary, retrieved chunks, history, then the payload). The
payload is JSON with ``prompt``/``message``/``instruction`` (a ``dict`` is encoded for you),
or plain text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import context_pb2, context_service_pb2, context_service_pb2_grpc

__all__ = ["AsyncContextClient", "ContextClient", "Mode", "Payload", "context_mode"]

C = context_service_pb2
Stub = context_service_pb2_grpc.ContextEngineStub
Mode = str | int
Payload = bytes | str | Mapping[str, Any]


def context_mode(mode: Mode) -> int:
    """``"chat"``, ``"CHAT"``, ``"CONTEXT_MODE_CHAT"`` or the enum number → the number."""
    if isinstance(mode, int):
        return mode
    name = mode.strip().upper()
    if not name.startswith("CONTEXT_MODE_"):
        name = f"CONTEXT_MODE_{name}"
    try:
        return context_pb2.ContextMode.Value(name)
    except ValueError:
        names = ", ".join(
            v.name.removeprefix("CONTEXT_MODE_").lower()
            for v in context_pb2.ContextMode.DESCRIPTOR.values
            if v.number
        )
        raise ValueError(f"unknown context mode {mode!r} (one of: {names})") from None


def _payload(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(dict(payload), ensure_ascii=False, separators=(",", ":")).encode()


def _window_request(
    memory_id: str,
    payload: Payload,
    mode: Mode,
    model: str,
    max_input_tokens: int | None,
    max_output_tokens: int | None,
) -> C.BuildWindowRequest:
    return C.BuildWindowRequest(
        memory_id=memory_id,
        logical_payload=_payload(payload),
        mode=context_mode(mode),  # type: ignore[arg-type]
        model=model,
        max_input_tokens=max_input_tokens or 0,
        max_output_tokens=max_output_tokens or 0,
    )


def _update_request(
    memory_id: str, payload: Payload, model_response: str, mode: Mode
) -> C.UpdateMemoryRequest:
    return C.UpdateMemoryRequest(
        memory_id=memory_id,
        logical_payload=_payload(payload),
        model_response=model_response,
        mode=context_mode(mode),  # type: ignore[arg-type]
    )


class AsyncContextClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> context_service_pb2_grpc.ContextEngineAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("context_service_pb2_grpc.ContextEngineAsyncStub", self._t.stub(Stub))

    async def build_window(
        self,
        memory_id: str,
        payload: Payload,
        *,
        mode: Mode = "chat",
        model: str = "",
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
    ) -> C.BuildWindowResponse:
        """The messages to send to ``model`` (its tokenizer counts the budget), at most
        ``max_input_tokens`` (server default 8,000); ``dropped_messages`` says how many did
        not fit. A payload that alone exceeds the budget is ``InvalidArgument``."""
        request = _window_request(
            memory_id, payload, mode, model, max_input_tokens, max_output_tokens
        )
        return await self._t.unary(self._stub.BuildWindow, request)

    async def update_memory(
        self, memory_id: str, payload: Payload, *, model_response: str = "", mode: Mode = "chat"
    ) -> None:
        """Append the turn (the payload's message and the model's response) to the memory
        and refresh its summary. ``raw`` keeps no memory (a no-op)."""
        request = _update_request(memory_id, payload, model_response, mode)
        await self._t.unary(self._stub.UpdateMemory, request)


class ContextClient:
    """The blocking twin of :class:`AsyncContextClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def build_window(
        self,
        memory_id: str,
        payload: Payload,
        *,
        mode: Mode = "chat",
        model: str = "",
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
    ) -> C.BuildWindowResponse:
        request = _window_request(
            memory_id, payload, mode, model, max_input_tokens, max_output_tokens
        )
        return self._t.unary(self._stub.BuildWindow, request)

    def update_memory(
        self, memory_id: str, payload: Payload, *, model_response: str = "", mode: Mode = "chat"
    ) -> None:
        request = _update_request(memory_id, payload, model_response, mode)
        self._t.unary(self._stub.UpdateMemory, request)
