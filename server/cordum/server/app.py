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

from cordum.agent.v1 import safety_pb2_grpc
from cordum.server.api.interceptors import ErrorInterceptor
from cordum.server.api.job_servicer import ApprovalServicer, JobServicer
from cordum.server.api.metrics_interceptor import MetricsInterceptor
from cordum.server.api.registry import (
    platform_services,
    safety_kernel_service,
    unimplemented_handler,
)
from cordum.server.api.status_servicer import StatusServicer
from cordum.server.bus import Subjects
from cordum.server.config_files import load_pools, load_timeouts
from cordum.server.connections import open_nats, open_redis
from cordum.server.metrics import Metrics, MetricsServer
from cordum.server.safety.client import GrpcSafetyClient, LocalSafetyClient, SafetyClient
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.safety.servicer import SafetyKernelServicer
from cordum.server.services.approvals import ApprovalService
from cordum.server.services.job_events import JobEventHub, JobEventPublisher
from cordum.server.services.jobs import JobService
from cordum.server.services.reconciler import Reconciler
from cordum.server.services.scheduler import Scheduler, SchedulerConfig
from cordum.server.services.status import StatusService
from cordum.server.services.workers import WorkerRegistry
from cordum.server.settings import Settings
from cordum.server.stores.jobs import JobStore, StoreLimits
from cordum.v1 import (
    approval_service_pb2_grpc,
    job_service_pb2_grpc,
    status_service_pb2_grpc,
)

logger = logging.getLogger(__name__)


class App:
    """One Cordum server process. Use as `async with App(settings) as app: ...`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics_registry = CollectorRegistry()
        self.metrics = Metrics(self.metrics_registry)
        self.subjects = Subjects(settings.namespace)
        self.redis: Redis | None = None
        self.nats: NATS | None = None
        self.registry: WorkerRegistry | None = None
        self.kernel: SafetyKernel | None = None
        self.store: JobStore | None = None
        self.scheduler: Scheduler | None = None
        self.jobs: JobService | None = None
        self.grpc_port = settings.grpc_port
        self.metrics_port = settings.metrics_port
        self._stack = AsyncExitStack()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._served: list[str] = []
        self._implemented: set[str] = set()

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

    @property
    def roles(self) -> set[str]:
        return set(self.settings.roles)

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

        # Metrics outermost, so it sees the status the error interceptor sets.
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics), ErrorInterceptor()]
        )
        await self._build_roles(server)
        self._finish_registration(server)
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

    async def _build_roles(self, server: grpc.aio.Server) -> None:
        assert self.redis is not None and self.nats is not None
        s, roles = self.settings, self.roles
        self.store = JobStore(
            self.redis,
            prefix=s.namespace,
            limits=StoreLimits(
                job_ttl_s=s.job_ttl_s,
                idempotency_ttl_s=s.idempotency_ttl_s,
                result_ttl_s=s.job_ttl_s,
                dlq_max=s.dlq_max_entries,
            ),
        )
        safety = await self._safety(server)
        if roles & {"gateway", "scheduler"}:
            self.registry = WorkerRegistry(
                self.nats,
                on_drop=lambda subject, reason: self.metrics.bus_dropped.labels(
                    subject, reason
                ).inc(),
            )
            await self.registry.start()
            self._stack.push_async_callback(self.registry.stop)
        events = JobEventPublisher(self.nats, self.subjects.job_events)
        if "scheduler" in roles:
            assert self.registry is not None
            timeouts = load_timeouts(s.config_dir / "timeouts.yaml")
            self.scheduler = Scheduler(
                nats=self.nats,
                store=self.store,
                safety=safety,
                registry=self.registry,
                pools=load_pools(s.config_dir / "pools.yaml"),
                timeouts=timeouts,
                subjects=self.subjects,
                metrics=self.metrics,
                events=events,
                config=SchedulerConfig(sender_id=s.sender_id),
            )
            await self.scheduler.start()
            self._stack.push_async_callback(self.scheduler.stop)
            reconciler = Reconciler(
                scheduler=self.scheduler,
                interval_s=s.reconcile_interval_s or timeouts.reconciler.scan_interval_seconds,
                owner=s.instance_id,
            )
            await reconciler.start()
            self._stack.push_async_callback(reconciler.stop)
        if "gateway" in roles:
            await self._gateway(server, safety)

    async def _safety(self, server: grpc.aio.Server) -> SafetyClient:
        s = self.settings
        if "safety" not in self.roles:
            client = GrpcSafetyClient(s.safety_addr, s.safety_timeout_s)
            self._stack.push_async_callback(client.close)
            return client
        self.kernel = SafetyKernel(
            s.config_dir / "safety.yaml",
            cache_ttl_s=s.decision_cache_ttl_s,
            watch_interval_s=s.policy_watch_s,
        )
        await self.kernel.start()
        self._stack.push_async_callback(self.kernel.stop)
        safety_pb2_grpc.add_SafetyKernelServicer_to_server(
            SafetyKernelServicer(self.kernel), server
        )
        self._served.append(safety_kernel_service().full_name)
        self._implemented.add(safety_kernel_service().full_name)
        return LocalSafetyClient(self.kernel)

    async def _gateway(self, server: grpc.aio.Server, safety: SafetyClient) -> None:
        assert self.redis is not None and self.nats is not None and self.store is not None
        s = self.settings
        hub = JobEventHub(self.nats, self.subjects.job_events)
        await hub.start()
        self._stack.push_async_callback(hub.stop)
        self.jobs = JobService(
            store=self.store,
            nats=self.nats,
            subjects=self.subjects,
            hub=hub,
            metrics=self.metrics,
        )
        approvals = ApprovalService(jobs=self.jobs, safety=safety)
        kernel = self.kernel
        status = StatusService(
            registry=self.registry,
            redis=self.redis,
            nats=self.nats,
            nats_url=s.nats_url,
            jetstream=s.use_jetstream,
            roles=s.roles,
            policy_snapshot=(lambda: kernel.snapshot) if kernel is not None else (lambda: ""),
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs), server)
        approval_service_pb2_grpc.add_ApprovalServiceServicer_to_server(
            ApprovalServicer(approvals), server
        )
        status_service_pb2_grpc.add_StatusServiceServicer_to_server(StatusServicer(status), server)
        self._implemented |= {
            "cordum.v1.JobService",
            "cordum.v1.ApprovalService",
            "cordum.v1.StatusService",
        }
        self._served.extend(d.full_name for d in platform_services())

    def _finish_registration(self, server: grpc.aio.Server) -> None:
        # Everything in the contract that nothing implements answers UNIMPLEMENTED.
        descriptors = {d.full_name: d for d in [*platform_services(), safety_kernel_service()]}
        missing = [descriptors[n] for n in self._served if n not in self._implemented]
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
