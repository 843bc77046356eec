"""The user message a payload carries, read as upstream reads it."""

from __future__ import annotations

import json

import pytest

from cordum.server.context.payload import Payload, parse_payload


def j(doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (j({"prompt": "hi", "message": "no"}), Payload("hi")),
        (j({"prompt": "  ", "message": "from message"}), Payload("from message")),
        (j({"prompt": 7, "message": "not a string prompt"}), Payload("not a string prompt")),
        (j({"instruction": "fix it"}), Payload("fix it")),
        (
            j({"instruction": "fix it", "code_snippet": "\n    return 1\n"}),
            Payload("Instruction: fix it\nCode:\n    return 1"),
        ),
        (j({"prompt": "p", "file_path": "src/a.py"}), Payload("p", "src/a.py")),
        (b"plain text question\n", Payload("plain text question")),
        (b"", Payload("")),
    ],
)
def test_message_extraction(raw: bytes, expected: Payload) -> None:
    assert parse_payload(raw) == expected


def test_json_without_known_fields_is_the_whole_payload() -> None:
    raw = j({"query": "x", "file_path": "a.py"})
    assert parse_payload(raw) == Payload(raw.decode(), "a.py")
    assert parse_payload(b"[1, 2]") == Payload("[1, 2]")
    assert parse_payload(b'"just a string"') == Payload('"just a string"')


def test_invalid_utf8_is_replaced_not_refused() -> None:
    assert parse_payload(b"caf\xe9 au lait").message == "caf\ufffd au lait"
