"""What the event streams listen to on the bus, and how each message becomes `cordum.v1.Event`s.

Sources (`<ns>` = this control plane's namespace; CAP's worker-facing subjects have none):

- `<ns>cordum.job.events.>` and `<ns>cordum.job.events` (JobEvent): `job_state`;
- `<ns>cordum.run.events` (GetRunTimelineResponse): one `run_event` per timeline entry;
- BusPackets, kind = payload: `<ns>sys.job.submit` (`job_request`), `sys.job.result` and
  `<ns>sys.job.dlq` (`job_result`), `sys.job.progress` (`job_progress`), `sys.job.cancel`
  and `<ns>sys.job.cancel` (`job_cancel`), `sys.heartbeat`, `sys.handshake`, `sys.alert`;
- `<ns>sys.workflow.event` (BusPacket with a SystemAlert, trace id = run id): `alert` with
  `run_id`.

Job dispatches (`job.<topic>`, `worker.<id>.jobs`) are left out: they repeat the submit with
the job's full context for every attempt, and `job_state` already says where a job went.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg

from cordum.sdk import cap
from cordum.server.bus import Subjects
from cordum.server.inbound import Inbound
from cordum.server.workflows.engine import run_events_subject
from cordum.v1 import event_pb2, job_pb2, run_service_pb2

STREAM_START = "stream_start"
STREAM_END = "stream_end"
JOB_STATE = "job_state"
RUN_EVENT = "run_event"
# BusPacket payloads shown, by oneof name (= the event kind).
JOB_PACKETS = frozenset({"job_request", "job_result", "job_progress", "job_cancel"})
PLATFORM_PACKETS = frozenset({"heartbeat", "handshake", "alert"})
KINDS = frozenset({STREAM_START, STREAM_END, JOB_STATE, RUN_EVENT, *JOB_PACKETS, *PLATFORM_PACKETS})

# message, the App's decoder (signature checks, drop counts), received at -> events
# (empty: nothing to show, or dropped by `Inbound`).
Decoder = Callable[[Msg, Inbound, Timestamp], list[event_pb2.Event]]


@dataclass(frozen=True)
class Source:
    subject: str
    decode: Decoder


def control_event(kind: str, message: str, received_at: Timestamp) -> event_pb2.Event:
    """`stream_start` / `stream_end`: made by the server, not seen on the bus."""
    return event_pb2.Event(kind=kind, message=message, received_at=received_at)


def job_states(msg: Msg, inbound: Inbound, now: Timestamp) -> list[event_pb2.Event]:
    event = inbound.message(msg, "job_event", job_pb2.JobEvent.FromString)
    if event is None:
        return []
    return [
        event_pb2.Event(
            subject=msg.subject,
            received_at=now,
            kind=JOB_STATE,
            job_id=event.job_id,
            job_event=event,
        )
    ]


def run_events(msg: Msg, inbound: Inbound, now: Timestamp) -> list[event_pb2.Event]:
    timeline = inbound.message(msg, "run_event", run_service_pb2.GetRunTimelineResponse.FromString)
    if timeline is None:
        return []
    return [
        event_pb2.Event(
            subject=msg.subject,
            received_at=now,
            kind=RUN_EVENT,
            job_id=entry.job_id,
            run_id=entry.run_id,
            run_event=entry,
        )
        for entry in timeline.events
    ]


def packets(subject_kind: str, *, run_from_trace: bool = False) -> Decoder:
    """BusPackets on a CAP subject of `subject_kind` (a key of inbound.PACKET_PAYLOADS).
    `run_from_trace`: the trace id is a run id (the workflow engine's alerts)."""

    def decode(msg: Msg, inbound: Inbound, now: Timestamp) -> list[event_pb2.Event]:
        packet = inbound.packet(msg, subject_kind)
        if packet is None:
            return []
        kind = packet.WhichOneof("payload") or ""
        event = event_pb2.Event(subject=msg.subject, received_at=now, kind=kind, packet=packet)
        if kind in JOB_PACKETS:
            event.job_id = getattr(packet, kind).job_id
        if run_from_trace:
            event.run_id = packet.trace_id
        return [event]

    return decode


def sources(subjects: Subjects) -> list[Source]:
    """Every subject the streams listen to, each once (without a namespace, the control
    plane's and CAP's cancel subjects are the same)."""
    listed = [
        Source(subjects.job_events_all, job_states),
        Source(subjects.job_events, job_states),
        Source(run_events_subject(subjects), run_events),
        Source(subjects.submit, packets("submit")),
        Source(subjects.dlq, packets("dlq")),
        Source(subjects.cancel, packets("cancel")),
        Source(cap.SUBJECT_CANCEL, packets("cancel")),
        Source(cap.SUBJECT_RESULT, packets("result")),
        Source(cap.SUBJECT_PROGRESS, packets("progress")),
        Source(subjects.workflow_event, packets("workflow_event", run_from_trace=True)),
        Source(cap.SUBJECT_HEARTBEAT, packets("heartbeat")),
        Source(cap.SUBJECT_HANDSHAKE, packets("handshake")),
        Source(cap.SUBJECT_ALERT, packets("alert")),
    ]
    unique: dict[str, Source] = {}
    for source in listed:
        unique.setdefault(source.subject, source)
    return list(unique.values())
