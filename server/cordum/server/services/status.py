"""Platform status: uptime, build, dependency health, worker count."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from cordum.server.connections import redact_url
from cordum.server.errors import not_implemented
from cordum.server.services.workers import WorkerRegistry, WorkerState


@dataclass(frozen=True)
class DependencyStatus:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class PlatformStatus:
    time: float
    uptime_seconds: float
    version: str
    nats: DependencyStatus
    nats_url: str
    jetstream: bool
    redis: DependencyStatus
    workers: int
    roles: list[str]
    policy_snapshot: str = ""


def package_version() -> str:
    try:
        return metadata.version("cordum")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


@dataclass
class StatusService:
    redis: Redis
    nats: NATS
    nats_url: str
    jetstream: bool
    roles: list[str]
    registry: WorkerRegistry | None = None
    policy_snapshot: Callable[[], str] = lambda: ""
    started: float = field(default_factory=time.time)

    async def status(self) -> PlatformStatus:
        try:
            await self.redis.ping()
            redis = DependencyStatus(True)
        except Exception as exc:  # report, don't fail: status must answer when Redis is down
            redis = DependencyStatus(False, str(exc))
        nats = DependencyStatus(
            self.nats.is_connected, "connected" if self.nats.is_connected else "disconnected"
        )
        now = time.time()
        return PlatformStatus(
            time=now,
            uptime_seconds=now - self.started,
            version=package_version(),
            nats=nats,
            nats_url=redact_url(self.nats_url),
            jetstream=self.jetstream,
            redis=redis,
            workers=len(self.registry.workers()) if self.registry else 0,
            roles=list(self.roles),
            policy_snapshot=self.policy_snapshot(),
        )

    def workers(self, *, include_lost: bool) -> list[WorkerState]:
        if self.registry is None:
            raise not_implemented("no worker registry runs in this process")
        return self.registry.workers(include_lost=include_lost)

    def is_live(self, worker: WorkerState) -> bool:
        return self.registry is not None and self.registry.is_live(worker)
