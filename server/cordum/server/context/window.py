"""Assembling a window within its token budget (pure: no I/O).

Budget = `max_input_tokens`, counted as the model will be billed: every message's content plus
its framing, plus the reply priming (tokens.py). The current user message is not negotiable:
when it alone (with the framing) exceeds the budget, the request fails; upstream sent an
over-budget window instead. What is left goes, in this priority:

1. the running summary (RAG), one system message;
2. retrieved chunks (RAG), best first; a chunk that does not fit is left out and the next,
   smaller one may still fit;
3. history, newest first, as long as it fits; the first message that does not fit ends it, so
   the history in a window is always the unbroken tail of the conversation.

So when the budget is short, the oldest history goes first, then the lowest-scored chunks,
then the summary; room that a left-out item leaves still serves the items after it.
Window order: summary, chunks, history (oldest first), the user message last.
`dropped` counts the candidates left out: stored history messages not in the window, retrieved
chunks that did not fit, and a summary that did not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cordum.server.context.model import Message
from cordum.server.context.retrieval import ScoredChunk
from cordum.server.context.tokens import TokenCounter

SUMMARY_HEADER = "Summary of the conversation so far:\n"


@dataclass(frozen=True)
class Candidates:
    user: str
    # The newest stored messages, oldest first.
    history: Sequence[Message] = ()
    # How many history messages the memory holds (≥ len(history)).
    history_total: int = 0
    summary: str = ""
    chunks: Sequence[ScoredChunk] = ()


@dataclass(frozen=True)
class Window:
    messages: list[Message] = field(default_factory=list)
    input_tokens: int = 0
    dropped: int = 0


class OverBudget(Exception):
    """The user message alone does not fit."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"needs {needed} tokens, budget {budget}")
        self.needed = needed
        self.budget = budget


def assemble(candidates: Candidates, counter: TokenCounter, budget: int) -> Window:
    user = candidates.user
    used = counter.reply + (counter.message(user) if user else 0)
    if used > budget:
        raise OverBudget(used, budget)
    dropped = 0
    system: list[Message] = []

    def take(message: Message) -> bool:
        nonlocal used
        cost = counter.message(message.content)
        if used + cost > budget:
            return False
        used += cost
        return True

    if candidates.summary:
        summary = Message("system", SUMMARY_HEADER + candidates.summary)
        if take(summary):
            system.append(summary)
        else:
            dropped += 1
    for scored in candidates.chunks:
        message = Message("system", scored.chunk.message())
        if take(message):
            system.append(message)
        else:
            dropped += 1

    kept: list[Message] = []
    for message in reversed(candidates.history):
        if not take(message):
            break
        kept.append(message)
    kept.reverse()
    dropped += max(candidates.history_total, len(candidates.history)) - len(kept)

    messages = [*system, *kept, *([Message("user", user)] if user else [])]
    return Window(messages=messages, input_tokens=used if messages else 0, dropped=dropped)
