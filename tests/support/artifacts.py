"""Helpers for the artifact tests: deterministic content made piece by piece, upload
streams, and a blocking client for uploads the server refuses part-way."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc

from cordum.v1 import artifact_service_pb2, artifact_service_pb2_grpc

A = artifact_service_pb2
MiB = 1024 * 1024


def piece(i: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes, made one piece at a time."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def digest_of(pieces: int, size: int) -> str:
    digest = hashlib.sha256()
    for i in range(pieces):
        digest.update(piece(i, size))
    return digest.hexdigest()


async def upload(
    header: A.ArtifactUploadHeader, pieces: int, size: int
) -> AsyncIterator[A.UploadArtifactRequest]:
    yield A.UploadArtifactRequest(header=header)
    for i in range(pieces):
        yield A.UploadArtifactRequest(chunk=piece(i, size))
    yield end(pieces, size)


def end(pieces: int, size: int) -> A.UploadArtifactRequest:
    """The closing message of a complete upload of `pieces` pieces of `size` bytes."""
    return A.UploadArtifactRequest(
        end=A.ArtifactUploadEnd(size_bytes=pieces * size, sha256=digest_of(pieces, size))
    )


def requests(
    header: A.ArtifactUploadHeader | None, pieces: int, size: int
) -> Iterator[A.UploadArtifactRequest]:
    """The messages of an upload (no header message when `header` is None)."""
    if header is not None:
        yield A.UploadArtifactRequest(header=header)
    for i in range(pieces):
        yield A.UploadArtifactRequest(chunk=piece(i, size))
    yield end(pieces, size)


async def refused_upload(port: int, messages: Iterable[A.UploadArtifactRequest]) -> grpc.RpcError:
    """An upload the server ends before the client finished sending, with the blocking
    client: grpc.aio's client may then report INTERNAL ("Internal error from Core") instead
    of the server's status (grpc/grpc#36066); the blocking client reports the server's."""

    def call() -> grpc.RpcError:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
            try:
                stub.UploadArtifact(iter(messages), timeout=60)
            except grpc.RpcError as error:
                return error
        raise AssertionError("the upload was accepted")

    return await asyncio.to_thread(call)
