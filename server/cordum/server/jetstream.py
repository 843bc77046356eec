"""JetStream mode (``NATS_USE_JETSTREAM=1``): the streams behind the durable subjects, the
publisher that writes to them, and the pull consumers that read them.

What is durable, and how (README "Durability: NATS modes"):

- ``<ns>CORDUM_SUBMIT``: ``<ns>sys.job.submit``, work queue, read by the namespace's
  schedulers (one durable consumer);
- ``CORDUM_RESULTS``: ``sys.job.result``, interest (kept until every namespace's schedulers
  acked it), one durable consumer per namespace;
- ``<ns>CORDUM_DLQ``: ``<ns>sys.job.dlq``, limits, read by the schedulers (they apply the
  notices of undeliverable messages, see services/durable_intake.py);
- ``CORDUM_JOBS``: ``job.>`` and ``worker.*.jobs``, limits, read by nobody: CAP workers read
  these subjects with core subscriptions, which still get every message.

``<ns>`` is the subject namespace made a valid name (``t1.`` → ``t1_``): JetStream refuses two
streams over the same subject, so each namespace has its own streams for its own subjects, and
the CAP subjects every namespace shares (results, dispatches) have one stream per server,
created by whichever App comes first (creation is idempotent; a changed config is applied).

Consumers are durable pull consumers: every replica of a namespace fetches from the same one,
so N schedulers share the work (JetStream's answer to queue groups). A batch is acked only
after its handler returned, i.e. after Redis holds the new state. When the handler raises,
each message of the batch is handled again alone (one bad message must not fail the rest);
one that still fails is delivered again after a growing delay, at most ``max_deliver``
times. On the last failed delivery the message's
``exhausted`` callback runs (the scheduler dead-letters its job) and the message is
terminated; when the process dies or hangs on that last delivery instead, the server's
max-deliveries advisory triggers the same callback in a live replica.

Our publishes on the durable subjects carry ``Nats-Msg-Id`` (job id + what it is), so a
retried publish is stored once. Submits and DLQ notices wait for the stream's ack;
dispatches do not (no consumer of ours reads them back, and a dispatch no worker took is the
reconciler's job in both modes), they are only captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from cordum.sdk import cap
from cordum.server.bus import Subjects
from cordum.server.connections import ConnectError
from cordum.server.settings import Settings

logger = logging.getLogger(__name__)

MSG_ID: Final = "Nats-Msg-Id"
# JetStream API error codes we act on.
_STREAM_CONFIG_DIFFERS: Final = 10058
_SUBJECTS_OVERLAP: Final = 10065

Handler = Callable[[list[Msg]], Awaitable[None]]
# Called with the bytes of a message that will not be delivered again, and why.
Exhausted = Callable[[bytes, str], Awaitable[None]]


class JetStreamError(ConnectError):
    """JetStream is asked for but cannot be used (fails the start); str() is one line."""


@dataclass(frozen=True)
class JetStreamConfig:
    max_age_s: float = 24 * 3600
    max_bytes: int = 256 * 1024 * 1024
    replicas: int = 1
    duplicate_window_s: float = 120.0
    max_deliver: int = 10
    ack_wait_s: float = 30.0
    # Delay before the 2nd delivery of a message whose handler failed; doubles each time.
    redeliver_delay_s: float = 1.0
    redeliver_delay_max_s: float = 60.0
    max_ack_pending: int = 4096
    fetch_batch: int = 256
    fetch_timeout_s: float = 5.0
    api_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, s: Settings) -> JetStreamConfig:
        return cls(
            max_age_s=s.jetstream_max_age_s,
            max_bytes=s.jetstream_max_bytes,
            replicas=s.jetstream_replicas,
            max_deliver=s.jetstream_max_deliver,
            ack_wait_s=s.jetstream_ack_wait_s,
            redeliver_delay_s=s.jetstream_redeliver_delay_s,
        )

    def redeliver_delay(self, delivered: int) -> float:
        """The delay before the next delivery of a message delivered `delivered` times."""
        doublings = min(max(delivered - 1, 0), 32)  # a DLQ notice may be delivered forever
        return min(self.redeliver_delay_max_s, self.redeliver_delay_s * 2**doublings)


def name_token(namespace: str) -> str:
    """A subject namespace as a part of stream and consumer names (which take no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", namespace)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: api.RetentionPolicy


@dataclass(frozen=True)
class Streams:
    """The streams and consumer names of one namespace."""

    submit: StreamSpec
    results: StreamSpec
    dlq: StreamSpec
    jobs: StreamSpec
    token: str

    @classmethod
    def of(cls, subjects: Subjects) -> Streams:
        token = name_token(subjects.namespace)
        return cls(
            submit=StreamSpec(
                f"{token}CORDUM_SUBMIT", (subjects.submit,), api.RetentionPolicy.WORK_QUEUE
            ),
            # Interest: a result is kept until every namespace's schedulers acked it.
            results=StreamSpec(
                "CORDUM_RESULTS", (cap.SUBJECT_RESULT,), api.RetentionPolicy.INTEREST
            ),
            dlq=StreamSpec(f"{token}CORDUM_DLQ", (subjects.dlq,), api.RetentionPolicy.LIMITS),
            jobs=StreamSpec("CORDUM_JOBS", ("job.>", "worker.*.jobs"), api.RetentionPolicy.LIMITS),
            token=token,
        )

    def all(self) -> tuple[StreamSpec, ...]:
        return (self.submit, self.results, self.dlq, self.jobs)

    def durable(self, role: str) -> str:
        return f"{self.token}cordum-{role}"


async def ensure_streams(nc: NATS, streams: Streams, config: JetStreamConfig) -> None:
    """Create the streams, or bring an existing one to this config. Safe to run from any
    number of processes at once."""
    js = nc.jetstream(timeout=config.api_timeout_s)
    try:
        await js.account_info()
    except Exception as exc:
        raise JetStreamError(
            f"NATS_USE_JETSTREAM is on but the NATS server has no JetStream: {exc!r}"
        ) from exc
    for spec in streams.all():
        stream = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=spec.retention,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=config.max_age_s,
            max_bytes=config.max_bytes,
            num_replicas=config.replicas,
            duplicate_window=config.duplicate_window_s,
        )
        try:
            await js.add_stream(stream)
        except BadRequestError as exc:
            if exc.err_code == _STREAM_CONFIG_DIFFERS:
                await js.update_stream(stream)
            elif exc.err_code == _SUBJECTS_OVERLAP:
                raise JetStreamError(
                    f"stream {spec.name}: another stream already captures {spec.subjects}"
                ) from exc
            else:
                raise JetStreamError(f"stream {spec.name}: {exc.description}") from exc


class DurablePublisher:
    """Publishes on a durable subject. Without JetStream it is the core publish it always
    was; with it, the message carries `msg_id` (the stream stores one copy per id within
    its duplicate window) and `publish` returns once the stream has stored it."""

    def __init__(self, nc: NATS, *, jetstream: bool = False, timeout_s: float = 5.0) -> None:
        self.nc = nc
        self._js: JetStreamContext | None = nc.jetstream(timeout=timeout_s) if jetstream else None

    @property
    def jetstream(self) -> bool:
        return self._js is not None

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        acked: bool = True,
    ) -> None:
        """`acked=False`: captured by the stream but not waited for (dispatches)."""
        if self._js is None:
            await self.nc.publish(subject, payload, headers=dict(headers) if headers else None)
            return
        with_id = {**(headers or {}), MSG_ID: msg_id}
        if not acked:
            await self.nc.publish(subject, payload, headers=with_id)
            return
        ack = await self._js.publish(subject, payload, headers=with_id)
        if ack.duplicate:
            logger.debug("duplicate %s on %s not stored again", msg_id, subject)


class DurableConsumer:
    """One durable pull consumer, fetched in batches by a loop of its own.

    `handle` gets each fetched batch and must return only once the batch's effects are
    stored (it raises otherwise); then the batch is acked. `max_deliver` < 0 redelivers
    forever (for handlers that are the end of the line, like applying dead letters)."""

    def __init__(
        self,
        nc: NATS,
        *,
        stream: StreamSpec,
        durable: str,
        handle: Handler,
        config: JetStreamConfig,
        exhausted: Exhausted | None = None,
        max_deliver: int | None = None,
        deliver_new: bool = False,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self._handle = handle
        self._exhausted = exhausted
        self.config = config
        self.max_deliver = config.max_deliver if max_deliver is None else max_deliver
        self._deliver_new = deliver_new
        self._js = nc.jetstream(timeout=config.api_timeout_s)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._advisories: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            # Only the work queue holds a namespace's own messages from before its first
            # consumer; results from before it cannot be this namespace's.
            deliver_policy=api.DeliverPolicy.NEW if self._deliver_new else api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.config.max_ack_pending,
            filter_subject=self.stream.subjects[0] if len(self.stream.subjects) == 1 else None,
            # A namespace gone for longer than messages are kept loses its consumer.
            inactive_threshold=self.config.max_age_s,
        )
        # Create, or update to this config (JetStream's create-or-update by name).
        await self._js.add_consumer(self.stream.name, consumer)
        self._sub = await self._js.pull_subscribe_bind(
            durable=self.durable, stream=self.stream.name
        )
        if self._exhausted is not None and self.max_deliver > 0:
            self._advisories = await self.nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream.name}.{self.durable}",
                queue=f"{self.durable}-advisories",
                cb=self._on_max_deliveries,
            )
        self._task = asyncio.create_task(self._loop(), name=f"jetstream-{self.durable}")

    async def stop(self) -> None:
        """Stop fetching; a batch being handled finishes (and is acked) first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._settling is not None:
            await self._settling
            self._settling = None
        for sub in (self._advisories, self._sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._advisories = self._sub = None

    async def _loop(self) -> None:
        assert self._sub is not None
        while True:
            try:
                msgs = await self._sub.fetch(
                    self.config.fetch_batch, timeout=self.config.fetch_timeout_s
                )
            except TimeoutError:  # nothing arrived (nats' fetch timeouts subclass it)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, consumer gone: wait and ask again
                logger.warning(
                    "fetching from %s/%s failed: %r", self.stream.name, self.durable, exc
                )
                await asyncio.sleep(1.0)
                continue
            # Shielded: stop() cancels the loop, never a batch half handled.
            self._settling = asyncio.create_task(self._settle(msgs))
            await asyncio.shield(self._settling)
            self._settling = None

    async def _settle(self, msgs: Sequence[Msg]) -> None:
        try:
            await self._handle(list(msgs))
        except Exception as exc:
            if len(msgs) > 1:
                for msg in msgs:
                    await self._settle([msg])
                return
            await self._failed(msgs[0], exc)
            return
        for msg in msgs:
            # A lost ack is a redelivery, which the handlers take as a duplicate.
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _failed(self, msg: Msg, exc: Exception) -> None:
        delivered = msg.metadata.num_delivered
        if self.max_deliver < 0 or delivered < self.max_deliver:
            delay = self.config.redeliver_delay(delivered)
            logger.warning(
                "%s delivery %d failed (%r); again in %.1fs",
                self.stream.name,
                delivered,
                exc,
                delay,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        reason = f"not handled after {delivered} deliveries: {exc!r}"
        try:
            if self._exhausted is not None:
                await self._exhausted(msg.data, reason)
            await msg.term()
        except Exception:
            # Left unacked: the server's max-deliveries advisory brings it back to us.
            logger.exception("dead-lettering a message of %s failed", self.stream.name)

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        """The last delivery of a message was never settled (its handler's process died or
        hung past the ack wait): dead-letter it from the copy still in the stream."""
        assert self._exhausted is not None
        try:
            info = json.loads(advisory.data)
            stored = await self._js.get_msg(self.stream.name, int(info["stream_seq"]))
            reason = f"not acknowledged after {info.get('deliveries', self.max_deliver)} deliveries"
            await self._exhausted(stored.data or b"", reason)
        except Exception:
            logger.exception("handling a max-deliveries advisory of %s failed", self.stream.name)
