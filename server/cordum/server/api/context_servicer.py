"""ContextEngine over gRPC: proto in, ContextEngine call, proto out."""

from __future__ import annotations

import grpc

from cordum.server.api.metadata import caller
from cordum.server.context.engine import ContextEngine, MemoryUpdate, WindowRequest
from cordum.v1 import context_pb2, context_service_pb2, context_service_pb2_grpc

Ctx = grpc.aio.ServicerContext


class ContextEngineServicer(context_service_pb2_grpc.ContextEngineServicer):
    def __init__(self, engine: ContextEngine) -> None:
        self._engine = engine

    async def BuildWindow(
        self, request: context_service_pb2.BuildWindowRequest, context: Ctx
    ) -> context_service_pb2.BuildWindowResponse:
        window = await self._engine.build_window(
            WindowRequest(
                memory_id=request.memory_id,
                mode=request.mode,
                model=request.model,
                logical_payload=request.logical_payload,
                max_input_tokens=request.max_input_tokens,
                max_output_tokens=request.max_output_tokens,
            ),
            caller(context),
        )
        return context_service_pb2.BuildWindowResponse(
            messages=[
                context_pb2.ModelMessage(role=m.role, content=m.content) for m in window.messages
            ],
            input_tokens=window.input_tokens,
            output_tokens=window.output_tokens,
            dropped_messages=window.dropped_messages,
        )

    async def UpdateMemory(
        self, request: context_service_pb2.UpdateMemoryRequest, context: Ctx
    ) -> context_service_pb2.UpdateMemoryResponse:
        await self._engine.update_memory(
            MemoryUpdate(
                memory_id=request.memory_id,
                logical_payload=request.logical_payload,
                model_response=request.model_response,
                mode=request.mode,
            ),
            caller(context),
        )
        return context_service_pb2.UpdateMemoryResponse()
