"""The composition root: connects NATS and Redis once, builds the stores and services of the
roles asked for, serves gRPC (with health and reflection) and /metrics, and tears it all
down in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from cordum.agent.v1 import safety_pb2, safety_pb2_grpc
from cordum.server.api.auth import Authenticator, edge_from_settings
from cordum.server.api.interceptors import ErrorInterceptor
from cordum.server.api.job_servicer import ApprovalServicer, JobServicer
from cordum.server.api.metrics_interceptor import MetricsInterceptor
from cordum.server.api.registry import (
    platform_services,
    safety_kernel_service,
    unimplemented_handler,
)
from cordum.server.api.request_decoding import RequestDecodeInterceptor
from cordum.server.api.status_servicer import StatusServicer
from cordum.server.api.tracing_interceptor import TracingInterceptor
from cordum.server.bus import Subjects
from cordum.server.bus_trust import BusTrust
from cordum.server.config_files import load_pools, load_timeouts
from cordum.server.connections import open_nats, open_redis
from cordum.server.inbound import Inbound
from cordum.server.jetstream import DurablePublisher, JetStreamConfig, Streams, ensure_streams
from cordum.server.metrics import Metrics, MetricsServer
from cordum.server.safety.client import GrpcSafetyClient, LocalSafetyClient, SafetyClient
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.safety.servicer import SafetyKernelServicer
from cordum.server.sampled_gauges import job_gauges, workflow_gauges
from cordum.server.services.approvals import ApprovalService
from cordum.server.services.durable_intake import DurableIntake
from cordum.server.services.event_streams import SHUTDOWN, EventStreams
from cordum.server.services.job_events import JobEventHub, JobEventPublisher
from cordum.server.services.jobs import JobService
from cordum.server.services.reconciler import Reconciler
from cordum.server.services.scheduler import Scheduler, SchedulerConfig
from cordum.server.services.status import StatusService
from cordum.server.services.workers import WorkerRegistry
from cordum.server.settings import Settings
from cordum.server.stores.jobs import JobStore, StoreLimits
from cordum.server.tracing import Tracing
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
        # Replaced on start by the configured one (a no-op one until then, or when off).
        self.tracing = Tracing()
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
        # The event streams (gateway role) and the WebSocket bridge's bound port.
        self.events: EventStreams | None = None
        self.ws_port = settings.ws_port
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
        # API keys, rate limit, request size; refuses an open API on a public address.
        self.edge = edge_from_settings(s)
        # Shared with the WebSocket bridge: one key table for every way in.
        self.authenticator: Authenticator = self.edge.authenticator
        # Our bus key and the senders we trust (bad keys fail the start); every subscription
        # decodes through `self.inbound`, every publisher signs with its trust.
        self.inbound = Inbound(BusTrust.from_settings(s), self.metrics)
        # Deferred first, so it runs last: the spans of the whole shutdown get exported.
        self.tracing = Tracing.from_settings(s)
        self._defer(self.tracing.shutdown)
        self.redis = await open_redis(s.redis_url)
        self._defer(self.redis.aclose)
        self.nats = await open_nats(s.nats_url, name=f"cordum-{s.instance_id}")
        self._defer(self._drain_nats)
        # JetStream mode: the durable subjects' streams exist before anything publishes.
        self.jetstream: JetStreamConfig | None = None
        if s.use_jetstream:
            self.jetstream = JetStreamConfig.from_settings(s)
            await ensure_streams(self.nats, Streams.of(self.subjects), self.jetstream)

        metrics = MetricsServer(
            self.metrics_registry,
            s.metrics_host,
            s.metrics_port,
            before_scrape=self.metrics.refresh,
        )
        await metrics.start()
        self._defer(metrics.stop)
        self.metrics_port = metrics.bound_port

        # Metrics (and tracing) outside the error interceptor, so they see the status it sets.
        tracing = [TracingInterceptor(self.tracing)] if self.tracing.enabled else []
        server = grpc.aio.server(
            interceptors=[
                MetricsInterceptor(self.metrics),
                *tracing,
                ErrorInterceptor(),
                *self.edge.interceptors(),
                # Innermost: undecodable requests become INVALID_ARGUMENT after auth ran.
                RequestDecodeInterceptor(),
            ],
            options=self.edge.server_options(),
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
        self._defer(self._stop_grpc)
        for name in ["", *self._served]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "cordum-server ready",
            extra={"grpc": f"{s.grpc_host}:{self.grpc_port}", "roles": s.roles},
        )

    async def stop(self) -> None:
        await self._stack.aclose()

    def _durable(self, nc: NATS) -> DurablePublisher:
        """The publisher of the durable subjects (submit, DLQ, dispatch) on `nc`."""
        if self.jetstream is None:
            return DurablePublisher(nc)
        return DurablePublisher(nc, jetstream=True, timeout_s=self.jetstream.api_timeout_s)

    def _defer(self, stop: Callable[[], Awaitable[object]], timeout_s: float = 15.0) -> None:
        """Register a teardown step, bounded: one stuck step (a socket that never closes)
        must not keep the process from exiting or the next steps from running."""

        async def bounded() -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    await stop()
            except TimeoutError:
                logger.error("shutdown step %s timed out after %ss", stop, timeout_s)
            except Exception:
                logger.exception("shutdown step %s failed", stop)

        self._stack.push_async_callback(bounded)

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
        self._defer(self.store.aclose)
        self.store.on_transition = lambda state, topic: self.metrics.jobs_transitions.labels(
            state, topic
        ).inc()
        safety = await self._safety(server)
        await self._install_policy_admin(server)
        if roles & {"gateway", "scheduler"}:
            self.registry = WorkerRegistry(self.nats, inbound=self.inbound)
            await self.registry.start()
            self._defer(self.registry.stop)
            registry = self.registry
            self.metrics.workers_live.set_function(lambda: len(registry.workers()))
        # A gateway's hub gets this process's job events directly; they are published on a
        # connection of their own opened with no_echo, so the bus never hands them back here.
        self.job_events_hub: JobEventHub | None = None
        events_nats = self.nats
        if "gateway" in roles:
            events_nats = await open_nats(
                s.nats_url, name=f"cordum-{s.instance_id}-events", no_echo=True
            )
            self._defer(lambda: self._drain_connection(events_nats))
            self.job_events_hub = JobEventHub(events_nats, self.subjects, inbound=self.inbound)
            await self.job_events_hub.start()
            self._defer(self.job_events_hub.stop)
        events = JobEventPublisher(
            events_nats, self.subjects, self.job_events_hub, self.inbound.trust
        )
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
                config=SchedulerConfig(sender_id=s.sender_id, instance_id=s.instance_id),
                effective_config=self.config.effective_for_job if self.config else None,
                out=events_nats,
                inbound=self.inbound,
                tracing=self.tracing,
                durable=self._durable(events_nats),
                core_intake=self.jetstream is None,
            )
            self.metrics.add_sampler(job_gauges(self.redis, s.namespace, self.metrics))
            await self.scheduler.start()
            self._defer(self.scheduler.stop)
            if self.jetstream is not None:
                intake = DurableIntake(
                    nats=self.nats,
                    scheduler=self.scheduler,
                    streams=Streams.of(self.subjects),
                    config=self.jetstream,
                )
                # Deferred first: a start that fails half-way stops the consumers it started.
                self._defer(intake.stop)
                await intake.start()
            reconciler = Reconciler(
                scheduler=self.scheduler,
                interval_s=s.reconcile_interval_s or timeouts.reconciler.scan_interval_seconds,
                owner=s.instance_id,
            )
            await reconciler.start()
            self._defer(reconciler.stop)
        if "gateway" in roles:
            await self._gateway(server, safety, events)
        await self._install_workflows(server)
        await self._install_context(server)
        await self._install_events(server)

    async def _safety(self, server: grpc.aio.Server) -> SafetyClient:
        s = self.settings
        if "safety" not in self.roles:
            client = GrpcSafetyClient(
                s.safety_addr, s.safety_timeout_s, api_key=self.edge.internal_key
            )
            self._defer(client.close)
            return client
        self.kernel = SafetyKernel(
            s.config_dir / "safety.yaml",
            cache_ttl_s=s.decision_cache_ttl_s,
            watch_interval_s=s.policy_watch_s,
            on_decision=lambda decision: self.metrics.safety_decisions.labels(
                safety_pb2.DecisionType.Name(decision)
            ).inc(),
        )
        await self.kernel.start()
        self._defer(self.kernel.stop)
        safety_pb2_grpc.add_SafetyKernelServicer_to_server(
            SafetyKernelServicer(self.kernel), server
        )
        self._served.append(safety_kernel_service().full_name)
        self._implemented.add(safety_kernel_service().full_name)
        return LocalSafetyClient(self.kernel)

    async def _install_policy_admin(self, server: grpc.aio.Server) -> None:
        """Config service, policy administration and the schema registry.

        `self.config` (ConfigService, for effective config) exists in gateway, scheduler and
        workflow processes and loads the config/*.yaml defaults on start. Every kernel
        enforces the base file plus the current PUBLISHED policy version (read from Redis),
        records the checks it answers (for ReplayPolicy) and reloads on policy events. The
        gateway serves ConfigService, PolicyService and SchemaService, with a kernel of its
        own for evaluate/explain when the safety role runs in another process.
        """
        from cordum.server.api.config_servicer import ConfigServicer
        from cordum.server.api.policy_servicer import PolicyServicer
        from cordum.server.api.schema_servicer import SchemaServicer
        from cordum.server.safety.model import build_policy_set
        from cordum.server.services.config_service import ConfigService
        from cordum.server.services.policy_admin import PolicyAdmin
        from cordum.server.services.policy_eval import PolicyEvaluator
        from cordum.server.services.policy_recorder import (
            DecisionRecorder,
            PolicyEvents,
            published_sources,
        )
        from cordum.server.services.schemas import SchemaService
        from cordum.server.stores.config import ConfigStore
        from cordum.server.stores.policy import PolicyStore
        from cordum.server.stores.schemas import SchemaStore
        from cordum.v1 import (
            config_service_pb2_grpc,
            policy_service_pb2_grpc,
            schema_service_pb2_grpc,
        )

        assert self.redis is not None and self.nats is not None
        s, roles = self.settings, self.roles
        self.config: ConfigService | None = None
        self.policy_admin: PolicyAdmin | None = None
        self.schemas: SchemaService | None = None
        if roles & {"gateway", "scheduler", "workflow"}:
            self.config = ConfigService(ConfigStore(self.redis, prefix=s.namespace), s.config_dir)
            await self.config.start()
        if not roles & {"gateway", "safety"}:
            return
        store = PolicyStore(self.redis, prefix=s.namespace)
        sources = published_sources(store)
        events = PolicyEvents(self.nats, self.subjects.policy_events, self.inbound)
        self._defer(events.stop)
        recorder = DecisionRecorder(store)
        await recorder.start()
        self._defer(recorder.stop)
        kernel = self.kernel
        if kernel is None:
            kernel = SafetyKernel(
                s.config_dir / "safety.yaml",
                extra_sources=sources,
                cache_ttl_s=0,
                watch_interval_s=s.policy_watch_s,
            )
            await kernel.start()
            self._defer(kernel.stop)
        else:
            # A published version that no longer loads fails the start, like a bad file.
            build_policy_set(None, await sources())
            kernel.extra_sources = sources
            kernel.on_check = recorder.record
            await kernel.reload()
        await events.follow(kernel)
        if "gateway" not in roles:
            return
        assert self.config is not None
        self.policy_admin = PolicyAdmin(store, kernel, events)
        evaluator = PolicyEvaluator(self.policy_admin, store, self.config, recorder)
        self.schemas = SchemaService(SchemaStore(self.redis, prefix=s.namespace))
        policy_service_pb2_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(self.policy_admin, evaluator), server
        )
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(
            ConfigServicer(self.config), server
        )
        schema_service_pb2_grpc.add_SchemaServiceServicer_to_server(
            SchemaServicer(self.schemas), server
        )
        self._implemented |= {
            "cordum.v1.ConfigService",
            "cordum.v1.PolicyService",
            "cordum.v1.SchemaService",
        }

    async def _install_workflows(self, server: grpc.aio.Server) -> None:
        """The workflow engine. The "workflow" role runs the engine and its reconciler (engines
        in several processes share runs through a NATS queue group); the "gateway" role serves
        WorkflowService and RunService and asks the engine for an immediate pass (directly when
        it runs here, else by an advance message). `self.workflows` holds the pieces.
        """
        from cordum.server.workflows.engine import EngineConfig
        from cordum.server.workflows.runtime import (
            SERVICE_NAMES,
            WorkflowRuntime,
            WorkflowSettings,
        )

        assert self.redis is not None and self.nats is not None and self.store is not None
        s, roles = self.settings, self.roles
        self.workflows: WorkflowRuntime | None = None
        if not roles & {"workflow", "gateway"}:
            return
        interval = s.reconcile_interval_s or 5.0
        runtime = WorkflowRuntime(
            redis=self.redis,
            nats=self.nats,
            subjects=self.subjects,
            jobs=self.store,
            settings=WorkflowSettings(
                prefix=s.namespace,
                instance_id=s.instance_id,
                run_ttl_s=s.job_ttl_s,
                idempotency_ttl_s=s.idempotency_ttl_s,
                reconcile_interval_s=interval,
                engine=EngineConfig(timer_poll_s=min(0.1, interval)),
            ),
            inbound=self.inbound,
            metrics=self.metrics,
            durable=self._durable(self.nats),
        )
        self._defer(runtime.stop)
        if "workflow" in roles:
            self.metrics.add_sampler(workflow_gauges(self.redis, s.namespace, self.metrics))
            await runtime.start_engine()
        if "gateway" in roles:
            await runtime.serve(server)
            self._implemented |= SERVICE_NAMES
        self.workflows = runtime

    async def _gateway(
        self, server: grpc.aio.Server, safety: SafetyClient, events: JobEventPublisher
    ) -> None:
        assert self.redis is not None and self.nats is not None and self.store is not None
        s = self.settings
        hub = self.job_events_hub
        assert hub is not None
        self.jobs = JobService(
            store=self.store,
            nats=self.nats,
            subjects=self.subjects,
            hub=hub,
            events=events,
            # In one process with the scheduler, submits skip the bus (Scheduler.submit_local).
            scheduler=self.scheduler,
            metrics=self.metrics,
            trust=self.inbound.trust,
            tracing=self.tracing,
            durable=self._durable(self.nats),
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
        await self._install_platform_storage(server)

    async def _install_platform_storage(self, server: grpc.aio.Server) -> None:
        """Gateway services over shared storage: locks, artifacts (bytes in Redis or S3,
        per `artifact_backend`), the DLQ (retries go through `self.jobs`) and the memory
        pointer reader. `self.locks`, `self.artifacts`, `self.dlq`, `self.memory` hold them.
        """
        from cordum.server.api.artifact_servicer import ArtifactServicer
        from cordum.server.api.dlq_servicer import DLQServicer
        from cordum.server.api.lock_servicer import LockServicer
        from cordum.server.api.memory_servicer import MemoryServicer
        from cordum.server.services.artifacts import ArtifactLimits, ArtifactService
        from cordum.server.services.dlq import DLQService
        from cordum.server.services.locks import LockService
        from cordum.server.services.memory import MemoryService
        from cordum.server.stores.artifacts import (
            ArtifactBackend,
            ArtifactMetaStore,
            RedisBackend,
        )
        from cordum.server.stores.dlq import DLQStore
        from cordum.server.stores.locks import LockStore
        from cordum.v1 import (
            artifact_service_pb2_grpc,
            dlq_service_pb2_grpc,
            lock_service_pb2_grpc,
            memory_service_pb2_grpc,
        )

        assert self.redis is not None and self.store is not None and self.jobs is not None
        s = self.settings
        backends: dict[str, ArtifactBackend] = {
            "redis": RedisBackend(self.redis, prefix=s.namespace)
        }
        if s.artifact_backend == "s3" or s.artifact_s3_bucket:
            from cordum.server.stores.artifacts.s3_backend import S3Backend

            backends["s3"] = S3Backend(
                bucket=s.artifact_s3_bucket,
                prefix=s.artifact_s3_prefix,
                endpoint_url=s.artifact_s3_endpoint_url,
                region=s.artifact_s3_region,
                access_key_id=s.artifact_s3_access_key_id,
                secret_access_key=s.artifact_s3_secret_access_key,
            )
        self.locks = LockService(LockStore(self.redis, prefix=s.namespace))
        self.artifacts = ArtifactService(
            ArtifactMetaStore(self.redis, prefix=s.namespace),
            backends,
            default_backend=s.artifact_backend,
            limits=ArtifactLimits(
                max_bytes=s.artifact_max_bytes,
                ttl_s={
                    "short": s.artifact_ttl_short_s,
                    "standard": s.artifact_ttl_standard_s,
                    "audit": s.artifact_ttl_audit_s,
                },
            ),
        )
        self._defer(self.artifacts.close)
        self.dlq = DLQService(DLQStore(self.redis, prefix=s.namespace), self.jobs)
        self.memory = MemoryService(
            self.redis, self.store, self.artifacts, max_bytes=s.memory_read_max_bytes
        )
        lock_service_pb2_grpc.add_LockServiceServicer_to_server(LockServicer(self.locks), server)
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
            ArtifactServicer(self.artifacts), server
        )
        dlq_service_pb2_grpc.add_DLQServiceServicer_to_server(DLQServicer(self.dlq), server)
        memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(
            MemoryServicer(self.memory), server
        )
        self._implemented |= {
            "cordum.v1.LockService",
            "cordum.v1.ArtifactService",
            "cordum.v1.DLQService",
            "cordum.v1.MemoryService",
        }

    async def _install_context(self, server: grpc.aio.Server) -> None:
        """The context engine (BuildWindow, UpdateMemory) in the "context" role. Its memory
        lives under upstream's unprefixed `mem:<memory_id>:*` keys (cordum.server.context);
        tenant-bound callers are held to their own jobs' memory. `self.context_engine`.
        """
        from cordum.server.api.context_servicer import ContextEngineServicer
        from cordum.server.context.engine import ContextEngine, ContextLimits
        from cordum.server.context.owners import JobMemoryOwners
        from cordum.server.context.store import MemoryStore
        from cordum.v1 import context_service_pb2_grpc

        assert self.redis is not None and self.store is not None
        s = self.settings
        self.context_engine: ContextEngine | None = None
        if "context" not in self.roles:
            return
        self.context_engine = ContextEngine(
            MemoryStore(self.redis),
            limits=ContextLimits(
                memory_ttl_s=s.context_memory_ttl_s,
                history_turns=s.context_history_turns,
                max_chunks=s.context_max_chunks,
                rag_top_k=s.context_rag_top_k,
                summary_trigger_tokens=s.context_summary_trigger_tokens,
                summary_max_tokens=s.context_summary_max_tokens,
            ),
            owners=JobMemoryOwners(self.store),
            metrics=self.metrics,
        )
        context_service_pb2_grpc.add_ContextEngineServicer_to_server(
            ContextEngineServicer(self.context_engine), server
        )
        name = "cordum.v1.ContextEngine"
        self._implemented.add(name)
        # A context-only process serves (and reports healthy) just this service.
        if name not in self._served:
            self._served.append(name)

    async def _install_events(self, server: grpc.aio.Server) -> None:
        """Live bus events (gateway role): EventService.StreamEvents (SSE through Envoy) and
        the WebSocket `/api/v1/stream` on CORDUM_WS_HOST/PORT, both fed by one EventStreams
        (one set of bus subscriptions per process, only while a stream is open)."""
        from cordum.server.api.event_servicer import EventServicer
        from cordum.server.api.event_socket import EventSocketServer
        from cordum.server.services.event_sources import sources
        from cordum.server.services.event_streams import EventStreams
        from cordum.server.stores.event_scopes import ScopeStore
        from cordum.v1 import event_service_pb2_grpc

        assert self.redis is not None and self.nats is not None and self.store is not None
        s = self.settings
        if "gateway" not in self.roles:
            return
        runs = self.workflows.store.run_key if self.workflows is not None else None
        self.events = EventStreams(
            self.nats,
            sources(self.subjects),
            ScopeStore(self.redis, job_key=self.store.job_key, run_key=runs),
            inbound=self.inbound,
            queue_size=s.event_stream_queue,
            grace_s=s.event_stream_grace_s,
            metrics=self.metrics,
        )
        await self.events.start()
        self._defer(self.events.stop)
        socket = EventSocketServer(
            self.events,
            self.authenticator,
            host=s.ws_host,
            port=s.ws_port,
            allowed_origins=s.allowed_origins,
        )
        await socket.start()
        self._defer(socket.stop)
        self.ws_port = socket.bound_port
        event_service_pb2_grpc.add_EventServiceServicer_to_server(
            EventServicer(self.events), server
        )
        self._implemented.add("cordum.v1.EventService")

    def _finish_registration(self, server: grpc.aio.Server) -> None:
        # Everything in the contract that nothing implements answers UNIMPLEMENTED.
        descriptors = {d.full_name: d for d in [*platform_services(), safety_kernel_service()]}
        missing = [descriptors[n] for n in self._served if n not in self._implemented]
        server.add_generic_rpc_handlers([unimplemented_handler(d) for d in missing])

    async def _stop_grpc(self) -> None:
        # Health first, so load balancers stop routing here while in-flight calls finish.
        await self._health.enter_graceful_shutdown()
        if self.events is not None:
            # Open streams end now (`stream_end`), not when the grace period runs out.
            self.events.end_all(SHUTDOWN)
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)

    async def _drain_nats(self) -> None:
        if self.nats is not None:
            await self._drain_connection(self.nats)

    async def _drain_connection(self, nc: NATS) -> None:
        if not nc.is_closed:
            try:
                # Bounded: a half-closed socket can make nats-py wait forever.
                async with asyncio.timeout(5):
                    await nc.drain()
            except Exception:  # already closing, disconnected, or stuck: close hard
                logger.debug("nats drain failed", exc_info=True)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await nc.close()
