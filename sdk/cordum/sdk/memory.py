"""``client.memory``: what job pointers point at — ``ctx:<job_id>`` (a job's input),
``res:<job_id>`` (its result), ``art:<id>`` (an artifact) and ``mem:<memory id>...``
(context-engine memory) — as pointers (``redis://res:<job_id>``) or bare keys::

    value = await client.memory.read(f"redis://res:{job_id}")
    decode(value)          # {"answer": 42}: JSON parsed, else text, else bytes

Reads are tenant-checked: another tenant's job or memory is ``NotFound``.
"""

from __future__ import annotations

from typing import Any, cast

from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import from_value
from cordum.v1 import memory_pb2, memory_service_pb2, memory_service_pb2_grpc

__all__ = ["AsyncMemoryClient", "MemoryClient", "decode", "is_cut"]

M = memory_service_pb2
Stub = memory_service_pb2_grpc.MemoryServiceStub


def _request(pointer: str) -> M.ReadMemoryRequest:
    # A pointer has a scheme; anything else is a key. Each goes in its own field, so a
    # problem with it is reported against what the caller actually passed.
    if "://" in pointer:
        return M.ReadMemoryRequest(ptr=pointer)
    return M.ReadMemoryRequest(key=pointer)


def is_cut(value: memory_pb2.MemoryValue) -> bool:
    """True when the server returned only part of the value (it caps what one read returns):
    ``size_bytes`` is then the whole string's size, or what the returned items hold."""
    if value.redis_type in ("list", "set", "hash"):
        items = from_value(value.items) if value.HasField("items") else None
        return len(items or ()) < value.length
    return len(value.base64) < value.size_bytes


def decode(value: memory_pb2.MemoryValue) -> Any:
    """The value as Python: a list, set or hash as its items (a list, or a dict for a hash;
    each entry JSON-decoded when it parses); a string as JSON when it parses, else text when
    it is UTF-8, else bytes. A string cut by the server's size cap (:func:`is_cut`) comes
    back as the bytes received."""
    if value.redis_type in ("list", "set", "hash"):
        return from_value(value.items) if value.HasField("items") else []
    if value.HasField("json"):
        return from_value(value.json)
    if value.text or (not value.base64 and not value.size_bytes):
        return value.text
    return value.base64


class AsyncMemoryClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> memory_service_pb2_grpc.MemoryServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("memory_service_pb2_grpc.MemoryServiceAsyncStub", self._t.stub(Stub))

    async def read(self, pointer: str) -> memory_pb2.MemoryValue:
        """The value behind a pointer (``redis://ctx:<job_id>``) or key (``res:<job_id>``)."""
        return await self._t.unary(self._stub.ReadMemory, _request(pointer))

    async def get(self, pointer: str) -> Any:
        """:meth:`read`, decoded (:func:`decode`)."""
        return decode(await self.read(pointer))


class MemoryClient:
    """The blocking twin of :class:`AsyncMemoryClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def read(self, pointer: str) -> memory_pb2.MemoryValue:
        return self._t.unary(self._stub.ReadMemory, _request(pointer))

    def get(self, pointer: str) -> Any:
        return decode(self.read(pointer))
