"""ArtifactService over native gRPC (Redis backend): put/get, streaming upload and download
of a 20 MiB artifact in chunks with bounded memory, sha256, retention TTLs, size limits,
delete, list, tenancy, bad input, and artifact pointers in job results."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from typing import Any

import grpc
import pytest

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.app import App
from cordum.server.errors import CordumError
from cordum.server.services.artifacts import (
    ArtifactHeader,
    ArtifactLimits,
    ArtifactService,
    single,
)
from cordum.server.services.caller import Caller
from cordum.server.stores.artifacts import ArtifactMetaStore, RedisBackend
from cordum.v1 import artifact_service_pb2, artifact_service_pb2_grpc

from support.admin import error_reason, field_violations, keys_with
from support.artifacts import MiB, digest_of, refused_upload, requests, upload
from support.jobs import J, jobs, make_worker, wait_state

A = artifact_service_pb2


def stub(channel: grpc.aio.Channel) -> artifact_service_pb2_grpc.ArtifactServiceStub:
    return artifact_service_pb2_grpc.ArtifactServiceStub(channel)


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def artifact_keys(app: App, artifact_id: str) -> str:
    return f"{app.settings.namespace}art:{artifact_id}"


async def test_put_and_get_a_small_artifact(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    artifacts = stub(channel)
    body = b"\x00\x01binary\xff" + prefix.encode()
    put = await artifacts.PutArtifact(
        A.PutArtifactRequest(
            content_base64=body,
            content_type="application/x-test",
            retention="short",
            labels={"run": prefix},
        )
    )
    assert put.artifact_ptr.startswith("redis://art:")
    assert put.size_bytes == len(body)
    meta = put.metadata
    assert meta.sha256 == hashlib.sha256(body).hexdigest()
    assert (meta.content_type, meta.retention, meta.backend) == (
        "application/x-test",
        "short",
        "redis",
    )
    # The tenant label is filled in, as upstream does.
    assert dict(meta.labels) == {"run": prefix, "tenant_id": "default"}
    assert meta.expires_at.ToMilliseconds() - meta.created_at.ToMilliseconds() == 24 * 3600_000

    got = await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=put.artifact_ptr))
    assert got.content_base64 == body
    assert got.metadata == meta
    # `art:<id>` works as well as the pointer.
    same = await artifacts.GetArtifact(
        A.GetArtifactRequest(artifact_ptr=put.artifact_ptr.removeprefix("redis://"))
    )
    assert same.content_base64 == body

    # Retention is a Redis TTL on the metadata and on every chunk.
    assert cordum.redis is not None
    artifact_id = put.artifact_ptr.removeprefix("redis://art:")
    for key in (
        artifact_keys(cordum, artifact_id),
        f"{artifact_keys(cordum, artifact_id)}:chunk:0",
    ):
        ttl = await cordum.redis.pttl(key)
        assert 23 * 3600_000 < ttl <= 24 * 3600_000, key

    text = await artifacts.PutArtifact(A.PutArtifactRequest(content="héllo", retention="audit"))
    text_meta = text.metadata
    assert (text.size_bytes, text_meta.content_type) == (6, "text/plain; charset=utf-8")
    assert text_meta.expires_at.seconds - text_meta.created_at.seconds == 30 * 24 * 3600
    standard = await artifacts.PutArtifact(A.PutArtifactRequest(content_base64=b"x"))
    assert standard.metadata.retention == "standard"
    lifetime = standard.metadata.expires_at.seconds - standard.metadata.created_at.seconds
    assert lifetime == 7 * 24 * 3600
    for ptr in (put.artifact_ptr, text.artifact_ptr, standard.artifact_ptr):
        await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=ptr))


async def test_twenty_mib_stream_up_and_down_in_chunks_with_bounded_memory(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    artifacts = stub(channel)
    pieces, size = 80, 256 * 1024  # 20 MiB
    expected = digest_of(pieces, size)
    header = A.ArtifactUploadHeader(content_type="application/octet-stream", labels={"p": prefix})

    tracemalloc.start()
    try:
        put = await artifacts.UploadArtifact(upload(header, pieces, size))
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        digest = hashlib.sha256()
        messages: list[str] = []
        largest = 0
        async for message in artifacts.DownloadArtifact(
            A.DownloadArtifactRequest(artifact_ptr=put.artifact_ptr)
        ):
            kind = message.WhichOneof("part")
            messages.append(kind)
            if kind == "chunk":
                digest.update(message.chunk)
                largest = max(largest, len(message.chunk))
            else:
                assert message.metadata.sha256 == expected
                assert message.metadata.size_bytes == 20 * MiB
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert put.size_bytes == 20 * MiB
    assert put.metadata.sha256 == expected
    assert digest.hexdigest() == expected
    # Metadata first, then 256 KiB chunks (the default).
    assert messages == ["metadata"] + ["chunk"] * 80
    assert largest == 256 * 1024
    # Neither direction held the artifact whole (client and server share this process).
    assert upload_peak < 8 * MiB, upload_peak
    assert download_peak < 8 * MiB, download_peak

    # Stored as 1 MiB chunks: never one Redis value.
    assert cordum.redis is not None
    artifact_id = put.artifact_ptr.removeprefix("redis://art:")
    chunk_keys = await cordum.redis.keys(f"{artifact_keys(cordum, artifact_id)}:chunk:*")
    assert len(chunk_keys) == 20
    for key in chunk_keys:
        assert await cordum.redis.strlen(key) == MiB

    # A client-chosen chunk size, and too large a unary read.
    chunks = [
        m.chunk
        async for m in artifacts.DownloadArtifact(
            A.DownloadArtifactRequest(artifact_ptr=put.artifact_ptr, chunk_size=100_000)
        )
        if m.WhichOneof("part") == "chunk"
    ]
    assert max(len(c) for c in chunks) == 100_000
    assert sum(len(c) for c in chunks) == 20 * MiB
    whole = await failure(
        artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=put.artifact_ptr))
    )
    assert whole.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "DownloadArtifact" in (whole.details() or "")

    await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr))
    assert await cordum.redis.keys(f"{artifact_keys(cordum, artifact_id)}*") == []


async def test_too_large_is_refused_and_leaves_nothing_behind(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    artifacts = stub(channel)
    assert cordum.redis is not None
    before = set(await cordum.redis.keys(f"{cordum.settings.namespace}art*"))

    small = await failure(
        artifacts.PutArtifact(A.PutArtifactRequest(content_base64=b"x" * 11, max_bytes=10))
    )
    assert small.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(small) == "ARTIFACT_TOO_LARGE"

    # Streaming: refused as soon as the limit is passed (after chunks were already stored).
    header = A.ArtifactUploadHeader(labels={"p": prefix}, max_bytes=3 * MiB)
    big = await refused_upload(cordum.grpc_port, requests(header, 20, 256 * 1024))
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(big) == "ARTIFACT_TOO_LARGE"
    assert set(await cordum.redis.keys(f"{cordum.settings.namespace}art*")) == before

    # The server's own limit (setting artifact_max_bytes) applies whatever the caller asks.
    assert cordum.artifacts.limits.max_bytes == cordum.settings.artifact_max_bytes == 64 * MiB
    service = ArtifactService(
        ArtifactMetaStore(cordum.redis, prefix=cordum.settings.namespace),
        {"redis": RedisBackend(cordum.redis, prefix=cordum.settings.namespace)},
        limits=ArtifactLimits(max_bytes=1000),
    )
    with pytest.raises(CordumError) as limited:
        await service.put(ArtifactHeader(max_bytes=5000), single(b"y" * 1001), Caller())
    assert limited.value.reason_name == "ARTIFACT_TOO_LARGE"
    assert set(await cordum.redis.keys(f"{cordum.settings.namespace}art*")) == before


async def test_bad_input_names_the_field_and_writes_nothing(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    artifacts = stub(channel)
    assert cordum.redis is not None
    before = set(await cordum.redis.keys(f"{cordum.settings.namespace}art*"))

    bad = await failure(
        artifacts.PutArtifact(
            A.PutArtifactRequest(
                content_base64=b"x",
                retention="forever",
                labels={"bad key!": prefix},
                max_bytes=-1,
            )
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"retention", "labels[bad key!]", "max_bytes"}

    both = await failure(
        artifacts.PutArtifact(A.PutArtifactRequest(content_base64=b"x", content="y"))
    )
    assert set(field_violations(both)) == {"content"}
    empty = await failure(artifacts.PutArtifact(A.PutArtifactRequest(content_type="text/plain")))
    assert set(field_violations(empty)) == {"content_base64"}

    port = cordum.grpc_port
    missing = await refused_upload(port, requests(None, 1, 10))
    assert set(field_violations(missing)) == {"header"}
    twice = await refused_upload(
        port,
        [
            A.UploadArtifactRequest(header=A.ArtifactUploadHeader()),
            A.UploadArtifactRequest(chunk=b"data"),
            A.UploadArtifactRequest(header=A.ArtifactUploadHeader()),
        ],
    )
    assert set(field_violations(twice)) == {"header"}
    bad_header = await refused_upload(
        port, requests(A.ArtifactUploadHeader(retention="nope"), 1, 10)
    )
    assert set(field_violations(bad_header)) == {"header.retention"}
    nothing = await refused_upload(port, requests(A.ArtifactUploadHeader(), 0, 0))
    assert set(field_violations(nothing)) == {"chunk"}
    # Only a closing `end` message that matches what arrived commits an upload: a client
    # cancelled half-way never leaves a truncated artifact.
    header, body = (
        A.UploadArtifactRequest(header=A.ArtifactUploadHeader()),
        list(requests(None, 2, 10)),
    )
    unfinished = await refused_upload(port, [header, *body[:-1]])
    assert set(field_violations(unfinished)) == {"end"}
    short = A.UploadArtifactRequest(end=A.ArtifactUploadEnd(size_bytes=21))
    assert set(field_violations(await refused_upload(port, [header, *body[:-1], short]))) == {
        "end.size_bytes"
    }
    tampered = A.UploadArtifactRequest(end=A.ArtifactUploadEnd(sha256="0" * 64))
    assert set(field_violations(await refused_upload(port, [header, *body[:-1], tampered]))) == {
        "end.sha256"
    }
    late = await refused_upload(port, [header, *body, A.UploadArtifactRequest(chunk=b"x")])
    assert set(field_violations(late)) == {"end"}

    for ptr in ("", "redis://ctx:abc", "art:xyz", "s3://art:" + "0" * 32):
        wrong = await failure(artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=ptr)))
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT, ptr
        assert set(field_violations(wrong)) == {"artifact_ptr"}
    chunk = await failure(
        artifacts.DownloadArtifact(
            A.DownloadArtifactRequest(artifact_ptr="art:" + "0" * 32, chunk_size=-1)
        ).read()
    )
    assert set(field_violations(chunk)) == {"chunk_size"}
    assert set(await cordum.redis.keys(f"{cordum.settings.namespace}art*")) == before
    assert await keys_with(cordum, prefix) == []


async def test_delete_list_and_not_found(channel: grpc.aio.Channel, prefix: str) -> None:
    artifacts = stub(channel)
    ptrs = []
    for i in range(3):
        put = await artifacts.PutArtifact(
            A.PutArtifactRequest(content=f"{prefix}-{i}", labels={"p": prefix})
        )
        ptrs.append(put.artifact_ptr)

    seen: list[str] = []
    token = ""
    while True:
        page = await artifacts.ListArtifacts(A.ListArtifactsRequest(page_size=2, page_token=token))
        seen += [a.artifact_ptr for a in page.artifacts if a.metadata.labels.get("p") == prefix]
        token = page.next_page_token
        if not token or len(seen) == 3:
            break
    assert seen == list(reversed(ptrs))  # newest first

    await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=ptrs[1]))
    for call in (
        artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=ptrs[1])),
        artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=ptrs[1])),
        artifacts.DownloadArtifact(A.DownloadArtifactRequest(artifact_ptr=ptrs[1])).read(),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error) == "ARTIFACT_NOT_FOUND"
    page = await artifacts.ListArtifacts(A.ListArtifactsRequest(page_size=500))
    assert ptrs[1] not in [a.artifact_ptr for a in page.artifacts]
    bad = await failure(
        artifacts.ListArtifacts(A.ListArtifactsRequest(page_size=-1, page_token="?"))
    )
    assert set(field_violations(bad)) == {"page_size", "page_token"}
    for ptr in (ptrs[0], ptrs[2]):
        await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=ptr))


async def test_another_tenants_artifact_is_not_found(cordum: App, prefix: str) -> None:
    acme, other = Caller(tenant="acme"), Caller(tenant="other")
    service = cordum.artifacts
    meta = await service.put(ArtifactHeader(labels={"p": prefix}), single(b"secret"), acme)
    assert meta.tenant == "acme" and meta.labels["tenant_id"] == "acme"
    ptr = f"redis://art:{meta.id}"
    assert (await service.get(ptr, acme))[1] == b"secret"
    for call in (service.get(ptr, other), service.delete(ptr, other)):
        with pytest.raises(CordumError) as hidden:
            await call
        assert hidden.value.reason_name == "ARTIFACT_NOT_FOUND"
    listed = await service.list(500, "", other)
    assert meta.id not in [m.id for m in listed.artifacts]
    assert meta.id in [m.id for m in (await service.list(500, "", acme)).artifacts]
    # A tenant cannot label an artifact as another tenant's.
    with pytest.raises(CordumError) as spoof:
        await service.put(ArtifactHeader(labels={"tenant_id": "acme"}), single(b"x"), other)
    assert spoof.value.reason_name == "PERMISSION_DENIED"
    assert [v.field for v in spoof.value.violations] == ["labels[tenant_id]"]
    await service.delete(ptr, acme)


async def test_artifact_pointers_travel_in_job_results(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """A worker stores an artifact through the API and reports its `redis://art:<id>`
    pointer in JobResult.artifact_ptrs; clients read it back from the job."""
    assert cordum.nats is not None
    artifacts = stub(channel)
    put = await artifacts.PutArtifact(
        A.PutArtifactRequest(content='{"report": 1}', content_type="application/json")
    )
    topic = f"job.t.art.{prefix}"
    release = asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        # The result with the pointer is sent below; this worker's own answer comes later
        # and is ignored as a duplicate.
        await release.wait()
        return {"late": True}

    stub_jobs = jobs(channel)
    async with worker:
        reply = await stub_jobs.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        await wait_state(stub_jobs, reply.job_id, "DISPATCHED", "RUNNING")
        result = agent.JobResult(
            job_id=reply.job_id,
            status=agent.JOB_STATUS_SUCCEEDED,
            worker_id=worker.worker_id,
            result_ptr=f"redis://res:{reply.job_id}",
            artifact_ptrs=[put.artifact_ptr],
        )
        packet = cap.envelope(sender_id=worker.worker_id, trace_id=reply.job_id, job_result=result)
        await cordum.nats.publish(cap.SUBJECT_RESULT, cap.encode(packet))
        job = await wait_state(stub_jobs, reply.job_id, "SUCCEEDED")
        release.set()
    assert list(job.artifact_ptrs) == [put.artifact_ptr]
    got = await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=job.artifact_ptrs[0]))
    assert got.content_base64 == b'{"report": 1}'
    await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr))
