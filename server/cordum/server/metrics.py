"""Prometheus metrics of one process, served on /metrics by a small aiohttp app.

Each App owns its own CollectorRegistry (no global registry), so several apps can run in
one test process without clashing. Names and labels are a contract (dashboards, alerts): the
table in docs/metrics.md lists every one; change them only together with it.

Nothing here costs a Redis round trip on the hot path: counters and histograms are updated
in memory where the work happens, and gauges of shared state (queue depths, DLQ size, active
runs) are sampled when /metrics is scraped (`Metrics.add_sampler`: one pipelined read per
scrape, bounded in time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self._host = host
        self._port = port
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None
        self.bound_port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.bound_port = sockets[0].getsockname()[1]
        logger.info("metrics on http://%s:%d/metrics", self._host, self.bound_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            await self._before_scrape()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


class Metrics:
    """Every metric of one process, registered on the process's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc_requests = Counter(
            "cordum_grpc_requests_total",
            "gRPC calls handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.rpc_latency = Histogram(
            "cordum_grpc_request_duration_seconds",
            "gRPC call latency by method (unary calls; streams until their end).",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        self.bus_dropped = Counter(
            "cordum_bus_packets_dropped_total",
            # subject_kind: submit, result, progress, cancel, heartbeat, handshake, job_event,
            # run_event, run_advance, policy_event; reason: see cordum.server.inbound.
            "Inbound bus messages dropped, by kind of subject and reason.",
            ["subject_kind", "reason"],
            registry=registry,
        )
        self.workers_live = Gauge(
            "cordum_workers_live", "Workers with a recent heartbeat.", registry=registry
        )
        self.jobs_submitted = Counter(
            "cordum_jobs_submitted_total",
            "Jobs accepted by the gateway.",
            ["topic"],
            registry=registry,
        )
        self.jobs_transitions = Counter(
            "cordum_jobs_transitions_total",
            "Job state transitions this process committed (admissions, results, cancels, "
            "timeouts, re-queues), by new state and topic.",
            ["state", "topic"],
            registry=registry,
        )
        self.safety_decisions = Counter(
            "cordum_safety_decisions_total",
            "Decisions of this process's safety kernel on the scheduler's checks, by type.",
            ["decision"],
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "cordum_dispatch_latency_seconds",
            "From submit to dispatch of jobs dispatched straight from their submission "
            "(not after an approval, a throttle or a retry), as seen by the scheduler.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )
        # Sampled at scrape time (see add_sampler) by the processes that run the role.
        self.jobs_queue_depth = Gauge(
            "cordum_jobs_queue_depth",
            "Jobs in each non-terminal state (every tenant), sampled at scrape time.",
            ["state"],
            registry=registry,
        )
        self.dlq_entries = Gauge(
            "cordum_dlq_entries",
            "Dead-letter entries held (every tenant), sampled at scrape time.",
            registry=registry,
        )
        self.reconciler_actions = Counter(
            "cordum_reconciler_actions_total",
            "What the reconcilers did, by reconciler (jobs, workflows) and action.",
            ["reconciler", "action"],
            registry=registry,
        )
        self.workflow_runs = Counter(
            "cordum_workflow_runs_total",
            "Workflow run status changes, by the new status (RUN_STATUS_PENDING = started).",
            ["status"],
            registry=registry,
        )
        self.workflow_runs_active = Gauge(
            "cordum_workflow_runs_active",
            "Workflow runs not yet in a terminal status, sampled at scrape time.",
            registry=registry,
        )
        self.context_builds = Counter(
            "cordum_context_builds_total",
            "Context windows built (BuildWindow), by mode.",
            ["mode"],
            registry=registry,
        )
        self.context_tokens = Histogram(
            "cordum_context_window_tokens",
            "Input tokens of each context window built, by mode.",
            ["mode"],
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 131072),
            registry=registry,
        )
        self.context_dropped = Counter(
            "cordum_context_messages_dropped_total",
            "Messages left out of context windows to fit the token budget, by mode.",
            ["mode"],
            registry=registry,
        )
        self.context_memory_updates = Counter(
            "cordum_context_memory_updates_total",
            "Memory updates (UpdateMemory) that stored something, by mode.",
            ["mode"],
            registry=registry,
        )
        self.event_streams = Gauge(
            "cordum_event_streams",
            "Open event streams (StreamEvents and SSE: grpc; /api/v1/stream: websocket).",
            ["transport"],
            registry=registry,
        )
        self.event_streams_ended = Counter(
            "cordum_event_streams_ended_total",
            "Event streams the server ended, by reason (slow_consumer, overloaded, "
            "interrupted, shutdown).",
            ["reason"],
            registry=registry,
        )
        self._samplers: list[Callable[[], Awaitable[None]]] = []

    def add_sampler(self, sample: Callable[[], Awaitable[None]]) -> None:
        """Run `sample` before each scrape: it sets gauges of shared state (one pipelined
        Redis read), so keeping them current costs the hot path nothing."""
        self._samplers.append(sample)

    async def refresh(self, timeout_s: float = 2.0) -> None:
        """Run the samplers; one that fails or is slow leaves its gauges at their last value
        (a scrape must answer even when Redis does not)."""
        for sample in self._samplers:
            try:
                async with asyncio.timeout(timeout_s):
                    await sample()
            except Exception:
                logger.warning("metrics sampler %s failed", sample, exc_info=True)
