"""The context engine's small value types."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Mode(IntEnum):
    """cordum.v1.ContextMode, by number."""

    UNSPECIFIED = 0
    RAW = 1
    CHAT = 2
    RAG = 3


@dataclass(frozen=True)
class Message:
    """One message of a window or of a memory's history."""

    role: str
    content: str
