"""The running summary of a conversation, built without a model (extractive).

When a memory's history holds more tokens than the trigger (setting
`context_summary_trigger_tokens`, default 2,000), UpdateMemory rebuilds `mem:<id>:summary`
from the previous summary and the stored history:

1. Units: each line of the previous summary first (so what it kept survives after its turns
   are trimmed from the history: the summary *runs*), then each sentence of each history
   message, labelled with its role (`user: …`). A unit is cut at 280 characters.
2. Score: the sum of the conversation-wide frequencies of the unit's distinct content words
   (stop words and words under 3 letters ignored), divided by the square root of its word
   count so that long sentences do not win by length alone. The first sentence of a message
   (usually the question, or the answer's gist) and the previous summary's lines count 1.5 times.
3. Pick: best units first, repeats skipped, until the summary budget (setting
   `context_summary_max_tokens`, default 300) is full; write them in conversation order, one
   per line.

It is cheap, deterministic and honest about what it is: sentences the conversation contained,
never a paraphrase. A model-written summary can take its place behind `summarize` later; the
key and its format (plain text) are upstream's, so a summary another tool wrote is read, and
folded into the next one, the same way.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

from cordum.server.context.model import Message
from cordum.server.context.retrieval import STOP_WORDS

MAX_UNIT_CHARS = 280
LEAD_BONUS = 1.5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _clip(text: str) -> str:
    if len(text) <= MAX_UNIT_CHARS:
        return text
    cut = text[:MAX_UNIT_CHARS].rsplit(" ", 1)[0] or text[:MAX_UNIT_CHARS]
    return cut + "…"


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOP_WORDS]


def summarize(
    previous: str,
    history: Sequence[Message],
    *,
    max_tokens: int,
    count: Callable[[str], int],
) -> str:
    """The new summary text (lines in conversation order), within `max_tokens`."""
    units: list[tuple[str, str, bool]] = []  # (line, text to score, lead)
    for line in previous.splitlines():
        if line.strip():
            text = _clip(line.strip())
            units.append((text, text, True))
    for message in history:
        for i, sentence in enumerate(sentences(message.content)):
            text = _clip(sentence)
            units.append((f"{message.role}: {text}", text, i == 0))

    seen: set[str] = set()
    unique: list[tuple[str, list[str], bool]] = []
    for line, text, lead in units:
        key = " ".join(line.lower().split())
        if key in seen:
            continue
        seen.add(key)
        unique.append((line, _content_words(text), lead))

    frequency = Counter(w for _, words, _ in unique for w in words)
    scores = []
    for _, words, lead in unique:
        distinct = set(words)
        score = sum(frequency[w] for w in distinct) / math.sqrt(len(words)) if words else 0.0
        scores.append(score * (LEAD_BONUS if lead else 1.0))

    chosen: list[int] = []
    used = 0
    for i in sorted(range(len(unique)), key=lambda i: (-scores[i], i)):
        if scores[i] <= 0:
            break
        cost = count(unique[i][0]) + 1  # the line and its newline
        if used + cost > max_tokens:
            continue
        chosen.append(i)
        used += cost
    return "\n".join(unique[i][0] for i in sorted(chosen))
