"""The context engine as REST through Envoy (POST /api/v1/context/window and
/api/v1/context/memory). `logical_payload` is bytes, so base64 in JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx

from cordum.server.app import App

from support.admin import keys_with, rest_reason, rest_violations
from support.context import history, write_chunk, write_history


def b64(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.b64encode(raw).decode()


async def test_chat_turns_and_window_over_rest(cordum: App, rest_url: str, prefix: str) -> None:
    assert cordum.redis is not None
    memory = f"rest-chat-{prefix}"
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        for question, answer in (("Hi, I am Ada.", "Hello Ada."), ("Who am I?", "Ada.")):
            updated = await http.post(
                "/api/v1/context/memory",
                json={
                    "memory_id": memory,
                    "mode": "CONTEXT_MODE_CHAT",
                    "logical_payload": b64({"prompt": question}),
                    "model_response": answer,
                },
            )
            assert updated.status_code == 200, updated.text
            assert updated.json() == {}
        window = await http.post(
            "/api/v1/context/window",
            json={
                "memory_id": memory,
                "mode": "CONTEXT_MODE_CHAT",
                "model": "gpt-4",
                "logical_payload": b64(b"And my name again?"),
                "max_input_tokens": 1000,
            },
        )
    assert window.status_code == 200, window.text
    body = window.json()
    assert body["messages"] == [
        {"role": "user", "content": "Hi, I am Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "Who am I?"},
        {"role": "assistant", "content": "Ada."},
        {"role": "user", "content": "And my name again?"},
    ]
    assert 0 < body["input_tokens"] <= 1000
    assert body["output_tokens"] == 1024
    assert body["dropped_messages"] == 0
    assert len(await history(cordum.redis, memory)) == 4


async def test_rag_window_and_budget_over_rest(cordum: App, rest_url: str, prefix: str) -> None:
    assert cordum.redis is not None
    memory = f"rest-rag-{prefix}"
    await write_chunk(cordum.redis, memory, 0, path="sched/pools.py", content="def pick_pool()")
    await write_chunk(cordum.redis, memory, 1, path="safety/kernel.py", content="deny rules")
    filler = "lorem ipsum " * 40
    await write_history(cordum.redis, memory, [("user", f"{i} {filler}") for i in range(50)])
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        window = await http.post(
            "/api/v1/context/window",
            json={
                "memory_id": memory,
                "mode": "CONTEXT_MODE_RAG",
                "logical_payload": b64({"prompt": "Which pool does the scheduler pick?"}),
                "max_input_tokens": 600,
            },
        )
    assert window.status_code == 200, window.text
    body = window.json()
    messages = body["messages"]
    assert messages[0] == {
        "role": "system",
        "content": "Context from sched/pools.py:\ndef pick_pool()",
    }
    assert messages[-1]["content"] == "Which pool does the scheduler pick?"
    assert all("kernel" not in m["content"] for m in messages)
    assert body["input_tokens"] <= 600
    assert body["dropped_messages"] == 50 - (len(messages) - 2) > 0


async def test_bad_input_is_400_naming_the_field(cordum: App, rest_url: str, prefix: str) -> None:
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        negative = await http.post(
            "/api/v1/context/window",
            json={"mode": "CONTEXT_MODE_RAW", "logical_payload": b64(b"q"), "max_input_tokens": -5},
        )
        assert negative.status_code == 400
        assert rest_reason(negative.json()) == "INVALID_ARGUMENT"
        assert set(rest_violations(negative.json())) == {"max_input_tokens"}

        bad_id = await http.post(
            "/api/v1/context/memory",
            json={
                "memory_id": f"no spaces {prefix}",
                "mode": "CONTEXT_MODE_CHAT",
                "logical_payload": b64(b"q"),
                "model_response": "a",
            },
        )
        assert bad_id.status_code == 400
        assert set(rest_violations(bad_id.json())) == {"memory_id"}

        too_big = await http.post(
            "/api/v1/context/window",
            json={"logical_payload": b64(b"word " * 100), "max_input_tokens": 10},
        )
        assert too_big.status_code == 400
        assert set(rest_violations(too_big.json())) == {"logical_payload"}
    assert await keys_with(cordum, prefix) == []
