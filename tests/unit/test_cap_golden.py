"""CAP 2.17 wire compatibility of :mod:`cordum.sdk.cap`.

Golden packets: the four raw packets captured from a real cap-sdk-python 2.17.0 worker and
probe (reference cap-wire.md §4.3). They were produced by deterministic serialization, so our
re-encoding must reproduce them byte for byte. The admission cases mirror the worker's
``validate_bus_packet`` table (§2.5); the signature cases the classic envelope scheme (§2.12 a).
"""

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cordum.agent.v1 import (
    alert_pb2,
    buspacket_pb2,
    handshake_pb2,
    heartbeat_pb2,
    job_pb2,
)
from cordum.sdk import cap
from cordum.sdk.cap import BusPacket, PacketError

# --- golden packets (full hex from cap-wire.md §4.3) ------------------------------------------

JOB_REQUEST_HEX = (
    "0a2a74726163652d70726f62652d6563686f2d6f6e2d746f7069632d7375626a6563742d6234303031613138"
    "12136361702d70726f62652d7363686564756c65721a0c08e6dc9ad80610e885f9c4012001526d0a2470726f"
    "62652d6563686f2d6f6e2d746f7069632d7375626a6563742d623430303161313812086a6f622e6563686f18"
    "01223072656469733a2f2f6374783a70726f62652d6563686f2d6f6e2d746f7069632d7375626a6563742d62"
    "343030316131386a0764656661756c74"
)

JOB_RESULT_HEX = (
    "0a2a74726163652d70726f62652d6563686f2d6f6e2d746f7069632d7375626a6563742d6234303031613138"
    "12156361702d70726f62652d6563686f2d776f726b65721a0c08e6dc9ad8061098b18cc60120015a710a2470"
    "726f62652d6563686f2d6f6e2d746f7069632d7375626a6563742d623430303161313810051a307265646973"
    "3a2f2f7265733a70726f62652d6563686f2d6f6e2d746f7069632d7375626a6563742d623430303161313822"
    "156361702d70726f62652d6563686f2d776f726b6572"
)

HANDSHAKE_HEX = (
    "0a20323364643763663835346632323333653134373436633633316331363162626212156361702d70726f62"
    "652d6563686f2d776f726b65721a0c08e6dc9ad80610e092bec40120018a01430a156361702d70726f62652d"
    "6563686f2d776f726b657210031a0101220c0a086a6f622e6563686f10012a0d6361702d707974686f6e2f76"
    "3232086a6f622e6563686f"
)

HEARTBEAT_HEX = (
    "0a156361702d70726f62652d6563686f2d776f726b657212156361702d70726f62652d6563686f2d776f726b"
    "65721a0c08ebdc9ad80610c8c0d8c501200162230a156361702d70726f62652d6563686f2d776f726b65725a"
    "086a6f622e6563686f6001"
)

CAPTURED_SECONDS = 1795599974  # 2026-11-25T09:46:14Z, sandbox clock of the capture
PROBE_JOB_ID = "probe-echo-on-topic-subject-b4001a18"
PROBE_TRACE_ID = "trace-" + PROBE_JOB_ID
PROBE_WORKER = "cap-probe-echo-worker"


def _golden(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


def test_golden_job_request() -> None:
    data = _golden(JOB_REQUEST_HEX)
    assert len(data) == 192
    raw = buspacket_pb2.BusPacket.FromString(data)
    packet = cap.decode(data)
    assert packet == raw
    assert packet.trace_id == PROBE_TRACE_ID
    assert packet.sender_id == "cap-probe-scheduler"
    assert packet.protocol_version == 1
    assert packet.created_at.seconds == CAPTURED_SECONDS
    assert packet.WhichOneof("payload") == "job_request"
    request = packet.job_request
    assert request.job_id == PROBE_JOB_ID
    assert request.topic == "job.echo"
    assert request.priority == job_pb2.JOB_PRIORITY_INTERACTIVE
    assert request.context_ptr == "redis://ctx:" + PROBE_JOB_ID
    assert cap.pointer_key(request.context_ptr) == cap.context_key(PROBE_JOB_ID)
    assert request.tenant_id == "default"
    assert cap.encode(packet) == data


def test_golden_job_result() -> None:
    data = _golden(JOB_RESULT_HEX)
    assert len(data) == 198
    packet = cap.decode(data)
    assert packet.trace_id == PROBE_TRACE_ID
    assert packet.sender_id == PROBE_WORKER
    assert packet.created_at.seconds == CAPTURED_SECONDS
    result = packet.job_result
    assert result.job_id == PROBE_JOB_ID
    assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
    assert result.result_ptr == cap.redis_pointer(cap.result_key(PROBE_JOB_ID))
    assert result.worker_id == PROBE_WORKER
    assert result.execution_ms == 0  # absent on the wire
    assert cap.encode(packet) == data


def test_golden_handshake() -> None:
    data = _golden(HANDSHAKE_HEX)
    assert len(data) == 143
    packet = cap.decode(data)
    assert packet.trace_id == "23dd7cf854f2233e14746c631c161bbb"
    assert packet.sender_id == PROBE_WORKER
    assert packet.created_at.seconds == CAPTURED_SECONDS
    handshake = packet.handshake
    assert handshake.component_id == PROBE_WORKER
    assert handshake.role == handshake_pb2.COMPONENT_ROLE_WORKER
    assert list(handshake.supported_versions) == [1]
    assert dict(handshake.capabilities) == {"job.echo": True}
    assert handshake.sdk_version == "cap-python/v2"
    assert list(handshake.ready_topics) == ["job.echo"]
    assert cap.encode(packet) == data


def test_golden_heartbeat() -> None:
    data = _golden(HEARTBEAT_HEX)
    assert len(data) == 99
    packet = cap.decode(data)
    assert packet.trace_id == PROBE_WORKER  # CAP heartbeats use the worker id as trace id
    assert packet.sender_id == PROBE_WORKER
    assert packet.created_at.seconds == CAPTURED_SECONDS + 5
    heartbeat = packet.heartbeat
    assert heartbeat.worker_id == PROBE_WORKER
    assert heartbeat.pool == "job.echo"
    assert heartbeat.max_parallel_jobs == 1
    assert heartbeat.active_jobs == 0
    assert heartbeat.cpu_load == 0.0
    assert cap.encode(packet) == data


def test_our_packets_match_the_captured_shape() -> None:
    """A packet we build like the probe did encodes to the same bytes, timestamp aside."""
    captured = cap.decode(_golden(JOB_REQUEST_HEX))
    ours = cap.envelope(
        sender_id="cap-probe-scheduler",
        trace_id=PROBE_TRACE_ID,
        job_request=job_pb2.JobRequest(
            job_id=PROBE_JOB_ID,
            topic="job.echo",
            priority=job_pb2.JOB_PRIORITY_INTERACTIVE,
            context_ptr=cap.redis_pointer(cap.context_key(PROBE_JOB_ID)),
            tenant_id="default",
        ),
    )
    ours.created_at.CopyFrom(captured.created_at)
    assert cap.encode(ours) == _golden(JOB_REQUEST_HEX)


# --- our own packets round-trip ---------------------------------------------------------------


def _request(**fields: object) -> job_pb2.JobRequest:
    base: dict[str, object] = {
        "job_id": "job-1",
        "topic": "job.echo",
        "context_ptr": "redis://ctx:job-1",
    }
    base.update(fields)
    return job_pb2.JobRequest(**base)


def _packets() -> dict[str, BusPacket]:
    """One valid packet per payload kind (sender ids chosen to satisfy the identity rules)."""
    worker = "w-1"
    return {
        "job_request": cap.envelope(
            sender_id="sched",
            trace_id="t-1",
            job_request=_request(
                priority=job_pb2.JOB_PRIORITY_BATCH,
                env={"B": "2", "A": "1"},
                labels={"z": "1", "a": "2"},
                budget=job_pb2.Budget(max_total_tokens=1000, deadline_ms=5000),
                meta=job_pb2.JobMetadata(risk_tags=["net"], requires=["gpu"]),
            ),
        ),
        "job_result": cap.envelope(
            sender_id=worker,
            trace_id="t-1",
            job_result=job_pb2.JobResult(
                job_id="job-1",
                status=job_pb2.JOB_STATUS_SUCCEEDED,
                result_ptr="redis://res:job-1",
                worker_id=worker,
                execution_ms=12,
            ),
        ),
        "heartbeat": cap.envelope(
            sender_id=worker,
            trace_id=worker,
            heartbeat=heartbeat_pb2.Heartbeat(
                worker_id=worker, active_jobs=2, max_parallel_jobs=4, labels={"zone": "a"}
            ),
        ),
        "handshake": cap.envelope(
            sender_id=worker,
            trace_id="hs",
            handshake=handshake_pb2.Handshake(
                component_id=worker,
                role=handshake_pb2.COMPONENT_ROLE_WORKER,
                supported_versions=[1],
                capabilities={"job.b": True, "job.a": True},
                ready_topics=["job.a", "job.b"],
            ),
        ),
        "job_progress": cap.envelope(
            sender_id=worker,
            trace_id="t-1",
            job_progress=job_pb2.JobProgress(job_id="job-1", percent=50, message="half"),
        ),
        "job_cancel": cap.envelope(
            sender_id="sched",
            trace_id="job-1",
            job_cancel=job_pb2.JobCancel(job_id="job-1", reason="stop", requested_by="ops"),
        ),
        "alert": cap.envelope(
            sender_id="sched",
            trace_id="a-1",
            alert=alert_pb2.SystemAlert(
                message="queue high",
                severity=alert_pb2.ALERT_SEVERITY_WARNING,
                error_code_enum=job_pb2.ERROR_CODE_JOB_RESOURCE_EXHAUSTED,
                source_component="sched",
            ),
        ),
    }


@pytest.mark.parametrize("kind", sorted(_packets()))
def test_own_packets_round_trip(kind: str) -> None:
    packet = _packets()[kind]
    assert packet.protocol_version == cap.PROTOCOL_VERSION
    assert packet.HasField("created_at")
    data = cap.encode(packet)
    assert data == packet.SerializeToString(deterministic=True)
    decoded = cap.decode(data)
    assert decoded == packet
    assert decoded.WhichOneof("payload") == kind
    assert cap.encode(decoded) == data


def test_deterministic_encoding_sorts_map_entries() -> None:
    one = _request(labels={"a": "1", "b": "2", "c": "3"})
    two = _request(labels={"c": "3", "b": "2", "a": "1"})
    first = cap.envelope(sender_id="s", trace_id="t", job_request=one)
    second = cap.envelope(sender_id="s", trace_id="t", job_request=two)
    second.created_at.CopyFrom(first.created_at)
    assert cap.encode(first) == cap.encode(second)


def test_envelope_needs_exactly_one_known_payload() -> None:
    with pytest.raises(TypeError):
        cap.envelope(sender_id="s", trace_id="t")
    with pytest.raises(TypeError):
        cap.envelope(
            sender_id="s",
            trace_id="t",
            job_request=_request(),
            job_cancel=job_pb2.JobCancel(job_id="j", requested_by="x"),
        )
    with pytest.raises(TypeError):
        cap.envelope(sender_id="s", trace_id="t", signature=b"x")  # type: ignore[arg-type]


def test_subjects() -> None:
    assert cap.direct_subject("w-1") == "worker.w-1.jobs"
    assert (cap.SUBJECT_SUBMIT, cap.SUBJECT_RESULT, cap.SUBJECT_HEARTBEAT) == (
        "sys.job.submit",
        "sys.job.result",
        "sys.heartbeat",
    )
    assert cap.SUBJECT_HANDSHAKE == "sys.handshake"
    assert cap.SUBJECT_CANCEL == "sys.job.cancel"


# --- admission (§2.5) -------------------------------------------------------------------------


def _job(mutate: Callable[[BusPacket], None]) -> bytes:
    packet = _packets()["job_request"]
    mutate(packet)
    return packet.SerializeToString(deterministic=True)  # encode() would refuse these


def _of(kind: str, mutate: Callable[[BusPacket], None]) -> bytes:
    packet = _packets()[kind]
    mutate(packet)
    return packet.SerializeToString(deterministic=True)


def _set(path: str, value: object) -> Callable[[BusPacket], None]:
    def mutate(packet: BusPacket) -> None:
        *parents, name = path.split(".")
        target = packet
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)

    return mutate


def _fill(path: str, count: int) -> Callable[[BusPacket], None]:
    def mutate(packet: BusPacket) -> None:
        target = packet
        for parent in path.split("."):
            target = getattr(target, parent)
        if hasattr(target, "extend"):
            target.extend(f"v{i}" for i in range(count))
        else:
            target.update({f"k{i}": "v" for i in range(count)})

    return mutate


def _clear(name: str) -> Callable[[BusPacket], None]:
    return lambda packet: packet.ClearField(name)


INVALID: list[tuple[str, bytes, str]] = [
    ("garbage", b"\x0a\x05ab", "malformed"),
    ("bad wire type", b"\x0f\x01", "malformed"),
    ("empty trace_id", _job(_set("trace_id", "")), "missing_trace_id"),
    ("empty sender_id", _job(_set("sender_id", "")), "missing_sender_id"),
    ("protocol_version 0", _job(_set("protocol_version", 0)), "bad_protocol_version"),
    ("protocol_version 2", _job(_set("protocol_version", 2)), "bad_protocol_version"),
    ("no created_at", _job(_clear("created_at")), "missing_created_at"),
    ("no payload", _job(_clear("job_request")), "no_payload"),
    ("empty job_id", _job(_set("job_request.job_id", "")), "invalid_job_request"),
    ("empty topic", _job(_set("job_request.topic", "")), "invalid_job_request"),
    ("priority 4", _job(_set("job_request.priority", 4)), "invalid_job_request"),
    ("priority -1", _job(_set("job_request.priority", -1)), "invalid_job_request"),
    ("step_index -1", _job(_set("job_request.step_index", -1)), "invalid_job_request"),
    ("1001 labels", _job(_fill("job_request.labels", 1001)), "invalid_job_request"),
    ("1001 risk_tags", _job(_fill("job_request.meta.risk_tags", 1001)), "invalid_job_request"),
    ("1001 requires", _job(_fill("job_request.meta.requires", 1001)), "invalid_job_request"),
    (
        "negative max_input_tokens",
        _job(_set("job_request.budget.max_input_tokens", -1)),
        "invalid_job_request",
    ),
    (
        "max_output_tokens > 1e10",
        _job(_set("job_request.budget.max_output_tokens", cap.MAX_BUDGET_TOKENS + 1)),
        "invalid_job_request",
    ),
    (
        "negative max_total_tokens",
        _job(_set("job_request.budget.max_total_tokens", -5)),
        "invalid_job_request",
    ),
    (
        "negative deadline_ms",
        _job(_set("job_request.budget.deadline_ms", -1)),
        "invalid_job_request",
    ),
    (
        "job_result.worker_id != sender_id",
        _of("job_result", _set("job_result.worker_id", "someone-else")),
        "invalid_job_result",
    ),
    (
        "job_result status unspecified",
        _of("job_result", _set("job_result.status", job_pb2.JOB_STATUS_UNSPECIFIED)),
        "invalid_job_result",
    ),
    (
        "heartbeat.worker_id != sender_id",
        _of("heartbeat", _set("heartbeat.worker_id", "someone-else")),
        "invalid_heartbeat",
    ),
    (
        "handshake.component_id != sender_id",
        _of("handshake", _set("handshake.component_id", "someone-else")),
        "invalid_handshake",
    ),
    (
        "job_cancel without requested_by",
        _of("job_cancel", _set("job_cancel.requested_by", "")),
        "invalid_job_cancel",
    ),
    (
        "job_progress percent 101",
        _of("job_progress", _set("job_progress.percent", 101)),
        "invalid_job_progress",
    ),
    (
        "job_progress percent -1",
        _of("job_progress", _set("job_progress.percent", -1)),
        "invalid_job_progress",
    ),
    ("alert without message", _of("alert", _set("alert.message", "")), "invalid_alert"),
    (
        "structured alert from a forged component",
        _of("alert", _set("alert.source_component", "attacker")),
        "invalid_alert",
    ),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_admission_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as caught:
        cap.decode(data)
    assert caught.value.reason == reason
    assert caught.value.detail
    assert str(caught.value).startswith(reason + ": ")


def test_admission_detail_uses_cap_field_texts() -> None:
    with pytest.raises(PacketError) as caught:
        cap.decode(_job(_set("job_request.priority", 7)))
    assert caught.value.detail == "job_request.priority: invalid value 7"
    with pytest.raises(PacketError) as caught:
        cap.decode(_job(_set("protocol_version", 2)))
    assert caught.value.detail.startswith("protocol_version: must equal 1")


def test_admission_accepts_limits() -> None:
    """The bounds themselves are valid (≤ 1000 entries, budget ≤ 1e10, deadline 0)."""

    def at_limits(packet: BusPacket) -> None:
        packet.job_request.ClearField("labels")
        packet.job_request.meta.ClearField("risk_tags")
        _fill("job_request.labels", 1000)(packet)
        _fill("job_request.meta.risk_tags", 1000)(packet)
        request = packet.job_request
        request.priority = job_pb2.JOB_PRIORITY_CRITICAL
        request.budget.max_input_tokens = cap.MAX_BUDGET_TOKENS
        request.budget.deadline_ms = 0

    packet = cap.decode(_job(at_limits))
    assert len(packet.job_request.labels) == 1000


def test_legacy_alert_is_accepted() -> None:
    packet = cap.envelope(
        sender_id="sched",
        trace_id="a",
        alert=alert_pb2.SystemAlert(level="WARN", message="m", component="c", code="X"),
    )
    assert cap.decode(cap.encode(packet)).alert.level == "WARN"


def test_encode_refuses_what_a_worker_would_drop() -> None:
    packet = _packets()["job_request"]
    packet.protocol_version = 2
    with pytest.raises(PacketError) as caught:
        cap.encode(packet)
    assert caught.value.reason == "bad_protocol_version"


# --- signatures (§2.12 a) ---------------------------------------------------------------------


def test_sign_and_verify() -> None:
    signer = cap.Signer.generate()
    verifier = cap.Verifier({"sched": signer.public_pem()})
    packet = _packets()["job_request"]
    data = cap.encode(packet, signer=signer)
    assert not packet.signature  # the caller's packet is left alone
    decoded = cap.decode(data, verifier)
    assert 68 <= len(decoded.signature) <= 72  # DER SEQUENCE{r, s}
    # The signature covers the deterministic bytes without field 14, as CAP computes them.
    signer.public_key.verify(decoded.signature, cap.encode(packet), ec.ECDSA(hashes.SHA256()))
    # What goes on the wire is the canonical encoding of the signed packet.
    assert data == decoded.SerializeToString(deterministic=True)


def test_tampered_payload_is_rejected() -> None:
    signer = cap.Signer.generate()
    verifier = cap.Verifier({"sched": signer.public_key})
    tampered = BusPacket.FromString(cap.encode(_packets()["job_request"], signer=signer))
    tampered.job_request.topic = "job.evil"
    with pytest.raises(PacketError) as caught:
        cap.decode(tampered.SerializeToString(deterministic=True), verifier)
    assert caught.value.reason == "bad_signature"


def test_signature_by_another_key_is_rejected() -> None:
    verifier = cap.Verifier({"sched": cap.Signer.generate().public_pem().decode()})
    data = cap.encode(_packets()["job_request"], signer=cap.Signer.generate())
    with pytest.raises(PacketError) as caught:
        cap.decode(data, verifier)
    assert caught.value.reason == "bad_signature"


def test_unknown_sender_is_rejected() -> None:
    signer = cap.Signer.generate()
    verifier = cap.Verifier({"someone-else": signer.public_key})
    with pytest.raises(PacketError) as caught:
        cap.decode(cap.encode(_packets()["job_request"], signer=signer), verifier)
    assert caught.value.reason == "unknown_sender"


def test_unsigned_packet_with_a_verifier_is_rejected() -> None:
    verifier = cap.Verifier({"sched": cap.Signer.generate().public_key})
    with pytest.raises(PacketError) as caught:
        cap.decode(cap.encode(_packets()["job_request"]), verifier)
    assert caught.value.reason == "missing_signature"


def test_empty_verifier_refuses_everything() -> None:
    signer = cap.Signer.generate()
    with pytest.raises(PacketError) as caught:
        cap.decode(cap.encode(_packets()["job_request"], signer=signer), cap.Verifier({}))
    assert caught.value.reason == "unknown_sender"


def test_signature_is_ignored_without_a_verifier() -> None:
    data = cap.encode(_packets()["job_request"], signer=cap.Signer.generate())
    assert cap.decode(data).signature


def test_signer_keys() -> None:
    signer = cap.Signer.generate()
    again = cap.Signer.from_pem(signer.private_pem())
    assert again.public_pem() == signer.public_pem()
    assert cap.Signer.from_pem(signer.private_pem().decode()).public_pem() == signer.public_pem()
    with pytest.raises(ValueError):
        cap.Signer(ec.generate_private_key(ec.SECP384R1()))


# --- pointers ---------------------------------------------------------------------------------


def test_pointer_helpers() -> None:
    assert cap.context_key("j") == "ctx:j"
    assert cap.result_key("j") == "res:j"
    assert cap.redis_pointer("ctx:j") == "redis://ctx:j"
    assert cap.pointer_key("redis://ctx:j") == "ctx:j"
    assert cap.pointer_key("redis://ctx/slash-form") == "ctx/slash-form"
    # Verbatim, like CAP: a host in the pointer is part of the key.
    assert cap.pointer_key("redis://127.0.0.1:16379/ctx:x") == "127.0.0.1:16379/ctx:x"


@pytest.mark.parametrize(
    ("ptr", "message"),
    [
        ("", "empty pointer"),
        ("s3://bucket/ctx.json", "unsupported pointer scheme"),
        ("REDIS://ctx:j", "unsupported pointer scheme"),
        ("redis://", "missing pointer key"),
    ],
)
def test_pointer_key_rejects(ptr: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        cap.pointer_key(ptr)
