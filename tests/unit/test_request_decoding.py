"""Request bytes that do not decode: the field they break is found and named."""

from __future__ import annotations

import pytest

from cordum.server.api.request_decoding import (
    Undecodable,
    checked,
    first_bad_field,
    tolerant,
)
from cordum.server.errors import CordumError
from cordum.v1 import job_service_pb2 as J
from cordum.v1 import workflow_service_pb2 as W


def _length_delimited(number: int, payload: bytes) -> bytes:
    tag = number << 3 | 2
    head = bytes([tag]) if tag < 0x80 else bytes([tag & 0x7F | 0x80, tag >> 7])
    return head + bytes([len(payload)]) + payload


# A labels entry (map<string, string>, field 20) whose value is not UTF-8.
BAD_LABELS = _length_delimited(20, b"\x0a\x01a" + b"\x12\x01\xff")
# Step.route_labels (field 22), the same broken entry.
BAD_ROUTE = _length_delimited(22, b"\x0a\x01a" + b"\x12\x01\xff")


def test_good_bytes_decode_to_the_message() -> None:
    deserialize = tolerant(J.SubmitJobRequest.FromString)
    assert deserialize is not None
    message = deserialize(J.SubmitJobRequest(prompt="p").SerializeToString())
    assert message == J.SubmitJobRequest(prompt="p")
    assert checked(message) is message


@pytest.mark.parametrize(
    ("raw", "message_type", "field"),
    [
        (
            J.SubmitJobRequest(prompt="p").SerializeToString() + BAD_LABELS,
            J.SubmitJobRequest,
            "labels.a",  # a map entry is named by its key
        ),
        (_length_delimited(1, BAD_LABELS), J.SubmitJobAndWaitRequest, "job.labels.a"),
        (_length_delimited(1, b"\xff\xfe"), J.SubmitJobRequest, "prompt"),
        (b"\x0a\x05ab", J.SubmitJobRequest, "prompt"),  # length runs past the end
        (b"\xff", J.SubmitJobRequest, "request"),  # not even a whole tag
        # A map of messages: into the value.
        (
            _length_delimited(
                1, _length_delimited(8, b"\x0a\x05fetch" + _length_delimited(2, BAD_ROUTE))
            ),
            W.UpsertWorkflowRequest,
            "workflow.steps.fetch.route_labels.a",
        ),
    ],
)
def test_the_broken_field_is_named(raw: bytes, message_type: type, field: str) -> None:
    deserialize = tolerant(message_type.FromString)
    assert deserialize is not None
    undecodable = deserialize(raw)
    assert undecodable == Undecodable(field, message_type.DESCRIPTOR.full_name)
    with pytest.raises(CordumError) as raised:
        checked(undecodable)
    assert raised.value.code.name == "INVALID_ARGUMENT"
    assert [v.field for v in raised.value.violations] == [field]


def test_fields_that_parse_alone_are_not_blamed() -> None:
    raw = J.SubmitJobRequest(prompt="p", labels={"a": "b"}).SerializeToString()
    assert first_bad_field(raw, J.SubmitJobRequest.DESCRIPTOR) is None
