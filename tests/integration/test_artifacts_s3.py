"""The S3 artifact backend against moto's S3 server (loopback, free port): same API and
pointers as the Redis backend, multipart streaming, bounded memory, expiry on read, no
leftovers on refusal, delete."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer

from cordum.server.app import App
from cordum.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    memory_service_pb2,
    memory_service_pb2_grpc,
)

from support.admin import error_reason, own_app
from support.artifacts import MiB, digest_of, refused_upload, requests, upload

A = artifact_service_pb2
BUCKET = "cordum-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        s3(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def s3(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest_asyncio.fixture(scope="module")
async def s3_app(
    nats_url: str, redis_url: str, config_dir: Path, s3_endpoint: str
) -> AsyncIterator[App]:
    async with own_app(
        nats_url,
        redis_url,
        config_dir,
        artifact_backend="s3",
        artifact_s3_bucket=BUCKET,
        artifact_s3_endpoint_url=s3_endpoint,
        artifact_s3_access_key_id="test",
        artifact_s3_secret_access_key="test",
    ) as app:
        yield app


@pytest_asyncio.fixture
async def s3_channel(s3_app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s3_app.grpc_port}") as ch:
        yield ch


def stub(channel: grpc.aio.Channel) -> artifact_service_pb2_grpc.ArtifactServiceStub:
    return artifact_service_pb2_grpc.ArtifactServiceStub(channel)


def object_key(ptr: str) -> str:
    return "cordum/artifacts/" + ptr.removeprefix("redis://art:")


async def test_small_artifact_round_trips_through_s3(
    s3_app: App, s3_channel: grpc.aio.Channel, s3_endpoint: str
) -> None:
    artifacts = stub(s3_channel)
    put = await artifacts.PutArtifact(
        A.PutArtifactRequest(content="on s3", retention="audit", labels={"k": "v"})
    )
    # CAP workers see the same pointer form whatever holds the bytes.
    assert put.artifact_ptr.startswith("redis://art:")
    assert put.metadata.backend == "s3"
    got = await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=put.artifact_ptr))
    assert got.content_base64 == b"on s3"
    assert got.metadata.sha256 == hashlib.sha256(b"on s3").hexdigest()

    client = s3(s3_endpoint)
    head = client.head_object(Bucket=BUCKET, Key=object_key(put.artifact_ptr))
    assert head["ContentLength"] == 5
    assert head["Metadata"]["retention"] == "audit"
    assert head["Metadata"]["tenant"] == "default"
    assert int(head["Metadata"]["expires-ms"]) == put.metadata.expires_at.ToMilliseconds()
    tags = client.get_object_tagging(Bucket=BUCKET, Key=object_key(put.artifact_ptr))
    assert tags["TagSet"] == [{"Key": "retention", "Value": "audit"}]
    # The metadata in Redis says where the bytes are.
    assert s3_app.redis is not None
    meta_key = f"{s3_app.settings.namespace}art:{put.artifact_ptr.removeprefix('redis://art:')}"
    location = await s3_app.redis.hget(meta_key, "location")
    assert location == f"s3://{BUCKET}/{object_key(put.artifact_ptr)}".encode()

    # The memory reader reads S3-backed artifacts too.
    memory = memory_service_pb2_grpc.MemoryServiceStub(s3_channel)
    read = await memory.ReadMemory(memory_service_pb2.ReadMemoryRequest(ptr=put.artifact_ptr))
    assert (read.kind, read.text, read.size_bytes) == ("artifact", "on s3", 5)

    await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr))
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=object_key(put.artifact_ptr))
    assert listed.get("KeyCount", 0) == 0
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=put.artifact_ptr))
    assert error_reason(gone.value) == "ARTIFACT_NOT_FOUND"


async def test_twenty_mib_multipart_stream_in_parts(
    s3_app: App, s3_channel: grpc.aio.Channel, s3_endpoint: str
) -> None:
    artifacts = stub(s3_channel)
    pieces, size = 80, 256 * 1024
    expected = digest_of(pieces, size)
    # moto runs in this process and keeps what it receives, so what we hold is shown by
    # the parts sent (one at a time, never the whole artifact) rather than by tracemalloc.
    backend = s3_app.artifacts.backend("s3")
    parts: list[int] = []
    upload_part = backend.client.upload_part

    def spy(**kwargs: Any) -> Any:
        parts.append(len(kwargs["Body"]))
        return upload_part(**kwargs)

    backend.client.upload_part = spy
    try:
        put = await artifacts.UploadArtifact(upload(A.ArtifactUploadHeader(), pieces, size))
    finally:
        backend.client.upload_part = upload_part
    assert parts == [8 * MiB, 8 * MiB, 4 * MiB]
    digest = hashlib.sha256()
    chunks = 0
    async for message in artifacts.DownloadArtifact(
        A.DownloadArtifactRequest(artifact_ptr=put.artifact_ptr)
    ):
        if message.WhichOneof("part") == "chunk":
            assert len(message.chunk) <= 256 * 1024
            digest.update(message.chunk)
            chunks += 1
    assert put.size_bytes == 20 * MiB
    assert put.metadata.sha256 == digest.hexdigest() == expected
    assert chunks >= 80

    head = s3(s3_endpoint).head_object(Bucket=BUCKET, Key=object_key(put.artifact_ptr))
    assert head["ContentLength"] == 20 * MiB
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    await artifacts.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr))


async def test_too_large_aborts_the_multipart_upload(s3_app: App, s3_endpoint: str) -> None:
    client = s3(s3_endpoint)
    before = client.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    header = A.ArtifactUploadHeader(max_bytes=12 * MiB)
    big = await refused_upload(s3_app.grpc_port, requests(header, 80, 256 * 1024))
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(big) == "ARTIFACT_TOO_LARGE"
    assert client.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == before
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert s3_app.redis is not None
    assert await s3_app.redis.keys(f"{s3_app.settings.namespace}art:*") == []


async def test_expiry_is_enforced_on_read(
    s3_app: App, s3_channel: grpc.aio.Channel, s3_endpoint: str
) -> None:
    """Expiry is the Redis metadata's TTL; the object's own `expires-ms` is checked too,
    for bytes S3 still holds (until the bucket's lifecycle rule removes them)."""
    artifacts = stub(s3_channel)
    client = s3(s3_endpoint)
    past = str(int(time.time() * 1000) - 1000)

    stale_object = await artifacts.PutArtifact(A.PutArtifactRequest(content_base64=b"old"))
    key = object_key(stale_object.artifact_ptr)
    client.copy_object(
        Bucket=BUCKET,
        Key=key,
        CopySource={"Bucket": BUCKET, "Key": key},
        Metadata={"expires-ms": past},
        MetadataDirective="REPLACE",
    )
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=stale_object.artifact_ptr))
    assert error_reason(expired.value) == "ARTIFACT_NOT_FOUND"

    stale_meta = await artifacts.PutArtifact(A.PutArtifactRequest(content_base64=b"old"))
    assert s3_app.redis is not None
    ns = s3_app.settings.namespace
    meta_key = f"{ns}art:{stale_meta.artifact_ptr.removeprefix('redis://art:')}"
    await s3_app.redis.hset(meta_key, "expires_ms", past)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await artifacts.GetArtifact(A.GetArtifactRequest(artifact_ptr=stale_meta.artifact_ptr))
    assert error_reason(gone.value) == "ARTIFACT_NOT_FOUND"
    listed = await artifacts.ListArtifacts(A.ListArtifactsRequest(page_size=500))
    assert stale_meta.artifact_ptr not in [a.artifact_ptr for a in listed.artifacts]
