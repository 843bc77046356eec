"""Budget math of a window: what goes in, in what order, what is dropped, and that the
budget is never exceeded."""

from __future__ import annotations

import random

import pytest

from cordum.server.context.model import Message
from cordum.server.context.retrieval import Chunk, ScoredChunk
from cordum.server.context.tokens import CL100K, TokenCounter, Tokenizers
from cordum.server.context.window import (
    SUMMARY_HEADER,
    Candidates,
    OverBudget,
    assemble,
)

# One token per word keeps the arithmetic readable: a message costs 4 + its words.
WORDS = TokenCounter(CL100K, lambda text: len(text.split()))


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def turns(n: int) -> list[Message]:
    return [Message("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(n)]


def chunk(key: str, n_words: int, score: float) -> ScoredChunk:
    return ScoredChunk(Chunk(key=key, path=key, content=words(n_words)), score)


def test_user_message_only() -> None:
    window = assemble(Candidates(user="a b c"), WORDS, 100)
    assert window.messages == [Message("user", "a b c")]
    assert window.input_tokens == 3 + 4 + 3  # reply priming + framing + words
    assert window.dropped == 0


def test_empty_window_costs_nothing() -> None:
    window = assemble(Candidates(user=""), WORDS, 100)
    assert window.messages == []
    assert window.input_tokens == 0


def test_user_message_over_budget_is_refused() -> None:
    with pytest.raises(OverBudget) as raised:
        assemble(Candidates(user=words(20)), WORDS, 26)
    assert (raised.value.needed, raised.value.budget) == (27, 26)
    assert assemble(Candidates(user=words(20)), WORDS, 27).input_tokens == 27


def test_history_keeps_the_newest_tail_that_fits() -> None:
    history = turns(10)  # each message costs 4 + 1
    # reply 3 + user (4 + 1) = 8; 8 + 3 * 5 = 23 leaves room for exactly 3 history messages.
    window = assemble(Candidates(user="q", history=history, history_total=10), WORDS, 24)
    assert window.messages == [*history[-3:], Message("user", "q")]
    assert window.input_tokens == 23
    assert window.dropped == 7


def test_dropped_counts_history_never_read() -> None:
    history = turns(4)
    window = assemble(Candidates(user="q", history=history, history_total=1000), WORDS, 10_000)
    assert window.messages[:-1] == history
    assert window.dropped == 996


def test_history_stops_at_the_first_message_that_does_not_fit() -> None:
    history = [Message("user", "old"), Message("assistant", words(50)), Message("user", "new")]
    window = assemble(Candidates(user="q", history=history, history_total=3), WORDS, 30)
    # The small oldest message would fit, but the history must stay an unbroken tail.
    assert window.messages == [Message("user", "new"), Message("user", "q")]
    assert window.dropped == 2


def test_order_summary_chunks_history_user() -> None:
    candidates = Candidates(
        user="q",
        history=turns(2),
        history_total=2,
        summary="user: earlier",
        chunks=[chunk("best", 2, 2.0), chunk("next", 2, 1.0)],
    )
    window = assemble(candidates, WORDS, 1000)
    assert [m.role for m in window.messages] == ["system"] * 3 + ["user", "assistant", "user"]
    assert window.messages[0].content == SUMMARY_HEADER + "user: earlier"
    assert window.messages[1].content.startswith("Context from best:")
    assert window.messages[2].content.startswith("Context from next:")
    assert window.dropped == 0


def test_oldest_history_goes_first_then_lowest_chunks_then_summary() -> None:
    summary = "s"  # costs 4 + 6 (header words) + 1
    summary_cost = WORDS.message(SUMMARY_HEADER + summary)
    chunks = [chunk("hi", 10, 3.0), chunk("mid", 10, 2.0), chunk("lo", 10, 1.0)]
    chunk_cost = WORDS.message(chunks[0].chunk.message())
    history = turns(6)
    base = 3 + 5  # reply + user "q"
    full = base + summary_cost + 3 * chunk_cost + 6 * 5

    def window_at(budget: int) -> list[str]:
        candidates = Candidates(
            user="q", history=history, history_total=6, summary=summary, chunks=chunks
        )
        window = assemble(candidates, WORDS, budget)
        assert window.input_tokens <= budget
        return [m.content.split(":")[0].split("\n")[0] for m in window.messages]

    assert len(window_at(full)) == 1 + 3 + 6 + 1
    # Short by one: the oldest history message goes.
    assert window_at(full - 1)[4:] == ["m1", "m2", "m3", "m4", "m5", "q"]
    # No room for any history: all six go before any chunk.
    no_history = base + summary_cost + 3 * chunk_cost
    assert window_at(no_history) == [
        "Summary of the conversation so far",
        "Context from hi",
        "Context from mid",
        "Context from lo",
        "q",
    ]
    # Then the lowest-scored chunk, then the next.
    assert window_at(no_history - 1)[1:3] == ["Context from hi", "Context from mid"]
    assert window_at(base + summary_cost + chunk_cost) == [
        "Summary of the conversation so far",
        "Context from hi",
        "q",
    ]
    # The summary goes last; the room it leaves still serves the newest history.
    assert window_at(base + summary_cost) == ["Summary of the conversation so far", "q"]
    assert window_at(base + summary_cost - 1) == ["m4", "m5", "q"]
    assert window_at(base + 4) == ["q"]


def test_a_chunk_too_big_is_skipped_and_a_smaller_one_still_fits() -> None:
    chunks = [chunk("big", 100, 5.0), chunk("small", 2, 1.0)]
    window = assemble(Candidates(user="q", chunks=chunks), WORDS, 40)
    assert [m.content.split(":")[0] for m in window.messages] == ["Context from small", "q"]
    assert window.dropped == 1


def test_the_budget_is_never_exceeded_with_real_tokens() -> None:
    counter = Tokenizers().for_model("gpt-4o")
    rng = random.Random(7)
    vocabulary = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "config",
        "retry",
        "42",
        "{json}",
        "café",
        "数据",
        "—",
        "...",
    ]

    def text(n: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(n))

    for _ in range(200):
        history = [Message("user", text(rng.randint(1, 200))) for _ in range(rng.randint(0, 30))]
        chunks = [
            ScoredChunk(Chunk(key=f"k{i}", path=f"p{i}", content=text(rng.randint(0, 300))), 1.0)
            for i in range(rng.randint(0, 6))
        ]
        candidates = Candidates(
            user=text(rng.randint(1, 50)),
            history=history,
            history_total=len(history),
            summary=text(rng.randint(0, 40)),
            chunks=chunks,
        )
        budget = rng.randint(1, 3000)
        try:
            window = assemble(candidates, counter, budget)
        except OverBudget as error:
            assert error.needed > budget
            continue
        recount = counter.reply + sum(counter.message(m.content) for m in window.messages)
        assert window.input_tokens == recount <= budget
        kept = len(window.messages) - 1
        assert kept + window.dropped == len(history) + len(chunks) + bool(candidates.summary)
