"""Choosing where a job goes: least-loaded live worker serving its topic, or the topic
subject (whose queue group picks a worker) when no worker is known.

Differences from upstream, on purpose:
- Only labels under `placement.` (e.g. `placement.region=eu`) constrain placement; labels the
  system or users add for other reasons never make a job unplaceable.
- Workers are matched by the topics they announce (CAP handshake) or their heartbeat pool,
  so a default CAP Agent (empty pool) is placed, not starved.
- Load counts our own dispatches since the worker's last heartbeat, and ties are broken by
  the load ratio, not by map order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cordum.agent.v1 import job_pb2
from cordum.sdk import cap
from cordum.server.config_files import PoolsConfig
from cordum.server.services.workers import WorkerState

PLACEMENT_PREFIX = "placement."
PREFERRED_WORKER_LABEL = "preferred_worker_id"


@dataclass(frozen=True)
class Placement:
    subject: str
    worker_id: str = ""


@dataclass(frozen=True)
class Unplaceable:
    # `no_pool_mapping` is final; `no_matching_worker` waits for one to appear.
    code: str
    reason: str

    @property
    def final(self) -> bool:
        return self.code == "no_pool_mapping"


def _requires(request: job_pb2.JobRequest) -> set[str]:
    return {r.strip().lower() for r in request.meta.requires if r.strip()}


def _constraints(request: job_pb2.JobRequest) -> dict[str, str]:
    return {
        key.removeprefix(PLACEMENT_PREFIX): value
        for key, value in request.labels.items()
        if key.startswith(PLACEMENT_PREFIX)
    }


def place(
    request: job_pb2.JobRequest, workers: Iterable[WorkerState], pools: PoolsConfig
) -> Placement | Unplaceable:
    topic = request.topic
    requires = _requires(request)
    mapped = pools.pools_for(topic)
    if mapped and requires and not any(pools.requires_ok(p, requires) for p in mapped):
        return Unplaceable(
            "no_pool_mapping",
            f"no pool mapped to {topic} satisfies requires {sorted(requires)}",
        )
    constraints = _constraints(request)

    def eligible(worker: WorkerState) -> bool:
        hb = worker.heartbeat
        if not (worker.serves(topic) or (hb.pool and hb.pool in mapped)):
            return False
        if requires:
            offered = {c.lower() for c in hb.capabilities}
            if hb.pool in pools.pools:
                offered |= set(pools.pools[hb.pool].requires)
            if not requires <= offered:
                return False
        return all(hb.labels.get(k) == v for k, v in constraints.items())

    candidates = [w for w in workers if eligible(w)]
    if not candidates:
        if constraints or requires:
            # Publishing on the topic subject would ignore the constraints.
            return Unplaceable(
                "no_matching_worker",
                f"waiting for a live worker on {topic} matching {sorted(constraints) or ''}"
                f"{sorted(requires) or ''}",
            )
        return Placement(topic)
    preferred = request.labels.get(PREFERRED_WORKER_LABEL, "")
    for worker in candidates:
        if worker.worker_id == preferred:
            return Placement(cap.direct_subject(preferred), preferred)
    best = min(candidates, key=_load_key)
    return Placement(cap.direct_subject(best.worker_id), best.worker_id)


def _load_key(worker: WorkerState) -> tuple[float, int, str]:
    capacity = max(worker.capacity, 1)
    return (worker.load / capacity, worker.load, worker.worker_id)
