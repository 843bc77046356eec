"""How the scheduler asks the safety kernel: in-process or over gRPC, same interface.

Both clients raise `KernelUnavailable` when the kernel cannot answer. Upstream turned any
RPC error (and its open circuit breaker) into a terminal DENY + DLQ; the scheduler is meant
to treat `KernelUnavailable` as "retry later with backoff", never as a decision.

A THROTTLE decision carries its retry delay in the reason (` (retry_after_ms=<n>)`); read it
with `retry_after_ms(response)`.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol

import grpc

from cordum.agent.v1 import safety_pb2, safety_pb2_grpc
from cordum.server.errors import CordumError
from cordum.server.safety.evaluate import retry_after_ms
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.tracing import trace_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "GrpcSafetyClient",
    "KernelUnavailable",
    "LocalSafetyClient",
    "SafetyClient",
    "retry_after_ms",
]


class KernelUnavailable(Exception):
    """The kernel gave no decision (down, timed out, not loaded). Retry; do not deny."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class SafetyClient(Protocol):
    async def check(
        self, request: safety_pb2.PolicyCheckRequest
    ) -> safety_pb2.PolicyCheckResponse: ...


class LocalSafetyClient:
    """Calls a SafetyKernel running in this process."""

    def __init__(self, kernel: SafetyKernel) -> None:
        self._kernel = kernel

    async def check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        try:
            return self._kernel.check(request)
        except CordumError as error:
            raise KernelUnavailable(str(error), code=error.code) from error
        except Exception as error:
            # A kernel bug must not become a verdict on the job; retrying surfaces it loudly.
            logger.exception("safety kernel check failed")
            raise KernelUnavailable(f"safety kernel error: {error}") from error


class GrpcSafetyClient:
    """Calls `cordum.agent.v1.SafetyKernel/Check` with a per-call deadline.

    The channel is created on first use (inside the running event loop). Use as an async
    context manager or call `close()`.
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 2.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str = "",
    ) -> None:
        self._target = target
        # The kernel's gRPC server requires a key when API keys are configured.
        self._metadata = (("x-api-key", api_key),) if api_key else None
        self._timeout_s = timeout_s
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: safety_pb2_grpc.SafetyKernelStub | None = None

    def _get_stub(self) -> safety_pb2_grpc.SafetyKernelStub:
        if self._stub is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self._target, self._credentials)
            else:
                self._channel = grpc.aio.insecure_channel(self._target)
            self._stub = safety_pb2_grpc.SafetyKernelStub(self._channel)
        return self._stub

    async def check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        stub = self._get_stub()
        try:
            # With tracing on, the kernel's server span joins the job's trace.
            response: safety_pb2.PolicyCheckResponse = await stub.Check(
                request, timeout=self._timeout_s, metadata=trace_metadata(self._metadata)
            )
        except grpc.aio.AioRpcError as error:
            raise KernelUnavailable(
                f"safety kernel {self._target}: {error.code().name}: {error.details()}",
                code=error.code(),
            ) from error
        return response

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> GrpcSafetyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
