"""The one way in from the bus: every NATS subscription of the platform decodes through
:class:`Inbound`, which parses, checks and verifies a message, or drops and counts it.

A message that is dropped never reaches its handler, so it can change no state, and decoding
never raises. Drops are counted in ``cordum_bus_packets_dropped_total{subject_kind, reason}``:

==================  ===================================================================
reason              the message ...
==================  ===================================================================
``malformed``       does not parse as the subject's type (a BusPacket on CAP subjects)
``invalid``         is a BusPacket a CAP 2.17 worker would refuse (envelope or payload)
``wrong_payload``   is a valid BusPacket with another payload than the subject carries
``unsigned``        (``bus_verify=require``) carries no signature
``unknown_sender``  (``require``) is signed by a sender we hold no key for
``bad_signature``   (``require``) carries a signature that does not verify
==================  ===================================================================

``subject_kind`` is one of the keys of :data:`PACKET_PAYLOADS` (CAP subjects) or a kind of our
own messages (``job_event``, ``run_event``, ``run_advance``, ``policy_event``); it is a small
fixed set, unlike the subjects themselves (job events carry the state in theirs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

from nats.aio.msg import Msg

from cordum.sdk import cap
from cordum.server.bus_trust import BusTrust
from cordum.server.metrics import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# CAP subjects we consume -> the one payload each carries.
PACKET_PAYLOADS: Final[Mapping[str, str]] = {
    "submit": "job_request",
    "result": "job_result",
    "progress": "job_progress",
    "cancel": "job_cancel",
    "heartbeat": "heartbeat",
    "handshake": "handshake",
    "dlq": "job_result",
    "workflow_event": "alert",
    "alert": "alert",
}

# Our own (non-CAP) message kinds.
MESSAGE_KINDS: Final = ("job_event", "run_event", "run_advance", "policy_event")

# cap.PacketError reasons that are ours to name differently; the rest are "invalid".
_REASONS: Final[Mapping[str, str]] = {
    "malformed": "malformed",
    "wrong_payload": "wrong_payload",
    "missing_signature": "unsigned",
    "unknown_sender": "unknown_sender",
    "bad_signature": "bad_signature",
}


class Inbound:
    """Decodes what the subscriptions of one App receive. ``Inbound()`` checks no
    signatures and counts nowhere (the default of services built outside an App)."""

    # A flood of bad packets must not flood the log too: at most one warning per
    # (kind, reason) in this many seconds, saying how many were dropped meanwhile (the
    # metric counts every one).
    LOG_EVERY_S = 10.0

    def __init__(self, trust: BusTrust | None = None, metrics: Metrics | None = None) -> None:
        self.trust = trust or BusTrust()
        self._metrics = metrics
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def packet(self, msg: Msg, kind: str) -> cap.BusPacket | None:
        """The BusPacket of a message on a CAP subject of `kind` (a key of PACKET_PAYLOADS),
        with that kind's payload; ``None`` when it was dropped."""
        expected = PACKET_PAYLOADS[kind]  # outside the try: a wrong kind is our bug, not a drop
        try:
            packet = cap.decode(msg.data)
            payload = packet.WhichOneof("payload")
            if payload != expected:
                raise cap.PacketError("wrong_payload", f"{payload} where {expected} belongs")
            if self.trust.require:
                self.trust.check_packet(packet)
        except cap.PacketError as exc:
            self._drop(msg, kind, exc.reason, exc.detail)
            return None
        except Exception as exc:  # whatever the parser may raise on hostile bytes
            self._drop(msg, kind, "malformed", repr(exc))
            return None
        return packet

    def message(self, msg: Msg, kind: str, parse: Callable[[bytes], T]) -> T | None:
        """One of our own messages of `kind`, parsed by `parse` (which raises on bytes it
        does not accept); ``None`` when it was dropped."""
        try:
            parsed = parse(msg.data)
            if self.trust.require:
                self.trust.check_message(msg.headers, msg.data)
        except cap.PacketError as exc:
            self._drop(msg, kind, exc.reason, exc.detail)
            return None
        except Exception as exc:
            self._drop(msg, kind, "malformed", repr(exc))
            return None
        return parsed

    def _drop(self, msg: Msg, kind: str, reason: str, detail: str) -> None:
        label = _REASONS.get(reason, "invalid")
        if self._metrics is not None:
            self._metrics.bus_dropped.labels(kind, label).inc()
        now = time.monotonic()
        last, quiet = self._logged.get((kind, label), (-self.LOG_EVERY_S, 0))
        if now - last < self.LOG_EVERY_S:
            self._logged[(kind, label)] = (last, quiet + 1)
            return
        self._logged[(kind, label)] = (now, 0)
        # The detail is ours (CAP's `<field>: <problem>` texts), never the raw payload.
        logger.warning(
            "dropped %s message on %s (%s): %.300s%s",
            kind,
            msg.subject,
            label,
            detail,
            f" (and {quiet} more like it since the last warning)" if quiet else "",
        )
