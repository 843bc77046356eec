"""`client.locks`, `client.artifacts`, `client.dlq`, `client.memory` and `client.context`
(async and blocking) against the session app: each namespace's calls, and each one's typed
errors (held lock, unknown entry, bad input naming the field)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordum.sdk import (
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from cordum.sdk.convert import state_name
from cordum.sdk.memory import decode, is_cut
from cordum.server.app import App
from cordum.v1 import dlq_pb2

from support.jobs import make_worker
from support.waiting import eventually


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


def target(cordum: App) -> str:
    return f"127.0.0.1:{cordum.grpc_port}"


# -- locks ------------------------------------------------------------------------------------


async def test_locks_acquire_renew_release_get_and_list(client: AsyncClient, prefix: str) -> None:
    resource = f"locks/{prefix}/a"
    first = await client.locks.acquire(resource, "alice", ttl_ms=5000)
    assert (first.mode, dict(first.owners), first.resource) == ("exclusive", {"alice": 1}, resource)
    assert first.fencing_token > 0

    with pytest.raises(FailedPrecondition) as held:
        await client.locks.acquire(resource, "bob")
    assert held.value.reason == "LOCK_HELD"
    # Re-entrant for the same owner; the token stays that of the outer hold.
    again = await client.locks.acquire(resource, "alice")
    assert (dict(again.owners), again.fencing_token) == ({"alice": 2}, first.fencing_token)

    renewed = await client.locks.renew(resource, "alice", ttl_ms=60_000)
    assert renewed.expires_at.ToMilliseconds() > first.expires_at.ToMilliseconds()
    assert (await client.locks.get(resource)).owners["alice"] == 2
    with pytest.raises(FailedPrecondition) as not_held:
        await client.locks.renew(resource, "bob")
    assert not_held.value.reason == "LOCK_NOT_HELD"

    shared = [f"locks/{prefix}/s{n}" for n in range(3)]
    for name in shared:
        lock = await client.locks.acquire(name, "r1", mode="shared")
        assert lock.fencing_token == 0
        await client.locks.acquire(name, "r2", mode="shared")
    listed = [
        lock.resource async for lock in client.locks.list(prefix=f"locks/{prefix}/", page_size=2)
    ]
    assert listed == sorted([resource, *shared])
    assert len([x async for x in client.locks.list(prefix=f"locks/{prefix}/", limit=2)]) == 2

    one_left = await client.locks.release(resource, "alice")
    assert one_left.released and dict(one_left.lock.owners) == {"alice": 1}
    gone = await client.locks.release(resource, "alice")
    assert gone.released and not gone.HasField("lock")
    with pytest.raises(NotFound) as missing:
        await client.locks.get(resource)
    assert missing.value.reason == "LOCK_NOT_FOUND"
    # A new exclusive hold takes a larger token than any before it.
    assert (await client.locks.acquire(resource, "bob")).fencing_token > first.fencing_token


async def test_locks_bad_input_names_the_field(client: AsyncClient, prefix: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await client.locks.acquire(f"locks/{prefix}", "me", mode="sometimes", ttl_ms=-1)
    assert set(bad.value.field_violations) == {"mode", "ttl_ms"}
    with pytest.raises(InvalidArgument) as no_owner:
        await client.locks.acquire(f"locks/{prefix}", "")
    assert set(no_owner.value.field_violations) == {"owner"}
    with pytest.raises(NotFound):
        await client.locks.get(f"locks/{prefix}")  # nothing was written


async def test_hold_renews_in_the_background_and_releases(client: AsyncClient, prefix: str) -> None:
    resource = f"hold/{prefix}"
    async with client.locks.hold(resource, ttl_ms=10_000, renew_every=0.1) as held:
        token, first_expiry = held.fencing_token, held.lock.expires_at.ToMilliseconds()
        assert token > 0 and held.owner and not held.lost
        # Renewed while held: the stored expiry moves past the one the acquire set.
        await eventually(
            lambda: client.locks.get(resource),
            until=lambda lock: lock.expires_at.ToMilliseconds() > first_expiry,
            what="a background renewal",
        )
        with pytest.raises(FailedPrecondition):
            await client.locks.acquire(resource, "someone-else")
    with pytest.raises(NotFound):
        await client.locks.get(resource)
    async with client.locks.hold(resource) as later:
        assert later.fencing_token > token


async def test_hold_outlives_its_ttl_at_the_default_pace(client: AsyncClient, prefix: str) -> None:
    """Without `renew_every`, renewals come every third of the TTL: the hold is still there
    after the expiry its acquire set has passed."""
    resource = f"pace/{prefix}"
    async with client.locks.hold(resource, ttl_ms=1500) as held:
        first_expiry = held.lock.expires_at.ToMilliseconds()
        await eventually(
            lambda: asyncio.sleep(0, time.time() * 1000),
            until=lambda now: now > first_expiry + 200,
            what="the first TTL to pass",
        )
        lock = await client.locks.get(resource)
        assert lock.expires_at.ToMilliseconds() > first_expiry and not held.lost


async def test_hold_notices_when_the_lock_is_lost(client: AsyncClient, prefix: str) -> None:
    resource = f"lost/{prefix}"
    async with client.locks.hold(resource, ttl_ms=10_000, renew_every=0.05) as held:
        # Someone releases the hold behind the holder's back: the next renewal is refused.
        await client.locks.release(resource, held.owner)
        await eventually(lambda: asyncio.sleep(0, held.lost), what="the lock marked lost")
        with pytest.raises(NotFound) as why:
            held.check()
        assert why.value.reason == "LOCK_NOT_FOUND"
    # Leaving the block does not fail: there was nothing left to release.
    assert held.lost


async def test_locks_blocking_client(cordum: App, prefix: str) -> None:
    resource = f"sync/{prefix}"

    def blocking() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(target(cordum), timeout=10.0) as sync:
            with sync.locks.hold(resource, ttl_ms=10_000, renew_every=0.1) as held:
                seen["token"] = held.fencing_token
                try:
                    sync.locks.acquire(resource, "other")
                except FailedPrecondition as error:
                    seen["held"] = error.reason
                first = held.lock.expires_at.ToMilliseconds()
                seen["renewed"] = _poll(
                    lambda: sync.locks.get(resource).expires_at.ToMilliseconds() > first
                )
                seen["listed"] = [x.resource for x in sync.locks.list(prefix=f"sync/{prefix}")]
            try:
                sync.locks.get(resource)
            except NotFound as error:
                seen["after"] = error.reason
        return seen

    seen = await asyncio.to_thread(blocking)
    assert seen["token"] > 0 and seen["held"] == "LOCK_HELD" and seen["renewed"]
    assert seen["listed"] == [resource] and seen["after"] == "LOCK_NOT_FOUND"


def _poll(condition: Any, within: float = 10.0) -> bool:
    """Blocking twin of `eventually` for code running in a thread."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# -- artifacts --------------------------------------------------------------------------------


async def mine(client: AsyncClient, prefix: str) -> list[str]:
    return [
        a.artifact_ptr
        async for a in client.artifacts.list()
        if a.metadata.labels.get("t") == prefix
    ]


async def test_artifacts_put_in_chunks_and_read_back_every_way(
    client: AsyncClient, prefix: str, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    saved = await client.artifacts.put(
        data, content_type="application/x-test", labels={"t": prefix}, chunk_size=1000
    )
    assert saved.artifact_ptr.startswith("redis://art:") and saved.size_bytes == len(data)
    assert saved.metadata.sha256 == hashlib.sha256(data).hexdigest()

    head = await client.artifacts.head(saved.artifact_ptr)
    assert (head.size_bytes, head.content_type, head.retention) == (
        len(data),
        "application/x-test",
        "standard",
    )
    assert (await client.artifacts.get(saved.artifact_ptr)).content_base64 == data
    assert await client.artifacts.read(saved.artifact_ptr) == data
    pieces = [p async for p in client.artifacts.chunks(saved.artifact_ptr, chunk_size=4096)]
    assert [len(p) for p in pieces] == [4096, 4096, 2048]

    copy = tmp_path / "copy.bin"
    meta = await client.artifacts.download(saved.artifact_ptr, copy, chunk_size=3000)
    assert copy.read_bytes() == data and meta.sha256 == head.sha256
    assert not (tmp_path / "copy.bin.part").exists()
    into = io.BytesIO()
    await client.artifacts.download(saved.artifact_ptr, into)
    assert into.getvalue() == data

    # From a file (content type from its name) and from an async iterator.
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"k": "v"}))
    from_file = await client.artifacts.put(doc, labels={"t": prefix}, retention="short")
    assert from_file.metadata.content_type == "application/json"

    async def produce() -> AsyncIterator[bytes]:
        for n in range(5):
            yield f"line {n}\n".encode()

    streamed = await client.artifacts.put(produce(), labels={"t": prefix})
    assert await client.artifacts.read(streamed.artifact_ptr) == b"".join(
        f"line {n}\n".encode() for n in range(5)
    )
    assert sorted(await mine(client, prefix)) == sorted(
        [saved.artifact_ptr, from_file.artifact_ptr, streamed.artifact_ptr]
    )

    await client.artifacts.delete(saved.artifact_ptr)
    with pytest.raises(NotFound) as gone:
        await client.artifacts.head(saved.artifact_ptr)
    assert gone.value.reason == "ARTIFACT_NOT_FOUND"
    with pytest.raises(NotFound):
        await client.artifacts.download(saved.artifact_ptr, tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists() and not (tmp_path / "never.bin.part").exists()


async def test_artifacts_refused_uploads_store_nothing(client: AsyncClient, prefix: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await client.artifacts.put(b"x", retention="forever", labels={"t": prefix})
    assert set(bad.value.field_violations) == {"header.retention"}
    with pytest.raises(ResourceExhausted) as large:
        await client.artifacts.put(
            b"x" * 5000, max_bytes=4096, chunk_size=1000, labels={"t": prefix}
        )
    assert large.value.reason == "ARTIFACT_TOO_LARGE"

    with pytest.raises(TypeError):
        await client.artifacts.put("some text", labels={"t": prefix})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as pointer:
        await client.artifacts.head("redis://ctx:nope")
    assert set(pointer.value.field_violations) == {"artifact_ptr"}
    assert await mine(client, prefix) == []


async def test_a_failing_producer_raises_its_own_error(client: AsyncClient, prefix: str) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"first part"
        raise OSError("the disk went away")

    # The producer's own error comes back, not a bare CANCELLED call, and the server kept
    # nothing: the upload never sent its closing `end` message.
    with pytest.raises(OSError, match="the disk went away"):
        await client.artifacts.put(failing(), labels={"t": prefix})
    assert await mine(client, prefix) == []


async def test_artifacts_blocking_client(cordum: App, prefix: str, tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    source.write_bytes(b"0123456789" * 100_000)  # 1 MB: several chunks each way

    def failing() -> Iterator[bytes]:
        yield b"first part"
        raise OSError("the disk went away")

    def blocking() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(target(cordum), timeout=10.0) as sync:
            saved = sync.artifacts.put(source, labels={"t": prefix})
            seen["type"] = saved.metadata.content_type
            seen["head"] = sync.artifacts.head(saved.artifact_ptr).size_bytes
            sync.artifacts.download(saved.artifact_ptr, tmp_path / "back.txt")
            seen["chunks"] = len(list(sync.artifacts.chunks(saved.artifact_ptr)))
            seen["listed"] = [
                a.artifact_ptr
                for a in sync.artifacts.list()
                if a.metadata.labels.get("t") == prefix
            ]
            seen["ptr"] = saved.artifact_ptr
            try:
                sync.artifacts.put(failing(), labels={"t": prefix})
            except OSError as error:
                seen["failed"] = str(error)
            sync.artifacts.delete(saved.artifact_ptr)
            try:
                sync.artifacts.get(saved.artifact_ptr)
            except NotFound as error:
                seen["after"] = error.reason
        return seen

    seen = await asyncio.to_thread(blocking)
    assert seen["type"] == "text/plain" and seen["head"] == 1_000_000
    assert (tmp_path / "back.txt").read_bytes() == source.read_bytes()
    assert seen["chunks"] == 4  # 256 KiB each
    assert seen["listed"] == [seen["ptr"]] and seen["after"] == "ARTIFACT_NOT_FOUND"
    assert seen["failed"] == "the disk went away"


# -- dlq --------------------------------------------------------------------------------------


async def denied(client: AsyncClient, topic: str) -> str:
    submitted = await client.jobs.submit(topic=topic, prompt="x")

    async def entry() -> dlq_pb2.DLQEntry | None:
        try:
            return await client.dlq.get(submitted.job_id)
        except NotFound:
            return None

    await eventually(entry, within=20.0, what=f"dlq entry of {submitted.job_id}")
    return submitted.job_id


async def test_dlq_list_get_retry_and_delete(client: AsyncClient, prefix: str) -> None:
    topic = f"job.t.deny.{prefix}"
    ids = [await denied(client, topic) for _ in range(3)]
    listed = [e async for e in client.dlq.list(topic=topic, page_size=2)]
    assert sorted(e.job_id for e in listed) == sorted(ids)
    assert {e.reason_code for e in listed} == {"safety_denied"}
    assert [e.job_id async for e in client.dlq.list(topic=topic, reason_code="other")] == []
    assert len([e async for e in client.dlq.list(topic=topic, limit=1)]) == 1

    entry = await client.dlq.get(ids[0])
    assert (entry.topic, entry.reason) == (topic, "denied by the test policy")
    retried = await client.dlq.retry(ids[0])
    assert retried.job_id == f"{ids[0]}-retry-1"
    assert retried.job.parent_job_id == ids[0]
    assert list((await client.dlq.get(ids[0])).retry_job_ids) == [retried.job_id]
    # The retry passes the safety gate again, and the policy still denies the topic.
    job = await eventually(
        lambda: client.jobs.get(retried.job_id),
        until=lambda j: state_name(j.state) == "DENIED",
        what="the retry denied",
    )
    assert job.parent_job_id == ids[0]

    await client.dlq.delete(ids[0])
    with pytest.raises(NotFound) as gone:
        await client.dlq.get(ids[0])
    assert gone.value.reason == "DLQ_ENTRY_NOT_FOUND"
    with pytest.raises(NotFound):
        await client.dlq.retry(f"never-{prefix}")
    with pytest.raises(NotFound):
        await client.dlq.delete(f"never-{prefix}")
    with pytest.raises(InvalidArgument) as bad:
        await client.dlq.get("has spaces")
    assert set(bad.value.field_violations) == {"job_id"}
    with pytest.raises(InvalidArgument) as paging:
        await client.dlq.list_page(topic=topic, page_size=-1)
    assert set(paging.value.field_violations) == {"page_size"}


async def test_dlq_blocking_client(cordum: App, client: AsyncClient, prefix: str) -> None:
    topic = f"job.t.deny.{prefix}"
    job_id = await denied(client, topic)

    def blocking() -> dict[str, Any]:
        with Client(target(cordum), timeout=10.0) as sync:
            seen: dict[str, Any] = {"listed": [e.job_id for e in sync.dlq.list(topic=topic)]}
            seen["code"] = sync.dlq.get(job_id).reason_code
            seen["retry"] = sync.dlq.retry(job_id).job_id
            sync.dlq.delete(job_id)
            seen["after"] = [e.job_id for e in sync.dlq.list(topic=topic)]
        return seen

    seen = await asyncio.to_thread(blocking)
    assert seen["listed"] == [job_id] and seen["code"] == "safety_denied"
    assert seen["retry"] == f"{job_id}-retry-1"
    # The denied retry has an entry of its own; the original's is gone.
    assert job_id not in seen["after"]


# -- memory -----------------------------------------------------------------------------------


async def finished_job(client: AsyncClient, nats_url: str, redis_url: str, prefix: str) -> str:
    topic = f"job.t.mem.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def answer(ctx: Any, data: Any) -> Any:
        return {"answer": 42, "echo": data}

    async with worker:
        outcome = await client.jobs.run(topic=topic, input={"question": "life"}, timeout=20)
    assert state_name(outcome.job.state) == "SUCCEEDED"
    return outcome.job.id


async def test_memory_reads_each_kind_of_pointer(
    client: AsyncClient, nats_url: str, redis_url: str, prefix: str
) -> None:
    job_id = await finished_job(client, nats_url, redis_url, prefix)
    ctx = await client.memory.read(f"redis://ctx:{job_id}")
    assert (ctx.kind, ctx.key) == ("context", f"ctx:{job_id}")
    assert decode(ctx) == {"question": "life"} and not is_cut(ctx)
    assert await client.memory.get(f"res:{job_id}") == {"answer": 42, "echo": {"question": "life"}}

    text = await client.artifacts.put(b"plain words", labels={"t": prefix})
    art = await client.memory.read(text.artifact_ptr)
    assert (art.kind, decode(art)) == ("artifact", "plain words")
    blob = await client.artifacts.put(b"\xff\x00\xfe", labels={"t": prefix})
    assert await client.memory.get(blob.artifact_ptr.removeprefix("redis://")) == b"\xff\x00\xfe"

    memory_id = f"chat-{prefix}"
    await client.context.update_memory(memory_id, {"prompt": "hi"}, model_response="hello")
    events = await client.memory.read(f"mem:{memory_id}:events")
    assert (events.kind, events.redis_type, events.length) == ("memory", "list", 2)
    assert [(e["role"], e["content"]) for e in decode(events)] == [
        ("user", "hi"),
        ("assistant", "hello"),
    ]

    with pytest.raises(NotFound) as missing:
        await client.memory.read(f"redis://res:never-{prefix}")
    assert missing.value.reason == "MEMORY_NOT_FOUND"
    with pytest.raises(InvalidArgument) as bad_key:
        await client.memory.read(f"job:{job_id}")
    assert set(bad_key.value.field_violations) == {"key"}
    with pytest.raises(InvalidArgument) as bad_ptr:
        await client.memory.read(f"s3://bucket/{job_id}")
    assert set(bad_ptr.value.field_violations) == {"ptr"}


# -- context ----------------------------------------------------------------------------------


async def test_context_windows_follow_the_memory(client: AsyncClient, prefix: str) -> None:
    memory_id = f"ctx-{prefix}"
    raw = await client.context.build_window(memory_id, "just this", mode="raw")
    assert [(m.role, m.content) for m in raw.messages] == [("user", "just this")]
    assert raw.input_tokens > 0 and raw.output_tokens == 1024

    await client.context.update_memory(
        memory_id, {"prompt": "capital of France?"}, model_response="Paris"
    )
    await client.context.update_memory(
        memory_id, b'{"message": "and Spain?"}', model_response="Madrid"
    )
    chat = await client.context.build_window(
        memory_id, {"prompt": "and Italy?"}, mode="chat", max_output_tokens=50
    )
    assert [(m.role, m.content) for m in chat.messages] == [
        ("user", "capital of France?"),
        ("assistant", "Paris"),
        ("user", "and Spain?"),
        ("assistant", "Madrid"),
        ("user", "and Italy?"),
    ]
    assert chat.output_tokens == 50 and chat.dropped_messages == 0

    # RAW keeps no memory: the chat window is unchanged by a raw update.
    await client.context.update_memory(memory_id, "ignored", model_response="x", mode="raw")
    again = await client.context.build_window(memory_id, "and Italy?", mode="chat")
    assert len(again.messages) == 5

    with pytest.raises(InvalidArgument) as bad:
        await client.context.build_window("has space", "x", max_input_tokens=-1)
    assert set(bad.value.field_violations) == {"memory_id", "max_input_tokens"}
    with pytest.raises(InvalidArgument) as no_memory:
        await client.context.update_memory("", "x", model_response="y", mode="chat")
    assert set(no_memory.value.field_violations) == {"memory_id"}
    with pytest.raises(InvalidArgument) as too_big:
        await client.context.build_window(memory_id, "word " * 200, max_input_tokens=10)
    assert set(too_big.value.field_violations) == {"logical_payload"}
    with pytest.raises(ValueError, match="unknown context mode"):
        await client.context.build_window(memory_id, "x", mode="telepathy")


async def test_memory_and_context_blocking_client(cordum: App, prefix: str) -> None:
    memory_id = f"sync-{prefix}"

    def blocking() -> dict[str, Any]:
        with Client(target(cordum), timeout=10.0) as sync:
            sync.context.update_memory(memory_id, {"prompt": "ping"}, model_response="pong")
            window = sync.context.build_window(memory_id, "again", mode="chat")
            seen: dict[str, Any] = {"roles": [m.role for m in window.messages]}
            seen["events"] = sync.memory.get(f"mem:{memory_id}:events")
            try:
                sync.memory.read(f"ctx:never-{prefix}")
            except NotFound as error:
                seen["missing"] = error.reason
        return seen

    seen = await asyncio.to_thread(blocking)
    assert seen["roles"] == ["user", "assistant", "user"]
    assert [e["content"] for e in seen["events"]] == ["ping", "pong"]
    assert seen["missing"] == "MEMORY_NOT_FOUND"
