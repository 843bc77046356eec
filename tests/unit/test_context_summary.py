"""The extractive running summary."""

from __future__ import annotations

from cordum.server.context.model import Message
from cordum.server.context.summary import sentences, summarize


def words(text: str) -> int:
    return len(text.split())


HISTORY = [
    Message("user", "How do I configure the retry policy for deploy jobs? It keeps failing."),
    Message(
        "assistant",
        "Set retry.max_retries in the team config for deploy jobs. "
        "The weather is nice today. "
        "The retry policy applies to every deploy step.",
    ),
    Message("user", "Thanks. What about the retry backoff for deploy jobs?"),
    Message("assistant", "Use retry.backoff_ms; deploy jobs then wait between retry attempts."),
]


def test_sentences() -> None:
    assert sentences("One. Two?  Three!\nFour") == ["One.", "Two?", "Three!", "Four"]


def test_key_sentences_are_kept_in_conversation_order_within_the_budget() -> None:
    summary = summarize("", HISTORY, max_tokens=40, count=words)
    lines = summary.splitlines()
    assert sum(words(line) + 1 for line in lines) <= 40
    assert lines[0] == "user: How do I configure the retry policy for deploy jobs?"
    assert "weather" not in summary
    # Conversation order, whatever the scores.
    order = [
        next(i for i, m in enumerate(HISTORY) if line.split(": ", 1)[1] in m.content)
        for line in lines
    ]
    assert order == sorted(order)


def test_a_bigger_budget_keeps_more() -> None:
    small = summarize("", HISTORY, max_tokens=20, count=words)
    large = summarize("", HISTORY, max_tokens=200, count=words)
    assert set(small.splitlines()) < set(large.splitlines())


def test_the_previous_summary_runs_on() -> None:
    previous = "user: Our cluster is called orion and deploy jobs run there."
    summary = summarize(previous, HISTORY, max_tokens=60, count=words)
    assert summary.splitlines()[0] == previous


def test_repeats_are_kept_once() -> None:
    history = [Message("user", "Deploy the retry fix."), Message("user", "Deploy the retry fix.")]
    assert summarize("", history, max_tokens=100, count=words) == "user: Deploy the retry fix."


def test_nothing_to_say() -> None:
    assert summarize("", [], max_tokens=100, count=words) == ""
    assert summarize("", [Message("user", "ok")], max_tokens=100, count=words) == ""


def test_long_sentences_are_clipped() -> None:
    history = [Message("assistant", "deploy " * 200)]
    (line,) = summarize("", history, max_tokens=1000, count=words).splitlines()
    assert line.endswith("…")
    assert len(line) <= len("assistant: ") + 281
