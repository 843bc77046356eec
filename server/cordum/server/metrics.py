"""Prometheus metrics of one process, served on /metrics by a small aiohttp app.

Each App owns its own CollectorRegistry (no global registry), so several apps can run in
one test process without clashing.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self._host = host
        self._port = port
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
            "Inbound bus packets dropped, by subject and reason.",
            ["subject", "reason"],
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
            "Job state transitions made by the scheduler, by new state and topic.",
            ["state", "topic"],
            registry=registry,
        )
        self.safety_decisions = Counter(
            "cordum_safety_decisions_total",
            "Safety decisions, by decision.",
            ["decision"],
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "cordum_dispatch_latency_seconds",
            "From submit to dispatch, as seen by the scheduler.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )
