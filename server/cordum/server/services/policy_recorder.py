"""Connecting the safety kernel to policy administration.

- `published_sources`: the kernel's extra sources — the enabled bundles of the current
  published version, read from Redis (drafts are never enforced).
- `PolicyEvents`: publish/rollback announce themselves on `<ns>cordum.policy.events`; every
  process running a kernel subscribes without a queue group and reloads at once, so all
  replicas converge within a bus hop plus one parse (the periodic watcher stays as the
  safety net for a lost message).
- `DecisionRecorder`: keeps the requests and decisions of the checks a kernel answers, for
  `ReplayPolicy`. `record()` is called on the check hot path and only appends to a memory
  buffer; a background task flushes the buffer every `flush_interval_s` (or as soon as
  `batch_size` entries wait) in ONE pipeline (LPUSH + LTRIM), so a check gains no Redis
  round trip. If Redis is down the buffer keeps the newest `max_buffer` entries and drops
  the oldest (counted in `dropped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.agent.v1 import safety_pb2
from cordum.server.inbound import Inbound
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.stores.policy import PolicyStore, encode_recorded

logger = logging.getLogger(__name__)


def published_sources(store: PolicyStore) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    """The enabled bundles of the current version as `(bundle id, yaml)`, in id order.

    One GET per call (the current number); the version itself is read only when the
    number changed (versions are immutable).
    """
    cached: tuple[int, list[tuple[str, str]]] = (0, [])

    async def sources() -> list[tuple[str, str]]:
        nonlocal cached
        number = await store.current_number()
        if number != cached[0]:
            version = await store.get_version(number) if number else None
            bundles = sorted(version.bundles, key=lambda b: b.id) if version else []
            cached = (number, [(b.id, b.content) for b in bundles if b.enabled])
        return list(cached[1])

    return sources


@dataclass(frozen=True)
class PolicyEvent:
    action: str
    version: int
    snapshot: str

    def to_json(self) -> bytes:
        return json.dumps(
            {"action": self.action, "version": self.version, "snapshot": self.snapshot}
        ).encode()


class PolicyEvents:
    """Publishes policy changes and reloads the subscribed kernels when one arrives."""

    def __init__(self, nats: NATS, subject: str, inbound: Inbound | None = None) -> None:
        self._nats = nats
        self._subject = subject
        self._inbound = inbound or Inbound()
        self._subscriptions: list[Subscription] = []

    async def publish(self, event: PolicyEvent) -> None:
        data = event.to_json()
        await self._nats.publish(self._subject, data, headers=self._inbound.trust.headers(data))
        # Push it out now: the replicas' reload should not wait for the next flush tick.
        await self._nats.flush()

    async def follow(self, kernel: SafetyKernel) -> None:
        """Reload `kernel` on every policy event (no queue group: every process gets it)."""

        async def on_event(msg: Msg) -> None:
            if self._inbound.message(msg, "policy_event", json.loads) is None:
                return
            try:
                installed = await kernel.reload()
            except Exception:  # reload logs its own load errors; never kill the subscription
                logger.exception("policy reload after event failed")
                return
            logger.info(
                "policy event handled",
                extra={"event": msg.data.decode(errors="replace"), "installed": installed},
            )

        self._subscriptions.append(await self._nats.subscribe(self._subject, cb=on_event))

    async def stop(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):  # the connection may already be closing
                await subscription.unsubscribe()


_Entry = tuple[int, bytes, str, int, str, str]


class DecisionRecorder:
    def __init__(
        self,
        store: PolicyStore,
        *,
        flush_interval_s: float = 0.2,
        batch_size: int = 500,
        max_buffer: int = 20_000,
    ) -> None:
        self._store = store
        self._interval = flush_interval_s
        self._batch = batch_size
        self._buffer: deque[_Entry] = deque(maxlen=max_buffer)
        self._wake = asyncio.Event()
        # One flush at a time, so batches reach Redis in the order they were recorded.
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.recorded = 0
        self.flushed = 0
        self.dropped = 0

    def record(
        self, request: safety_pb2.PolicyCheckRequest, response: safety_pb2.PolicyCheckResponse
    ) -> None:
        """Remember one decision (called on the hot path: no I/O, no waiting)."""
        if request.input_content:
            # Rules never see the content (only its size); do not store megabytes of it.
            clone = safety_pb2.PolicyCheckRequest()
            clone.CopyFrom(request)
            clone.input_content = b""
            request = clone
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(
            (
                int(time.time() * 1000),
                request.SerializeToString(),
                request.job_id,
                response.decision,
                response.rule_id,
                response.policy_snapshot,
            )
        )
        self.recorded += 1
        if len(self._buffer) >= self._batch:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="policy-decision-recorder")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def flush(self) -> int:
        """Write everything buffered now, `batch_size` entries per pipeline."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> int:
        written = 0
        while self._buffer:
            count = min(self._batch, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(count)]
            entries = [encode_recorded(t, raw, j, d, r, s) for t, raw, j, d, r, s in batch]
            try:
                await self._store.append_decisions(entries)
            except Exception:
                self.dropped += len(batch)
                logger.warning("recording %d policy decisions failed", len(batch), exc_info=True)
                break
            written += count
            self.flushed += count
        return written

    async def _run(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
        # `stop()` sends, and this loop would never end.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()
