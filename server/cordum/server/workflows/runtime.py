"""The workflow pieces of one process, built once by the composition root.

The "workflow" role runs the engine and its reconciler; the "gateway" role serves
WorkflowService and RunService. A gateway asks the engine for an immediate pass (after an
approval, a start, a rerun) directly when the engine runs in the same process, and else
publishes `<run id>` on the advance subject, which the engines share via their queue group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from cordum.server.api.workflow_servicer import RunServicer, WorkflowServicer
from cordum.server.bus import Subjects
from cordum.server.inbound import Inbound
from cordum.server.jetstream import DurablePublisher
from cordum.server.metrics import Metrics
from cordum.server.stores.jobs import JobStore
from cordum.server.workflows.definition import RedisSchemaLookup, SchemaLookup
from cordum.server.workflows.engine import (
    Engine,
    EngineConfig,
    RunEffects,
    advance_subject,
    run_events_subject,
)
from cordum.server.workflows.events import RunEventHub
from cordum.server.workflows.reconciler import WorkflowReconciler
from cordum.server.workflows.service import RunService, WorkflowService
from cordum.server.workflows.store import StoreLimits, WorkflowStore
from cordum.v1 import run_service_pb2_grpc, workflow_service_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = frozenset({"cordum.v1.WorkflowService", "cordum.v1.RunService"})


@dataclass(frozen=True)
class WorkflowSettings:
    prefix: str = ""
    instance_id: str = ""
    run_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    reconcile_interval_s: float = 5.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    # How long a gateway waits for the in-process engine's pass before answering.
    advance_wait_s: float = 2.0


class WorkflowRuntime:
    def __init__(
        self,
        *,
        redis: Redis,
        nats: NATS,
        subjects: Subjects,
        jobs: JobStore,
        settings: WorkflowSettings,
        schemas: SchemaLookup | None = None,
        inbound: Inbound | None = None,
        metrics: Metrics | None = None,
        durable: DurablePublisher | None = None,
    ) -> None:
        self.metrics = metrics
        # Decodes (and verifies) what the engine and the run hub receive; its trust signs
        # what they publish.
        self.inbound = inbound or Inbound()
        self.redis = redis
        self.nats = nats
        self.subjects = subjects
        self.jobs = jobs
        self.settings = settings
        self.store = WorkflowStore(
            redis,
            prefix=settings.prefix,
            limits=StoreLimits(
                run_ttl_s=settings.run_ttl_s, idempotency_ttl_s=settings.idempotency_ttl_s
            ),
        )
        if metrics is not None:
            self.store.on_status = lambda status: metrics.workflow_runs.labels(status).inc()
        self.schemas = schemas or RedisSchemaLookup(redis, settings.prefix)
        self.effects = RunEffects(
            jobs=jobs,
            nats=nats,
            subjects=subjects,
            trust=self.inbound.trust,
            durable=durable,
            store=self.store,
        )
        self.engine: Engine | None = None
        self.reconciler: WorkflowReconciler | None = None
        self.hub: RunEventHub | None = None
        self.workflows: WorkflowService | None = None
        self.runs: RunService | None = None

    # -- the engine (workflow role) -----------------------------------------------------

    def new_engine(self) -> Engine:
        return Engine(
            store=self.store,
            jobs=self.jobs,
            nats=self.nats,
            subjects=self.subjects,
            effects=self.effects,
            schemas=self.schemas,
            config=self.settings.engine,
            inbound=self.inbound,
        )

    async def start_engine(self) -> Engine:
        """Start a fresh engine and reconciler (what a new engine process would do)."""
        engine = self.new_engine()
        await engine.start()
        reconciler = WorkflowReconciler(
            engine=engine,
            interval_s=self.settings.reconcile_interval_s,
            owner=self.settings.instance_id,
            metrics=self.metrics,
        )
        await reconciler.start()
        self.engine, self.reconciler = engine, reconciler
        return engine

    async def stop_engine(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.stop()
            self.reconciler = None
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    # -- the API (gateway role) ---------------------------------------------------------

    async def serve(self, server: grpc.aio.Server) -> None:
        self.hub = RunEventHub(self.nats, run_events_subject(self.subjects), inbound=self.inbound)
        await self.hub.start()
        self.workflows = WorkflowService(store=self.store, schemas=self.schemas)
        self.runs = RunService(
            store=self.store,
            workflows=self.workflows,
            effects=self.effects,
            hub=self.hub,
            advance=self.advance,
        )
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServicer(self.workflows), server
        )
        run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(self.runs), server)

    async def advance(self, run_id: str) -> None:
        engine = self.engine
        if engine is not None and engine.running:
            try:
                await asyncio.wait_for(engine.advance_now(run_id), self.settings.advance_wait_s)
            except TimeoutError:
                logger.debug("engine pass over %s still running; answering", run_id)
            return
        data = run_id.encode()
        await self.nats.publish(
            advance_subject(self.subjects), data, headers=self.inbound.trust.headers(data)
        )

    async def stop(self) -> None:
        await self.stop_engine()
        if self.hub is not None:
            # A NATS connection already gone must not hold the shutdown.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.hub.stop()
            self.hub = None
