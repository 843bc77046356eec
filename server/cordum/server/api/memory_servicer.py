"""MemoryService over gRPC: proto in, MemoryService call, proto out."""

from __future__ import annotations

import grpc

from cordum.server.api.metadata import caller
from cordum.server.jsonvalue import to_value
from cordum.server.services.memory import MemoryRead, MemoryService
from cordum.v1 import memory_pb2, memory_service_pb2, memory_service_pb2_grpc

Ctx = grpc.aio.ServicerContext


def memory_proto(read: MemoryRead) -> memory_pb2.MemoryValue:
    value = memory_pb2.MemoryValue(
        pointer=read.pointer,
        key=read.key,
        kind=read.kind,
        size_bytes=read.size_bytes,
        redis_type=read.redis_type,
        length=read.length,
    )
    if read.raw is not None:
        value.base64 = read.raw
    if read.text is not None:
        value.text = read.text
    if read.has_json:
        value.json.CopyFrom(to_value(read.json))
    if read.items is not None:
        value.items.CopyFrom(to_value(read.items))
    return value


class MemoryServicer(memory_service_pb2_grpc.MemoryServiceServicer):
    def __init__(self, service: MemoryService) -> None:
        self._memory = service

    async def ReadMemory(
        self, request: memory_service_pb2.ReadMemoryRequest, context: Ctx
    ) -> memory_pb2.MemoryValue:
        return memory_proto(await self._memory.read(request.ptr, request.key, caller(context)))
