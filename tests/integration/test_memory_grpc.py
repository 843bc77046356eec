"""MemoryService.ReadMemory over native gRPC: ctx:, res:, art: and mem: pointers and keys,
JSON/text/base64 decoding, lists/sets/hashes, the size cap, tenancy and bad input."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from cordum.server.app import App
from cordum.server.errors import CordumError
from cordum.server.jsonvalue import from_value
from cordum.server.services.caller import Caller
from cordum.server.services.memory import MemoryService
from cordum.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    memory_service_pb2,
    memory_service_pb2_grpc,
)

from support.admin import error_reason, field_violations
from support.jobs import J, jobs, json_value, make_worker, wait_state

M = memory_service_pb2


def stub(channel: grpc.aio.Channel) -> memory_service_pb2_grpc.MemoryServiceStub:
    return memory_service_pb2_grpc.MemoryServiceStub(channel)


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def finished_job(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str, **fields: Any
) -> str:
    topic = f"job.t.mem.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"answer": 42, "echo": data}

    async with worker:
        request = J.SubmitJobRequest(topic=topic, **fields)
        request.input.CopyFrom(json_value({"question": "life", "n": [1, 2]}))
        reply = await jobs(channel).SubmitJob(request)
        await wait_state(jobs(channel), reply.job_id, "SUCCEEDED")
    return reply.job_id


async def test_read_a_jobs_input_and_result(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    memory = stub(channel)
    job_id = await finished_job(channel, nats_url, redis_url, prefix)

    ctx = await memory.ReadMemory(M.ReadMemoryRequest(ptr=f"redis://ctx:{job_id}"))
    assert (ctx.pointer, ctx.key, ctx.kind) == (f"redis://ctx:{job_id}", f"ctx:{job_id}", "context")
    assert ctx.redis_type == "string"
    assert from_value(ctx.json) == {"question": "life", "n": [1, 2]}
    assert json.loads(ctx.text) == from_value(ctx.json)
    assert ctx.base64 == ctx.text.encode()
    assert ctx.size_bytes == len(ctx.base64)

    # `key` may be a key or a pointer, with quotes and spaces around it (as upstream).
    for key in (f'"res:{job_id}"', f" redis://res:{job_id} ", f"'res:{job_id}'"):
        res = await memory.ReadMemory(M.ReadMemoryRequest(key=key))
        assert (res.kind, res.key) == ("result", f"res:{job_id}")
        assert from_value(res.json) == {"answer": 42, "echo": {"question": "life", "n": [1, 2]}}

    # No such job (also: an id naming one of a job's own keys, `job:<id>:events`).
    for ptr in (f"redis://ctx:no-{prefix}", f"redis://res:{job_id}:events"):
        missing = await failure(memory.ReadMemory(M.ReadMemoryRequest(ptr=ptr)))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(missing) == "MEMORY_NOT_FOUND"


async def test_read_memory_keys_of_every_type(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    assert cordum.redis is not None
    memory = stub(channel)
    job_id = await finished_job(channel, nats_url, redis_url, prefix)
    base = f"mem:mem:{job_id}"  # the context engine's keys for the default memory id
    events = [{"role": "user", "content": "hi", "ts": 1}, {"role": "assistant", "content": "yo"}]
    await cordum.redis.rpush(f"{base}:events", *[json.dumps(e) for e in events], "plain text")
    await cordum.redis.set(f"{base}:summary", "we said hi")
    await cordum.redis.set(f"mem:{job_id}:blob", b"\xff\x00\xfe")
    await cordum.redis.sadd(f"{base}:chunks", f"{base}:chunk:1", f"{base}:chunk:0")
    await cordum.redis.hset(f"{base}:meta", mapping={"b": '{"x": 1}', "a": "text"})
    await cordum.redis.zadd(f"{base}:scores", {"a": 1})
    try:
        listed = await memory.ReadMemory(M.ReadMemoryRequest(key=f"{base}:events"))
        assert (listed.kind, listed.redis_type, listed.length) == ("memory", "list", 3)
        assert from_value(listed.items) == [*events, "plain text"]

        summary = await memory.ReadMemory(M.ReadMemoryRequest(ptr=f"redis://{base}:summary"))
        assert (summary.redis_type, summary.text) == ("string", "we said hi")
        assert not summary.HasField("json")

        blob = await memory.ReadMemory(M.ReadMemoryRequest(key=f"mem:{job_id}:blob"))
        assert blob.base64 == b"\xff\x00\xfe" and blob.text == "" and blob.size_bytes == 3

        chunks = await memory.ReadMemory(M.ReadMemoryRequest(key=f"{base}:chunks"))
        assert chunks.redis_type == "set" and chunks.length == 2
        assert from_value(chunks.items) == [f"{base}:chunk:0", f"{base}:chunk:1"]

        meta = await memory.ReadMemory(M.ReadMemoryRequest(key=f"{base}:meta"))
        assert meta.redis_type == "hash" and meta.length == 2
        assert from_value(meta.items) == {"a": "text", "b": {"x": 1}}

        zset = await failure(memory.ReadMemory(M.ReadMemoryRequest(key=f"{base}:scores")))
        assert zset.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(zset)) == {"key"}

        # Tenancy: the memory of a job is its tenant's; other tenants do not see it.
        service: MemoryService = cordum.memory
        mine = await service.read("", f"{base}:events", Caller(tenant="default"))
        assert mine.length == 3
        for key in (f"{base}:events", f"mem:{job_id}:blob", f"ctx:{job_id}", f"res:{job_id}"):
            with pytest.raises(CordumError) as hidden:
                await service.read("", key, Caller(tenant="other"))
            assert hidden.value.reason_name == "MEMORY_NOT_FOUND", key
    finally:
        await cordum.redis.delete(
            f"{base}:events",
            f"{base}:summary",
            f"mem:{job_id}:blob",
            f"{base}:chunks",
            f"{base}:meta",
            f"{base}:scores",
        )


async def test_memory_under_a_chosen_id_needs_an_unscoped_caller(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """A job's memory under an id it chose (not `mem:<job_id>`) cannot be traced to a tenant
    from the key alone: tenant-bound callers get NOT_FOUND, unscoped ones read it."""
    assert cordum.redis is not None
    memory_id = f"conv-{prefix}"
    await finished_job(channel, nats_url, redis_url, prefix, memory_id=memory_id)
    key = f"mem:{memory_id}:summary"
    await cordum.redis.set(key, "chosen")
    try:
        read = await stub(channel).ReadMemory(M.ReadMemoryRequest(key=key))
        assert read.text == "chosen"
        with pytest.raises(CordumError) as hidden:
            await cordum.memory.read("", key, Caller(tenant="default"))
        assert hidden.value.reason_name == "MEMORY_NOT_FOUND"
    finally:
        await cordum.redis.delete(key)


async def test_read_an_artifact_and_the_size_cap(cordum: App, channel: grpc.aio.Channel) -> None:
    artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    put = await artifacts.PutArtifact(
        artifact_service_pb2.PutArtifactRequest(content='{"k": [1, 2, 3]}')
    )
    memory = stub(channel)
    read = await memory.ReadMemory(M.ReadMemoryRequest(ptr=put.artifact_ptr))
    assert (read.kind, read.size_bytes) == ("artifact", 16)
    assert from_value(read.json) == {"k": [1, 2, 3]}
    by_key = await memory.ReadMemory(
        M.ReadMemoryRequest(key=put.artifact_ptr.removeprefix("redis://"))
    )
    assert by_key.base64 == b'{"k": [1, 2, 3]}'

    # A reader with a 4-byte cap: the first bytes, the full size, no text/json for a part.
    small = MemoryService(cordum.redis, cordum.store, cordum.artifacts, max_bytes=4)  # type: ignore[arg-type]
    cut = await small.read(put.artifact_ptr, "", Caller())
    assert (cut.raw, cut.size_bytes, cut.text, cut.has_json) == (b'{"k"', 16, None, False)
    assert cordum.redis is not None
    key = f"mem:cap-{put.artifact_ptr[-8:]}"
    await cordum.redis.rpush(key, "abc", "def", "ghi")
    try:
        listed = await small.read("", key, Caller())
        assert (listed.length, listed.items, listed.size_bytes) == (3, ["abc"], 3)
    finally:
        await cordum.redis.delete(key)
    await artifacts.DeleteArtifact(
        artifact_service_pb2.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr)
    )
    gone = await failure(memory.ReadMemory(M.ReadMemoryRequest(ptr=put.artifact_ptr)))
    assert error_reason(gone) == "MEMORY_NOT_FOUND"


async def test_bad_pointers_name_the_field(channel: grpc.aio.Channel) -> None:
    memory = stub(channel)
    cases = [
        (M.ReadMemoryRequest(), "ptr"),
        (M.ReadMemoryRequest(ptr='""'), "ptr"),
        (M.ReadMemoryRequest(ptr="s3://bucket/ctx:1"), "ptr"),
        (M.ReadMemoryRequest(ptr="redis://job:1"), "ptr"),
        (M.ReadMemoryRequest(key="wf:def:x"), "key"),
        (M.ReadMemoryRequest(key="ctx:"), "key"),
        (M.ReadMemoryRequest(key="ctx:has space"), "key"),
        (M.ReadMemoryRequest(key="art:not-an-id"), "key"),
        (M.ReadMemoryRequest(key="mem:" + "x" * 2000), "key"),
    ]
    for request, field in cases:
        error = await failure(memory.ReadMemory(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert set(field_violations(error)) == {field}, request
