"""Bus signing keys and the one inbound decode path, without servers.

What the control plane signs must verify with CAP's rule (cordum.sdk.cap.Verifier, itself
checked against golden packets and the real SDK); what it receives is parsed, checked,
verified and, when refused, counted under one of a few fixed reasons.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from cordum.agent.v1 import heartbeat_pb2, job_pb2
from cordum.sdk import cap
from cordum.server.bus_trust import (
    SENDER_HEADER,
    SIGNATURE_HEADER,
    BusTrust,
    load_public_keys,
)
from cordum.server.inbound import Inbound
from cordum.server.metrics import Metrics
from cordum.server.settings import Settings

OURS = "cordum-scheduler"


def request_packet(sender: str = "client-a", job_id: str = "job-1") -> cap.BusPacket:
    request = job_pb2.JobRequest(job_id=job_id, topic="job.echo", context_ptr="redis://ctx:x")
    return cap.envelope(sender_id=sender, trace_id="trace-1", job_request=request)


def heartbeat_packet(sender: str = "worker-a") -> cap.BusPacket:
    return cap.envelope(
        sender_id=sender, trace_id=sender, heartbeat=heartbeat_pb2.Heartbeat(worker_id=sender)
    )


def pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def msg(data: bytes, subject: str = "sys.job.submit", headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


@pytest.fixture
def ours() -> cap.Signer:
    return cap.Signer.generate()


@pytest.fixture
def client() -> cap.Signer:
    return cap.Signer.generate()


@pytest.fixture
def trust(ours: cap.Signer, client: cap.Signer) -> BusTrust:
    return BusTrust(
        signer=ours, sender_id=OURS, public_keys={"client-a": client.public_key}, require=True
    )


def drops(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["subject_kind"], s.labels["reason"]): s.value
        for metric in metrics.bus_dropped.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


# -- keys from settings ---------------------------------------------------------------------


def test_public_keys_load_from_a_directory_and_from_a_mapping_file(
    tmp_path: Path, client: cap.Signer, ours: cap.Signer
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "client-a.pem").write_text(pem(client.public_key))
    (keys / "worker-b.pem").write_text(pem(ours.public_key))
    (keys / "README.txt").write_text("not a key")  # only *.pem files count
    loaded = load_public_keys(keys)
    assert sorted(loaded) == ["client-a", "worker-b"]
    assert loaded["client-a"].public_numbers() == client.public_key.public_numbers()

    mapping = tmp_path / "keys.yaml"
    mapping.write_text(f"client-a: |\n  {pem(client.public_key).replace(chr(10), chr(10) + '  ')}")
    assert sorted(load_public_keys(mapping)) == ["client-a"]


def test_bad_keys_fail_naming_the_sender(tmp_path: Path) -> None:
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    p384 = pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    for sender, text in (("not-pem", "hello"), ("rsa", rsa_pem), ("p384", p384)):
        path = tmp_path / f"{sender}.json"
        path.write_text(f'{{"{sender}": {text!r}}}'.replace("'", '"').replace("\n", "\\n"))
        with pytest.raises(ValueError, match=repr(sender)):
            load_public_keys(path)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping of sender_id"):
        load_public_keys(listing)


def test_settings_build_the_trust_and_refuse_require_without_our_key(
    tmp_path: Path, ours: cap.Signer, client: cap.Signer
) -> None:
    key_file = tmp_path / "ours.pem"
    key_file.write_bytes(ours.private_pem())
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "client-a.pem").write_text(pem(client.public_key))

    trust = BusTrust.from_settings(
        Settings(bus_private_key_file=key_file, bus_public_keys=keys, bus_verify="require")
    )
    assert trust.require and trust.signs
    assert trust.senders == ["client-a", OURS]
    inline = BusTrust.from_settings(
        Settings(bus_private_key=SecretStr(ours.private_pem().decode()))
    )
    assert inline.signs and not inline.require
    assert not BusTrust.from_settings(Settings()).signs

    with pytest.raises(ValueError, match="needs our own key"):
        BusTrust.from_settings(Settings(bus_public_keys=keys, bus_verify="require"))
    with pytest.raises(ValueError, match="not both"):
        BusTrust.from_settings(
            Settings(
                bus_private_key=SecretStr(ours.private_pem().decode()),
                bus_private_key_file=key_file,
            )
        )
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ValueError, match="P-256 PEM private key"):
        BusTrust.from_settings(Settings(bus_private_key_file=tmp_path / "junk.pem"))
    with pytest.raises(ValueError):
        Settings(bus_verify="sometimes")


# -- signing and checking -------------------------------------------------------------------


def test_our_packets_verify_with_caps_rule(trust: BusTrust, ours: cap.Signer) -> None:
    data = trust.encode(request_packet(sender=OURS))
    packet = cap.decode(data, cap.Verifier({OURS: ours.public_pem()}))
    assert len(packet.signature) >= 68
    # Canonical bytes: what CAP re-serializes is exactly what we sent.
    assert packet.SerializeToString(deterministic=True) == data
    # Without a key nothing is signed, and the bytes are plain cap.encode's.
    plain = request_packet(sender=OURS)
    assert BusTrust().encode(plain) == cap.encode(plain)
    assert BusTrust().headers(b"x") is None


def test_packet_checks_name_what_is_wrong(
    trust: BusTrust, client: cap.Signer, ours: cap.Signer
) -> None:
    trust.check_packet(cap.decode(cap.encode(request_packet(), signer=client)))

    def reason(packet: cap.BusPacket) -> str:
        with pytest.raises(cap.PacketError) as caught:
            trust.check_packet(packet)
        return caught.value.reason

    assert reason(request_packet()) == "missing_signature"
    tampered = cap.BusPacket.FromString(cap.encode(request_packet(), signer=client))
    tampered.job_request.job_id = "job-2"
    assert reason(tampered) == "bad_signature"
    stranger = cap.Signer.generate()
    assert reason(cap.decode(cap.encode(request_packet("nobody"), signer=stranger))) == (
        "unknown_sender"
    )
    # A known sender's id with someone else's key.
    assert reason(cap.decode(cap.encode(request_packet(), signer=stranger))) == "bad_signature"
    # Our own key speaks for every sender id we use (gateway, engine, scheduler).
    trust.check_packet(cap.decode(cap.encode(request_packet("workflow-engine"), signer=ours)))
    trust.check_packet(cap.decode(cap.encode(request_packet(OURS), signer=ours)))
    our_id_tampered = cap.BusPacket.FromString(cap.encode(request_packet(OURS), signer=ours))
    our_id_tampered.trace_id = "other"
    assert reason(our_id_tampered) == "bad_signature"


def test_our_own_messages_are_signed_in_headers(trust: BusTrust, client: cap.Signer) -> None:
    headers = trust.headers(b"event bytes")
    assert headers is not None and headers[SENDER_HEADER] == OURS
    trust.check_message(headers, b"event bytes")

    def reason(headers: dict[str, str] | None, data: bytes) -> str:
        with pytest.raises(cap.PacketError) as caught:
            trust.check_message(headers, data)
        return caught.value.reason

    assert reason(headers, b"other bytes") == "bad_signature"
    assert reason(None, b"event bytes") == "missing_signature"
    assert reason({SENDER_HEADER: OURS, SIGNATURE_HEADER: "%%%"}, b"x") == "bad_signature"
    foreign = {
        SENDER_HEADER: "client-a",
        SIGNATURE_HEADER: base64.b64encode(client.sign(b"x")).decode(),
    }
    trust.check_message(foreign, b"x")
    foreign[SENDER_HEADER] = "nobody"
    assert reason(foreign, b"x") == "unknown_sender"


# -- the inbound decode path ----------------------------------------------------------------


def test_inbound_counts_each_drop_under_its_reason(trust: BusTrust, client: cap.Signer) -> None:
    metrics = Metrics(CollectorRegistry())
    inbound = Inbound(trust, metrics)
    signed = cap.encode(request_packet(), signer=client)
    assert inbound.packet(msg(signed), "submit") is not None

    tampered = cap.BusPacket.FromString(signed)
    tampered.job_request.topic = "job.other"
    bad_version = request_packet()
    bad_version.protocol_version = 2
    refused = {
        "malformed": b"\xff\xff",
        "invalid": bad_version.SerializeToString(),
        "wrong_payload": cap.encode(heartbeat_packet("client-a"), signer=client),
        "unsigned": cap.encode(request_packet()),
        "unknown_sender": cap.encode(request_packet("nobody"), signer=cap.Signer.generate()),
        "bad_signature": tampered.SerializeToString(deterministic=True),
    }
    for data in refused.values():
        assert inbound.packet(msg(data), "submit") is None
    assert drops(metrics) == {("submit", reason): 1.0 for reason in refused}

    # Our own messages: parsed by the caller's function, then verified.
    data = b"run-1"
    assert inbound.message(msg(data, headers=trust.headers(data)), "run_advance", bytes.decode)
    assert (
        inbound.message(msg(b"\xff", headers=trust.headers(b"\xff")), "run_advance", bytes.decode)
        is None
    )
    assert inbound.message(msg(data), "run_advance", bytes.decode) is None
    counted = drops(metrics)
    assert counted[("run_advance", "malformed")] == 1
    assert counted[("run_advance", "unsigned")] == 1


def test_without_require_signatures_are_not_asked_for() -> None:
    metrics = Metrics(CollectorRegistry())
    inbound = Inbound(metrics=metrics)
    assert inbound.packet(msg(cap.encode(request_packet())), "submit") is not None
    assert inbound.message(msg(b"run-1"), "run_advance", bytes.decode) == "run-1"
    # Checks that are not about signatures still apply.
    assert inbound.packet(msg(cap.encode(heartbeat_packet())), "submit") is None
    assert drops(metrics) == {("submit", "wrong_payload"): 1.0}
