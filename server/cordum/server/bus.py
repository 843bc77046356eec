"""Bus plumbing shared by the roles: subject names and per-batch message handling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cordum.sdk import cap

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Subjects:
    """Subjects and queue groups of one control plane.

    `namespace` (empty by default, which gives CAP's own names) prefixes what only the control
    plane uses, so several control planes can share one NATS (tests, side-by-side stacks).
    Worker-facing subjects (job topics, `worker.<id>.jobs`, results, progress, heartbeats,
    handshakes) are CAP's and never prefixed; each control plane ignores jobs it does not own.
    """

    namespace: str = ""

    @property
    def submit(self) -> str:
        return self.namespace + cap.SUBJECT_SUBMIT

    @property
    def cancel(self) -> str:
        return self.namespace + cap.SUBJECT_CANCEL

    @property
    def dlq(self) -> str:
        return self.namespace + cap.SUBJECT_DLQ

    @property
    def workflow_event(self) -> str:
        return self.namespace + cap.SUBJECT_WORKFLOW_EVENT

    @property
    def job_events(self) -> str:
        """Our own job events (one cordum.v1.JobEvent per job state change, for watchers,
        waiters and the workflow engine) go to `job_event(kind, state)`; this bare subject
        takes the events of publishers that do not classify them (approvals, the workflow
        engine's own), and every listener of job events subscribes to it as well."""
        return self.namespace + "cordum.job.events"

    def job_event(self, kind: str, state: str) -> str:
        """`<ns>cordum.job.events.<kind>.<STATE>`: kind `wf` for workflow step jobs, `job`
        for the rest, so the workflow engine subscribes to just the events it acts on."""
        return f"{self.namespace}cordum.job.events.{kind}.{state}"

    @property
    def job_events_all(self) -> str:
        """Every classified job event (the bare `job_events` subject is not included)."""
        return self.namespace + "cordum.job.events.>"

    @property
    def policy_events(self) -> str:
        return self.namespace + "cordum.policy.events"

    def queue(self, role: str) -> str:
        return f"{self.namespace}cordum-{role}"


class Batcher(Generic[T]):
    """Collects items and hands them to `handle` in batches: everything that arrived while
    the previous batch was being handled forms the next one. Under load this turns N Redis
    round trips into one pipeline; when idle it costs one event-loop hop.
    """

    def __init__(
        self, handle: Callable[[list[T]], Awaitable[None]], *, max_batch: int = 512, name: str
    ) -> None:
        self._handle = handle
        self._max = max_batch
        self._name = name
        self._items: list[T] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, item: T) -> None:
        self._items.append(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        try:
            # Let the messages already waiting in the NATS client join this batch.
            await asyncio.sleep(0)
            while self._items:
                batch, self._items = self._items[: self._max], self._items[self._max :]
                try:
                    await self._handle(batch)
                except Exception:
                    logger.exception("batch handler %s failed (%d items)", self._name, len(batch))
        finally:
            self._task = None

    async def drain(self) -> None:
        while self._task is not None:
            await asyncio.shield(self._task)
