"""What a request's `logical_payload` asks, read as upstream reads it.

The user message is the first non-empty string of the JSON object's `prompt`, `message`,
`instruction` (with a non-empty `code_snippet` appended as `Instruction: …\\nCode:\\n…`);
anything else (no such field, a JSON array or scalar, not JSON at all) is the whole payload as
text. Bytes that are not UTF-8 are replaced (U+FFFD), never refused: workers send what their
callers gave them. `file_path` (a string) steers RAG retrieval towards that file's chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Payload:
    message: str
    file_path: str = ""


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    return value.strip() if isinstance(value, str) else ""


def parse_payload(raw: bytes) -> Payload:
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return Payload(text.strip())
    file_path = _text(doc, "file_path")
    for name in ("prompt", "message"):
        value = _text(doc, name)
        if value:
            return Payload(value, file_path)
    instruction = _text(doc, "instruction")
    if instruction:
        code = doc.get("code_snippet")
        # Blank lines around the code go, its indentation stays.
        code = code.strip("\r\n") if isinstance(code, str) and code.strip() else ""
        message = f"Instruction: {instruction}\nCode:\n{code}" if code else instruction
        return Payload(message, file_path)
    return Payload(text.strip(), file_path)
