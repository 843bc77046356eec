"""The context engine over native gRPC: modes, budgets, retrieval, memory updates, bad
input, tenants, and the upstream sharp edges it fixes."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from cordum.server.app import App
from cordum.server.context.tokens import Tokenizers
from cordum.v1 import context_pb2, job_service_pb2

from support.admin import error_reason, field_violations, keys_with, own_app
from support.context import (
    CHAT,
    RAG,
    RAW,
    C,
    engine,
    history,
    payload,
    roles_and_text,
    write_chunk,
    write_history,
)
from support.jobs import jobs

COUNT = Tokenizers().for_model("")


def tokens_of(reply: C.BuildWindowResponse) -> int:
    """What the window costs, recounted here: framing 4 a message, 3 for the reply."""
    return 3 + sum(4 + COUNT.tokens(m.content) for m in reply.messages)


async def test_raw_mode_is_the_payload_only(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None
    memory = f"raw-{prefix}"
    await write_history(cordum.redis, memory, [("user", "earlier"), ("assistant", "reply")])
    for mode in (RAW, context_pb2.CONTEXT_MODE_UNSPECIFIED):
        reply = await engine(channel).BuildWindow(
            C.BuildWindowRequest(
                memory_id=memory, mode=mode, logical_payload=payload(prompt="What is 2+2?")
            )
        )
        assert roles_and_text(reply) == [("user", "What is 2+2?")]
        assert reply.input_tokens == 3 + 4 + 7
        assert reply.output_tokens == 1024
        assert reply.dropped_messages == 0
    # Plain text is the message too, and max_output_tokens is echoed.
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(mode=RAW, logical_payload=b"plain words", max_output_tokens=77)
    )
    assert roles_and_text(reply) == [("user", "plain words")]
    assert reply.output_tokens == 77


async def test_chat_mode_is_history_then_payload(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None
    stub, memory = engine(channel), f"chat-{prefix}"
    await stub.UpdateMemory(
        C.UpdateMemoryRequest(
            memory_id=memory,
            mode=CHAT,
            logical_payload=payload(prompt="My name is Ada."),
            model_response="  Hello Ada!\n",
        )
    )
    await stub.UpdateMemory(
        C.UpdateMemoryRequest(
            memory_id=memory,
            mode=CHAT,
            logical_payload=payload(message="What is my name?"),
            model_response="Ada.",
        )
    )
    turns = [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada!"),
        ("user", "What is my name?"),
        ("assistant", "Ada."),
    ]
    assert await history(cordum.redis, memory) == turns
    reply = await stub.BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory,
            mode=CHAT,
            logical_payload=payload(instruction="Spell it", code_snippet="print(name)"),
        )
    )
    assert roles_and_text(reply) == [*turns, ("user", "Instruction: Spell it\nCode:\nprint(name)")]
    assert reply.input_tokens == tokens_of(reply)
    assert reply.dropped_messages == 0


async def test_upstream_sharp_edge_rag_retrieves_without_a_file_path(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream's RAG used chunks only for a `file_path` and otherwise only the summary;
    here the summary and the chunks relevant to the question both come."""
    assert cordum.redis is not None
    memory = f"rag-{prefix}"
    invoice = "def invoice_total(lines):\n    return sum(line.amount for line in lines)"
    await write_chunk(
        cordum.redis, memory, 0, path="src/billing/invoice.py", language="python", content=invoice
    )
    await write_chunk(
        cordum.redis, memory, 1, path="src/auth/login.py", content="def login(user, password)"
    )
    await write_chunk(cordum.redis, memory, 2, path="docs/deploy.md", content="helm upgrade")
    await cordum.redis.set(f"mem:{memory}:summary", "user: We work on the billing service.")
    await write_history(cordum.redis, memory, [("user", "hi"), ("assistant", "hello")])

    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory,
            mode=RAG,
            logical_payload=payload(prompt="How is the invoice total computed?"),
        )
    )
    assert roles_and_text(reply) == [
        ("system", "Summary of the conversation so far:\nuser: We work on the billing service."),
        ("system", f"Context from src/billing/invoice.py:\n{invoice}"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "How is the invoice total computed?"),
    ]
    assert reply.input_tokens == tokens_of(reply)


async def test_rag_chunks_matching_file_path_come_first(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None
    memory = f"path-{prefix}"
    await write_chunk(cordum.redis, memory, 0, path="docs/deploy.md", content="deploy with helm")
    await write_chunk(
        cordum.redis, memory, 1, path="src/auth/login.py", content="def login(user, password)"
    )
    # A chunk without content becomes a metadata line, as upstream.
    await write_chunk(
        cordum.redis, memory, 2, path="assets/logo.png", language="binary", bytes=512, loc=0
    )
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory,
            mode=RAG,
            logical_payload=payload(prompt="How do we deploy?", file_path="auth/login.py"),
        )
    )
    assert [m.content.split("\n")[0] for m in reply.messages] == [
        "Context from src/auth/login.py:",
        "Context from docs/deploy.md:",
        "How do we deploy?",
    ]
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory, mode=RAG, logical_payload=payload(prompt="x", file_path="logo.png")
        )
    )
    assert roles_and_text(reply)[0] == (
        "system",
        "Context from assets/logo.png: language=binary, bytes=512, loc=0 (content not stored)",
    )


def big_history(n: int) -> list[tuple[str, str]]:
    filler = "lorem ipsum dolor sit amet " * 20
    return [("user" if i % 2 == 0 else "assistant", f"message {i}: {filler}") for i in range(n)]


async def test_a_huge_history_is_trimmed_to_the_budget(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None
    memory, stored = f"big-{prefix}", big_history(400)
    await write_history(cordum.redis, memory, stored)
    for budget in (150, 2000, 9000):
        reply = await engine(channel).BuildWindow(
            C.BuildWindowRequest(
                memory_id=memory,
                mode=CHAT,
                logical_payload=payload(prompt="Summarise."),
                max_input_tokens=budget,
            )
        )
        kept = roles_and_text(reply)[:-1]
        assert 0 < len(kept) < 400
        assert kept == stored[-len(kept) :]  # the newest, unbroken tail
        assert reply.input_tokens == tokens_of(reply) <= budget
        assert reply.dropped_messages == 400 - len(kept)
        # One more message would not have fitted.
        assert reply.input_tokens + 4 + COUNT.tokens(stored[-len(kept) - 1][1]) > budget
    # The default budget is 8,000.
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(memory_id=memory, mode=CHAT, logical_payload=b"q")
    )
    assert 7000 < reply.input_tokens <= 8000


async def test_upstream_sharp_edge_history_is_not_cut_at_20_entries(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None
    memory, stored = f"long-{prefix}", big_history(400)
    await write_history(cordum.redis, memory, stored)
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory, mode=CHAT, logical_payload=b"q", max_input_tokens=100_000
        )
    )
    assert roles_and_text(reply)[:-1] == stored
    assert reply.dropped_messages == 0


async def test_upstream_sharp_edge_a_message_over_budget_is_refused(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream kept the last message whatever its size and answered over budget."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await engine(channel).BuildWindow(
            C.BuildWindowRequest(
                mode=RAW, logical_payload=payload(prompt="word " * 50), max_input_tokens=20
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(raised.value)
    assert set(violations) == {"logical_payload"}
    assert "max_input_tokens (20)" in violations["logical_payload"]


async def test_upstream_sharp_edge_the_model_picks_the_tokenizer(
    channel: grpc.aio.Channel,
) -> None:
    """Upstream ignored `model` and counted len/4 (here 2 tokens for 10 CJK characters)."""
    text = "这是一个中文分词测试"  # 9 cl100k tokens

    async def input_tokens(model: str) -> int:
        reply = await engine(channel).BuildWindow(
            C.BuildWindowRequest(mode=RAW, model=model, logical_payload=text.encode())
        )
        return reply.input_tokens

    assert await input_tokens("gpt-4") == await input_tokens("") == 3 + 4 + 9
    assert await input_tokens("gpt-4o") == 3 + 4 + 11  # ceil(9 x 1.15)
    assert await input_tokens("claude-3-5-sonnet") == 5 + 5 + 12  # ceil(9 x 1.3)


async def test_upstream_sharp_edge_memory_keys_expire(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream set no TTL on any `mem:*` key; every write refreshes all of them (30 days by
    default), chunks written by others included."""
    assert cordum.redis is not None
    memory = f"ttl-{prefix}"
    chunk = await write_chunk(cordum.redis, memory, 0, path="a.py", content="x")
    await cordum.redis.set(f"mem:{memory}:summary", "user: earlier")
    assert await cordum.redis.ttl(chunk) == -1
    await engine(channel).UpdateMemory(
        C.UpdateMemoryRequest(
            memory_id=memory, mode=CHAT, logical_payload=b"hello", model_response="hi"
        )
    )
    month = 30 * 24 * 3600
    for key in (f"mem:{memory}:events", f"mem:{memory}:summary", f"mem:{memory}:chunks", chunk):
        assert month - 60 < await cordum.redis.ttl(key) <= month, key


async def test_update_memory_trims_history_and_refreshes_ttls(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str
) -> None:
    async with (
        own_app(
            nats_url, redis_url, config_dir, context_history_turns=3, context_memory_ttl_s=1000
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        assert app.redis is not None
        memory = f"trim-{prefix}"
        chunk = await write_chunk(app.redis, memory, 7, path="a.py", content="x")
        # A set member outside the memory gets no TTL from us.
        outsider = f"ctx:outsider-{prefix}"
        await app.redis.set(outsider, "{}")
        await app.redis.sadd(f"mem:{memory}:chunks", outsider)
        for i in range(5):
            await engine(channel).UpdateMemory(
                C.UpdateMemoryRequest(
                    memory_id=memory,
                    mode=RAG,
                    logical_payload=payload(prompt=f"q{i}"),
                    model_response=f"a{i}",
                )
            )
        assert await history(app.redis, memory) == [
            ("user", "q2"),
            ("assistant", "a2"),
            ("user", "q3"),
            ("assistant", "a3"),
            ("user", "q4"),
            ("assistant", "a4"),
        ]
        for key in (f"mem:{memory}:events", f"mem:{memory}:chunks", chunk):
            assert 990 < await app.redis.ttl(key) <= 1000, key
        assert await app.redis.ttl(outsider) == -1
        # An empty model response is not stored; the user message is.
        await engine(channel).UpdateMemory(
            C.UpdateMemoryRequest(memory_id=memory, mode=CHAT, logical_payload=b"q5")
        )
        assert (await history(app.redis, memory))[-2:] == [("assistant", "a4"), ("user", "q5")]
        await app.redis.delete(outsider)


async def test_upstream_sharp_edge_a_running_summary_is_kept(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str
) -> None:
    """Upstream never wrote a summary. Here UpdateMemory rebuilds one once the history is
    over its budget, and RAG windows carry it."""
    conversation = [
        ("How do I configure the retry policy for deploy jobs?", "Set retry.max_retries."),
        ("The weather is nice.", "Indeed it is."),
        ("And the retry backoff for deploy jobs?", "Use retry.backoff_ms for deploy jobs."),
        ("Can deploy jobs retry on a different pool?", "Yes: retry jobs keep their pool."),
    ]
    async with (
        own_app(
            nats_url,
            redis_url,
            config_dir,
            context_summary_trigger_tokens=40,
            context_summary_max_tokens=45,
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        assert app.redis is not None
        memory = f"sum-{prefix}"
        summaries = []
        for question, answer in conversation:
            await engine(channel).UpdateMemory(
                C.UpdateMemoryRequest(
                    memory_id=memory,
                    mode=CHAT,
                    logical_payload=payload(prompt=question),
                    model_response=answer,
                )
            )
            summaries.append(await app.redis.get(f"mem:{memory}:summary"))
        assert summaries[0] is None  # under the trigger: no summary yet
        summary = summaries[-1].decode()
        lines = summary.splitlines()
        assert lines[0] == "user: How do I configure the retry policy for deploy jobs?"
        assert "weather" not in summary
        assert sum(COUNT.tokens(line) + 1 for line in lines) <= 45
        spoken = {f"{r}: {t}" for q, a in conversation for r, t in (("user", q), ("assistant", a))}
        assert set(lines) <= spoken  # extractive: sentences that were said
        assert 0 < await app.redis.ttl(f"mem:{memory}:summary") <= 30 * 24 * 3600

        reply = await engine(channel).BuildWindow(
            C.BuildWindowRequest(memory_id=memory, mode=RAG, logical_payload=b"next?")
        )
        assert roles_and_text(reply)[0] == (
            "system",
            f"Summary of the conversation so far:\n{summary}",
        )


async def test_upstream_sharp_edge_chunk_set_cannot_point_outside_its_memory(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream read whatever key a chunk-set member named."""
    assert cordum.redis is not None
    memory = f"leak-{prefix}"
    secret = json.dumps({"path": "secret.txt", "content": "the password is hunter2"})
    for key in (f"ctx:secret-{prefix}", f"mem:other-{prefix}:chunk:0"):
        await cordum.redis.set(key, secret)
        await cordum.redis.sadd(f"mem:{memory}:chunks", key)
    await write_chunk(cordum.redis, memory, 1, path="ok.txt", content="the password policy")
    reply = await engine(channel).BuildWindow(
        C.BuildWindowRequest(
            memory_id=memory, mode=RAG, logical_payload=payload(prompt="what is the password?")
        )
    )
    assert [m.content for m in reply.messages] == [
        "Context from ok.txt:\nthe password policy",
        "what is the password?",
    ]
    await cordum.redis.delete(f"ctx:secret-{prefix}", f"mem:other-{prefix}:chunk:0")


async def test_upstream_sharp_edge_update_memory_reports_what_it_cannot_store(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream swallowed every problem of UpdateMemory: a CHAT turn without a memory id
    was silently lost. RAW and UNSPECIFIED still keep no memory, as upstream."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await engine(channel).UpdateMemory(
            C.UpdateMemoryRequest(mode=CHAT, logical_payload=b"hello", model_response="hi")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == {"memory_id"}
    for mode in (RAW, context_pb2.CONTEXT_MODE_UNSPECIFIED):
        await engine(channel).UpdateMemory(
            C.UpdateMemoryRequest(
                memory_id=f"raw-{prefix}", mode=mode, logical_payload=b"x", model_response="y"
            )
        )
    assert await keys_with(cordum, prefix) == []


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"max_input_tokens": -1}, {"max_input_tokens"}),
        ({"max_output_tokens": -5}, {"max_output_tokens"}),
        ({"memory_id": "has space"}, {"memory_id"}),
        ({"memory_id": "glob*"}, {"memory_id"}),
        ({"memory_id": "x" * 201}, {"memory_id"}),
        ({"mode": 9}, {"mode"}),
        (
            {"memory_id": "bad id", "mode": 7, "max_input_tokens": -3},
            {"memory_id", "mode", "max_input_tokens"},
        ),
    ],
)
async def test_bad_window_requests_name_their_fields(
    channel: grpc.aio.Channel, request_fields: dict[str, object], fields: set[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await engine(channel).BuildWindow(
            C.BuildWindowRequest(logical_payload=b"q", **request_fields)  # type: ignore[arg-type]
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(raised.value) == "INVALID_ARGUMENT"
    assert set(field_violations(raised.value)) == fields


async def test_bad_updates_write_nothing(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    for fields, named in (
        ({"memory_id": f"bad id {prefix}", "mode": CHAT}, {"memory_id"}),
        ({"memory_id": f"ok-{prefix}", "mode": 12}, {"mode"}),
        ({"memory_id": f"ok-{prefix}/é", "mode": RAG}, {"memory_id"}),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await engine(channel).UpdateMemory(
                C.UpdateMemoryRequest(logical_payload=b"q", model_response="a", **fields)  # type: ignore[arg-type]
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(raised.value)) == named
    assert await keys_with(cordum, prefix) == []


async def test_tenant_bound_callers_only_use_their_own_jobs_memory(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str
) -> None:
    acme, other = f"acme{prefix}", f"other{prefix}"
    async with (
        own_app(
            nats_url,
            redis_url,
            config_dir,
            api_keys=f"{acme}@acme:operator,{other}@globex:operator",
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        assert app.redis is not None
        as_acme, as_other = (("x-api-key", acme),), (("x-api-key", other),)
        submitted = await jobs(channel).SubmitJob(
            job_service_pb2.SubmitJobRequest(prompt="hi", topic=f"job.t.ok.{prefix}"),
            metadata=as_acme,
        )
        memory = f"mem:{submitted.job.id}"
        update = C.UpdateMemoryRequest(
            memory_id=memory, mode=CHAT, logical_payload=b"hello", model_response="hi"
        )
        window = C.BuildWindowRequest(memory_id=memory, mode=CHAT, logical_payload=b"again")

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await engine(channel).UpdateMemory(update, metadata=as_other)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(raised.value) == "MEMORY_NOT_FOUND"
        assert await app.redis.exists(f"mem:{memory}:events") == 0

        await engine(channel).UpdateMemory(update, metadata=as_acme)
        reply = await engine(channel).BuildWindow(window, metadata=as_acme)
        assert roles_and_text(reply) == [
            ("user", "hello"),
            ("assistant", "hi"),
            ("user", "again"),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await engine(channel).BuildWindow(window, metadata=as_other)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # A memory id no job owns is only for callers of every tenant.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await engine(channel).BuildWindow(
                C.BuildWindowRequest(memory_id=f"conv-{prefix}", mode=CHAT, logical_payload=b"q"),
                metadata=as_acme,
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # RAW reads no memory: no check.
        reply = await engine(channel).BuildWindow(
            C.BuildWindowRequest(memory_id=f"conv-{prefix}", mode=RAW, logical_payload=b"q"),
            metadata=as_other,
        )
        assert roles_and_text(reply) == [("user", "q")]
        await app.redis.delete(f"mem:{memory}:events")
