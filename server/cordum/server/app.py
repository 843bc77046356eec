"""The composition root: connects NATS and Redis once, builds the stores and services of the
roles asked for, serves gRPC (with health and reflection) and /metrics, and tears it all
down in reverse order.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from cordum.server.api.interceptors import ErrorInterceptor
from cordum.server.api.metrics_interceptor import MetricsInterceptor
from cordum.server.api.registry import (
    platform_services,
    safety_kernel_service,
    unimplemented_handler,
)
from cordum.server.api.status_servicer import StatusServicer
from cordum.server.connections import open_nats, open_redis
from cordum.server.metrics import Metrics, MetricsServer
from cordum.server.services.status import StatusService
from cordum.server.services.workers import WorkerRegistry
from cordum.server.settings import Settings
from cordum.v1 import status_service_pb2_grpc

logger = logging.getLogger(__name__)


class App:
    """One Cordum server process. Use as `async with App(settings) as app: ...`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics_registry = CollectorRegistry()
        self.metrics = Metrics(self.metrics_registry)
        self.redis: Redis | None = None
        self.nats: NATS | None = None
        self.registry: WorkerRegistry | None = None
        self.grpc_port = settings.grpc_port
        self.metrics_port = settings.metrics_port
        self._stack = AsyncExitStack()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._served: list[str] = []

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        self.redis = await open_redis(s.redis_url)
        self._stack.push_async_callback(self.redis.aclose)
        self.nats = await open_nats(s.nats_url, name=f"cordum-{s.instance_id}")
        self._stack.push_async_callback(self._drain_nats)

        metrics = MetricsServer(self.metrics_registry, s.metrics_host, s.metrics_port)
        await metrics.start()
        self._stack.push_async_callback(metrics.stop)
        self.metrics_port = metrics.bound_port

        if {"gateway", "scheduler"} & set(s.roles):
            self.registry = WorkerRegistry(
                self.nats,
                on_drop=lambda subject, reason: self.metrics.bus_dropped.labels(
                    subject, reason
                ).inc(),
            )
            await self.registry.start()
            self._stack.push_async_callback(self.registry.stop)

        # Metrics outermost, so it sees the status the error interceptor sets.
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics), ErrorInterceptor()]
        )
        self._register_services(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self._served, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.grpc_port = server.add_insecure_port(s.grpc_address)
        if self.grpc_port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {s.grpc_address}")
        await server.start()
        self._server = server
        self._stack.push_async_callback(self._stop_grpc)
        for name in ["", *self._served]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "cordum-server ready",
            extra={"grpc": f"{s.grpc_host}:{self.grpc_port}", "roles": s.roles},
        )

    async def stop(self) -> None:
        await self._stack.aclose()

    def _register_services(self, server: grpc.aio.Server) -> None:
        assert self.redis is not None and self.nats is not None
        roles = set(self.settings.roles)
        implemented: set[str] = set()
        if "gateway" in roles:
            status = StatusService(
                registry=self.registry,
                redis=self.redis,
                nats=self.nats,
                nats_url=self.settings.nats_url,
                jetstream=self.settings.use_jetstream,
                roles=self.settings.roles,
            )
            status_service_pb2_grpc.add_StatusServiceServicer_to_server(
                StatusServicer(status), server
            )
            implemented.add("cordum.v1.StatusService")
            self._served.extend(s.full_name for s in platform_services())
        if "safety" in roles:
            self._served.append(safety_kernel_service().full_name)
        # Everything in the contract that nothing above implements answers UNIMPLEMENTED.
        descriptors = {d.full_name: d for d in [*platform_services(), safety_kernel_service()]}
        missing = [descriptors[n] for n in self._served if n not in implemented]
        server.add_generic_rpc_handlers([unimplemented_handler(d) for d in missing])

    async def _stop_grpc(self) -> None:
        # Health first, so load balancers stop routing here while in-flight calls finish.
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)

    async def _drain_nats(self) -> None:
        if self.nats is not None and not self.nats.is_closed:
            try:
                await self.nats.drain()
            except Exception:  # already closing or disconnected: nothing left to drain
                logger.debug("nats drain failed", exc_info=True)
