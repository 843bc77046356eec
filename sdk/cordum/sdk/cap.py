"""CAP 2.17 packet helpers shared by the worker runtime and the control plane.

Everything on the bus is a binary ``cordum.agent.v1.BusPacket``. This module holds the subject
names, builds envelopes, encodes them canonically (deterministic serialization, optionally
signed), and decodes them with the same admission rules a ``cap-sdk-python`` 2.17 worker
applies, so that what we accept and what we send match a real CAP worker exactly::

    packet = envelope(sender_id="cordum-scheduler", trace_id=trace, job_request=request)
    await nc.publish(job.topic, encode(packet, signer=signer))
    ...
    packet = decode(msg.data, verifier=verifier)  # raises PacketError(reason, detail)

``PacketError.reason`` is a short stable label (``malformed``, ``missing_trace_id``,
``invalid_job_request``, ``bad_signature``, ...) meant for metric labels and logs; ``detail``
is the human text (in CAP's ``<field>: <problem>`` form for validation failures).

Signatures follow CAP's classic envelope scheme: ECDSA P-256 over SHA-256, DER-encoded in
``BusPacket.signature`` (field 14), computed over the deterministic serialization of the
packet with field 14 cleared. Verification re-serializes the *parsed* packet, as CAP does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError, Message

from cordum.agent.v1 import alert_pb2, buspacket_pb2, job_pb2

__all__ = [
    "MAX_BUDGET_TOKENS",
    "MAX_REPEATED_FIELD_SIZE",
    "PROTOCOL_VERSION",
    "SUBJECT_ALERT",
    "SUBJECT_CANCEL",
    "SUBJECT_DLQ",
    "SUBJECT_HANDSHAKE",
    "SUBJECT_HEARTBEAT",
    "SUBJECT_PROGRESS",
    "SUBJECT_RESULT",
    "SUBJECT_SUBMIT",
    "SUBJECT_WORKFLOW_EVENT",
    "BusPacket",
    "PacketError",
    "Signer",
    "Verifier",
    "context_key",
    "decode",
    "direct_subject",
    "encode",
    "envelope",
    "pointer_key",
    "redis_pointer",
    "result_key",
    "validate",
]

BusPacket = buspacket_pb2.BusPacket

SUBJECT_SUBMIT: Final = "sys.job.submit"
SUBJECT_RESULT: Final = "sys.job.result"
SUBJECT_PROGRESS: Final = "sys.job.progress"
SUBJECT_CANCEL: Final = "sys.job.cancel"
SUBJECT_DLQ: Final = "sys.job.dlq"
SUBJECT_HEARTBEAT: Final = "sys.heartbeat"
SUBJECT_HANDSHAKE: Final = "sys.handshake"
SUBJECT_WORKFLOW_EVENT: Final = "sys.workflow.event"
SUBJECT_ALERT: Final = "sys.alert"

# The only protocol version that exists; CAP workers drop 0 and 2 alike.
PROTOCOL_VERSION: Final = 1

# CAP's anti-DoS bounds on JobRequest collections and budget integers.
MAX_REPEATED_FIELD_SIZE: Final = 1000
MAX_BUDGET_TOKENS: Final = 10_000_000_000

_REDIS_SCHEME: Final = "redis://"
_PAYLOAD_FIELDS: Final = frozenset(
    field.name for field in BusPacket.DESCRIPTOR.oneofs_by_name["payload"].fields
)
_MAX_PRIORITY: Final = job_pb2.JOB_PRIORITY_CRITICAL


def direct_subject(worker_id: str) -> str:
    """The private subject a worker listens on for targeted dispatch (no queue group)."""
    return f"worker.{worker_id}.jobs"


class PacketError(Exception):
    """A packet that a CAP 2.17 worker would drop. ``reason`` is a stable short label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- envelopes and encoding ---------------------------------------------------------------


def envelope(*, sender_id: str, trace_id: str, **payload: Message) -> BusPacket:
    """A ``BusPacket`` with ``created_at`` = now, ``protocol_version`` = 1 and one payload.

    The payload is given as exactly one keyword named like the oneof field, e.g.
    ``envelope(sender_id=..., trace_id=..., job_request=request)``.
    """
    if len(payload) != 1:
        raise TypeError(f"envelope() takes exactly one payload keyword, got {sorted(payload)}")
    ((name, message),) = payload.items()
    if name not in _PAYLOAD_FIELDS:
        raise TypeError(f"{name!r} is not a BusPacket payload (one of {sorted(_PAYLOAD_FIELDS)})")
    packet = BusPacket(trace_id=trace_id, sender_id=sender_id, protocol_version=PROTOCOL_VERSION)
    packet.created_at.FromNanoseconds(time.time_ns())
    getattr(packet, name).CopyFrom(message)
    return packet


def encode(packet: BusPacket, *, signer: Signer | None = None) -> bytes:
    """Validate, optionally sign, and serialize a packet deterministically.

    Validation uses the receiving side's rules (:func:`validate`), because a CAP worker drops
    an invalid packet with nothing but a log line on its side; failing loudly here is the only
    way the sender learns about it. The caller's packet is never modified.
    """
    validate(packet)
    if signer is None:
        return packet.SerializeToString(deterministic=True)
    signed = BusPacket()
    signed.CopyFrom(packet)
    signed.signature = signer.sign(_unsigned_bytes(signed))
    return signed.SerializeToString(deterministic=True)


def decode(data: bytes, verifier: Verifier | None = None) -> BusPacket:
    """Parse and admit a packet like a CAP 2.17 worker: parse, validate, then verify.

    Raises :class:`PacketError`. Without a verifier a ``signature``, if present, is ignored.
    """
    try:
        packet = BusPacket.FromString(data)
    except DecodeError as exc:
        raise PacketError("malformed", str(exc) or "cannot parse BusPacket") from exc
    validate(packet)
    if verifier is not None:
        verifier.verify(packet)
    return packet


def _unsigned_bytes(packet: BusPacket) -> bytes:
    """The bytes a CAP signature covers: deterministic encoding without field 14."""
    if not packet.signature:
        return packet.SerializeToString(deterministic=True)
    unsigned = BusPacket()
    unsigned.CopyFrom(packet)
    unsigned.ClearField("signature")
    return unsigned.SerializeToString(deterministic=True)


# --- structural validation (cap.validate.validate_bus_packet, 2.17) -----------------------


def validate(packet: BusPacket) -> None:
    """Raise :class:`PacketError` unless a CAP 2.17 worker would admit this packet.

    Envelope rules come first (one reason each), then the payload's own rules; all problems of
    the payload are listed in ``detail``. The worker-trust handshake payloads are checked only
    at the envelope level: their extra rules belong to the opt-in trust mode.
    """
    if not packet.trace_id:
        raise PacketError("missing_trace_id", "trace_id: must not be empty")
    if not packet.sender_id:
        raise PacketError("missing_sender_id", "sender_id: must not be empty")
    if packet.protocol_version != PROTOCOL_VERSION:
        raise PacketError(
            "bad_protocol_version",
            f"protocol_version: must equal {PROTOCOL_VERSION}, got {packet.protocol_version}",
        )
    if not packet.HasField("created_at"):
        raise PacketError("missing_created_at", "created_at: must not be nil")
    kind = packet.WhichOneof("payload")
    if kind is None:
        raise PacketError("no_payload", "payload: must not be nil")
    check = _PAYLOAD_CHECKS.get(kind)
    problems = check(packet) if check is not None else []
    if problems:
        raise PacketError(f"invalid_{kind}", "; ".join(problems))


def _job_request_problems(packet: BusPacket) -> list[str]:
    request = packet.job_request
    problems: list[str] = []
    if not request.job_id:
        problems.append("job_request.job_id: must not be empty")
    if not request.topic:
        problems.append("job_request.topic: must not be empty")
    if not 0 <= request.priority <= _MAX_PRIORITY:
        problems.append(f"job_request.priority: invalid value {request.priority}")
    if request.step_index < 0:
        problems.append("job_request.step_index: must not be negative")
    collections = {
        "labels": len(request.labels),
        "meta.risk_tags": len(request.meta.risk_tags),
        "meta.requires": len(request.meta.requires),
    }
    problems.extend(
        f"job_request.{name}: exceeds max size ({MAX_REPEATED_FIELD_SIZE})"
        for name, size in collections.items()
        if size > MAX_REPEATED_FIELD_SIZE
    )
    problems.extend(_budget_problems(request.budget))
    return problems


def _budget_problems(budget: job_pb2.Budget) -> list[str]:
    problems: list[str] = []
    for name in ("max_input_tokens", "max_output_tokens", "max_total_tokens"):
        value = getattr(budget, name)
        if value < 0:
            problems.append(f"job_request.budget.{name}: must not be negative")
        elif value > MAX_BUDGET_TOKENS:
            problems.append(f"job_request.budget.{name}: exceeds max ({MAX_BUDGET_TOKENS})")
    if budget.deadline_ms < 0:
        problems.append("job_request.budget.deadline_ms: must not be negative")
    return problems


def _job_result_problems(packet: BusPacket) -> list[str]:
    result = packet.job_result
    problems: list[str] = []
    if not result.job_id:
        problems.append("job_result.job_id: must not be empty")
    if result.status == job_pb2.JOB_STATUS_UNSPECIFIED:
        problems.append("job_result.status: must not be UNSPECIFIED")
    if result.worker_id != packet.sender_id:
        problems.append("job_result.worker_id: must equal sender_id")
    if result.execution_ms < 0:
        problems.append("job_result.execution_ms: must not be negative")
    return problems


def _heartbeat_problems(packet: BusPacket) -> list[str]:
    if packet.heartbeat.worker_id != packet.sender_id:
        return ["heartbeat.worker_id: must equal sender_id"]
    return []


def _handshake_problems(packet: BusPacket) -> list[str]:
    if packet.handshake.component_id != packet.sender_id:
        return ["handshake.component_id: must equal sender_id"]
    return []


def _job_progress_problems(packet: BusPacket) -> list[str]:
    progress = packet.job_progress
    problems: list[str] = []
    if not progress.job_id:
        problems.append("job_progress.job_id: must not be empty")
    if not 0 <= progress.percent <= 100:
        problems.append("job_progress.percent: must be 0..100")
    if progress.status not in job_pb2.JobStatus.values():
        problems.append("job_progress.status: is invalid")
    return problems


def _job_cancel_problems(packet: BusPacket) -> list[str]:
    cancel = packet.job_cancel
    problems: list[str] = []
    if not cancel.job_id:
        problems.append("job_cancel.job_id: must not be empty")
    if not cancel.requested_by:
        problems.append("job_cancel.requested_by: must not be empty")
    return problems


def _alert_problems(packet: BusPacket) -> list[str]:
    """CAP accepts a legacy alert (level/component/code) or a complete structured one."""
    alert = packet.alert
    problems: list[str] = []
    if not alert.message:
        problems.append("alert.message: must not be empty")
    structured = bool(alert.severity or alert.error_code_enum or alert.source_component)
    if not structured:
        problems.extend(
            f"alert.{name}: must not be empty"
            for name in ("level", "component", "code")
            if not getattr(alert, name)
        )
        return problems
    if alert.severity == alert_pb2.ALERT_SEVERITY_UNSPECIFIED or (
        alert.severity not in alert_pb2.AlertSeverity.values()
    ):
        problems.append("alert.severity: must be specified")
    if alert.error_code_enum == job_pb2.ERROR_CODE_UNSPECIFIED or (
        alert.error_code_enum not in job_pb2.ErrorCode.values()
    ):
        problems.append("alert.error_code_enum: must be specified")
    if alert.source_component != packet.sender_id:
        problems.append("alert.source_component: must equal sender_id")
    return problems


_PAYLOAD_CHECKS: Final[Mapping[str, Callable[[BusPacket], list[str]]]] = {
    "job_request": _job_request_problems,
    "job_result": _job_result_problems,
    "heartbeat": _heartbeat_problems,
    "handshake": _handshake_problems,
    "job_progress": _job_progress_problems,
    "job_cancel": _job_cancel_problems,
    "alert": _alert_problems,
}


# --- signatures (CAP §2.12 a) ---------------------------------------------------------------


class Signer:
    """Signs packets with an ECDSA P-256 private key (SHA-256, DER signatures)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise ValueError("CAP packet signing needs an ECDSA P-256 private key")
        self._key = private_key

    @classmethod
    def generate(cls) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes | str, password: bytes | None = None) -> Signer:
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=password)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("CAP packet signing needs an ECDSA P-256 private key")
        return cls(key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, to persist a key made with :meth:`generate`."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature over SHA-256 of ``data`` (the library hashes; not pre-hashed)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


PublicKey = ec.EllipticCurvePublicKey | bytes | str


class Verifier:
    """Checks packet signatures against a fixed map ``sender_id -> public key``.

    Keys may be given as key objects or PEM (``str``/``bytes``). Like a CAP worker given
    ``public_keys``, an empty map still switches verification on (everything is refused).
    """

    def __init__(self, public_keys: Mapping[str, PublicKey]) -> None:
        self._keys = {sender: _load_public_key(key) for sender, key in public_keys.items()}

    def verify(self, packet: BusPacket) -> None:
        sender = packet.sender_id
        if not packet.signature:
            raise PacketError("missing_signature", f"packet from {sender!r} is not signed")
        key = self._keys.get(sender)
        if key is None:
            raise PacketError("unknown_sender", f"no public key for sender {sender!r}")
        try:
            key.verify(packet.signature, _unsigned_bytes(packet), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise PacketError("bad_signature", f"signature of {sender!r} does not verify") from exc


def _load_public_key(key: PublicKey) -> ec.EllipticCurvePublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    loaded = serialization.load_pem_public_key(key.encode() if isinstance(key, str) else key)
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ValueError("CAP signatures are ECDSA: an elliptic-curve public key is required")
    return loaded


# --- Redis pointers -------------------------------------------------------------------------


def redis_pointer(key: str) -> str:
    """``redis://<key>``. The pointer never names a server: both sides share one Redis."""
    return _REDIS_SCHEME + key


def pointer_key(ptr: str) -> str:
    """The Redis key of a ``redis://<key>`` pointer, taken verbatim (CAP does no URL parsing).

    Raises ``ValueError`` with CAP's failure texts: ``empty pointer``,
    ``unsupported pointer scheme``, ``missing pointer key``.
    """
    if not ptr:
        raise ValueError("empty pointer")
    if not ptr.startswith(_REDIS_SCHEME):
        raise ValueError("unsupported pointer scheme")
    key = ptr[len(_REDIS_SCHEME) :]
    if not key:
        raise ValueError("missing pointer key")
    return key


def context_key(job_id: str) -> str:
    """Where a job's input JSON lives (the key CAP's own tooling uses)."""
    return "ctx:" + job_id


def result_key(job_id: str) -> str:
    """Where a CAP worker writes a job's output JSON."""
    return "res:" + job_id
