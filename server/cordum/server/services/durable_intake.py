"""The scheduler's intake in JetStream mode: submits and results come from durable consumers
instead of core subscriptions, and jobs whose messages could not be handled in
`max_deliver` deliveries are dead-lettered.

Dead-lettering goes through the namespace's DLQ stream so that it cannot be lost either: the
last failed delivery publishes an `undeliverable` notice on `<ns>sys.job.dlq` (acked by the
stream) and is terminated; the DLQ consumer then ends the job FAILED with a DLQ entry
(`error_code` = ``max_deliveries_exceeded``, the reason in the message), retrying for as long
as it takes (Redis down for longer than the redeliveries lasted is the usual reason to get
here). Every other DLQ notice already has its entry (the job scripts write it with the
terminal state) and is only acked. A notice for a job Redis does not know (a bus submit whose
record was never written) stays in the DLQ stream, the only place it can be seen.
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cordum.sdk import cap
from cordum.server.jetstream import DurableConsumer, JetStreamConfig, Streams
from cordum.server.services.scheduler import Scheduler, now_ms
from cordum.server.stores.jobs import ACTIVE

logger = logging.getLogger(__name__)

UNDELIVERABLE = "max_deliveries_exceeded"


class DurableIntake:
    def __init__(
        self, *, nats: NATS, scheduler: Scheduler, streams: Streams, config: JetStreamConfig
    ) -> None:
        self.scheduler = scheduler
        durable = streams.durable("scheduler")
        self.consumers = [
            DurableConsumer(
                nats,
                stream=streams.submit,
                durable=durable,
                handle=scheduler.admit_messages,
                exhausted=self.dead_letter,
                config=config,
            ),
            DurableConsumer(
                nats,
                stream=streams.results,
                durable=durable,
                handle=scheduler.complete_messages,
                exhausted=self.dead_letter,
                config=config,
                deliver_new=True,
            ),
            DurableConsumer(
                nats,
                stream=streams.dlq,
                durable=durable,
                handle=self.apply_dead_letters,
                config=config,
                max_deliver=-1,
            ),
        ]

    async def start(self) -> None:
        for consumer in self.consumers:
            await consumer.start()

    async def stop(self) -> None:
        for consumer in reversed(self.consumers):
            await consumer.stop()

    async def dead_letter(self, data: bytes, reason: str) -> None:
        """A submit or result that will not be delivered again: its job goes to the DLQ."""
        try:
            packet = cap.decode(data)
        except cap.PacketError:
            # Undecodable messages are acked by the handlers, so this is not expected.
            logger.error("dropped an undeliverable message that does not decode: %s", reason)
            return
        job_id = packet.job_request.job_id or packet.job_result.job_id
        if not job_id:
            logger.error("dropped an undeliverable message without a job id: %s", reason)
            return
        logger.error("job %s: its %s was %s", job_id, packet.WhichOneof("payload"), reason)
        await self.scheduler.publish_dlq(job_id, "FAILED", UNDELIVERABLE, reason)

    async def apply_dead_letters(self, msgs: list[Msg]) -> None:
        sched = self.scheduler
        for msg in msgs:
            packet = sched.inbound.packet(msg, "dlq")
            if packet is None or packet.job_result.error_code != UNDELIVERABLE:
                continue
            result = packet.job_result
            outcome = await sched.store.transition(
                result.job_id,
                allowed_from=ACTIVE,
                to="FAILED",
                message=result.error_message,
                now_ms=now_ms(),
                dlq_status="JOB_STATUS_FAILED",
                dlq_code=UNDELIVERABLE,
                fields={"error_code": UNDELIVERABLE, "error_message": result.error_message},
            )
            if outcome.ok:
                await sched.events.publish(result.job_id, "FAILED", result.error_message)
            elif outcome.missing:
                logger.error("undeliverable job %s is not in the job store", result.job_id)
