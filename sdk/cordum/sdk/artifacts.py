"""``client.artifacts``: blobs with a content type, a SHA-256 and a retention class, stored
and read in chunks (nothing is held whole in memory unless asked for)::

    saved = await client.artifacts.put(Path("report.pdf"), retention="audit")
    saved.artifact_ptr                                   # 'redis://art:5f0c...'
    meta = await client.artifacts.download(saved.artifact_ptr, Path("copy.pdf"))
    async for chunk in client.artifacts.chunks(saved.artifact_ptr):
        ...

``put`` takes ``bytes``/``str``, a path, a binary file, or an (async) iterable of byte
chunks. ``download`` writes to ``<path>.part`` and renames it into place only once the size
and SHA-256 match the artifact's metadata, so a failed download leaves no partial file.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from typing import BinaryIO, cast

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import artifact_pb2, artifact_service_pb2, artifact_service_pb2_grpc

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactsClient",
    "AsyncArtifactsClient",
    "Content",
    "SyncContent",
]

A = artifact_service_pb2
Stub = artifact_service_pb2_grpc.ArtifactServiceStub

# Well under gRPC's 4 MiB message limit, and the server's own default download chunk.
CHUNK_SIZE = 256 * 1024

PathLike = str | os.PathLike[str]
SyncContent = bytes | bytearray | memoryview | Path | BinaryIO | Iterable[bytes]
Content = SyncContent | AsyncIterable[bytes]
Destination = PathLike | BinaryIO


class ArtifactIntegrityError(Exception):
    """The bytes downloaded do not match the artifact's recorded size or SHA-256."""


class _Sent:
    """Counts and hashes the chunks of an upload for its closing `end` message: the server
    stores the artifact only when that message arrives and matches what it received."""

    def __init__(self) -> None:
        self._size = 0
        self._digest = hashlib.sha256()

    def chunk(self, piece: bytes) -> A.UploadArtifactRequest:
        self._size += len(piece)
        self._digest.update(piece)
        return A.UploadArtifactRequest(chunk=piece)

    def end(self) -> A.UploadArtifactRequest:
        return A.UploadArtifactRequest(
            end=A.ArtifactUploadEnd(size_bytes=self._size, sha256=self._digest.hexdigest())
        )


def _header(
    content_type: str | None,
    retention: str | None,
    labels: Mapping[str, str] | None,
    max_bytes: int | None,
) -> A.UploadArtifactRequest:
    return A.UploadArtifactRequest(
        header=A.ArtifactUploadHeader(
            content_type=content_type or "",
            retention=retention or "",
            labels=dict(labels or {}),
            max_bytes=max_bytes or 0,
        )
    )


def _guess_type(content: object, content_type: str | None) -> str | None:
    # A file's name says what it holds when the caller did not.
    if content_type or not isinstance(content, Path):
        return content_type
    return mimetypes.guess_type(content.name)[0]


def _sync_chunks(content: SyncContent, chunk_size: int) -> Generator[bytes, None, None]:
    if isinstance(content, bytes | bytearray | memoryview):
        view = memoryview(content)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
    elif isinstance(content, Path):
        with content.open("rb") as handle:
            yield from _file_chunks(handle, chunk_size)
    elif hasattr(content, "read"):
        yield from _file_chunks(cast(BinaryIO, content), chunk_size)
    else:
        for piece in cast(Iterable[bytes], content):
            yield bytes(piece)


def _file_chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while piece := handle.read(chunk_size):
        yield piece


async def _async_chunks(content: Content, chunk_size: int) -> AsyncIterator[bytes]:
    if isinstance(content, AsyncIterable):
        async for piece in content:
            yield bytes(piece)
        return
    pieces = _sync_chunks(content, chunk_size)
    # Reading a file blocks: each read goes to a thread so the event loop keeps running.
    blocking = isinstance(content, Path) or hasattr(content, "read")
    try:
        while True:
            piece = await asyncio.to_thread(next, pieces, None) if blocking else next(pieces, None)
            if piece is None:
                return
            yield piece
    finally:
        pieces.close()  # an upload that failed half-way closes its file now


def _content(content: Content) -> Content:
    if isinstance(content, str):
        # A str is ambiguous (a path? text?): the caller says which.
        raise TypeError("pass bytes (text.encode()) or a Path, not str")
    if isinstance(content, os.PathLike):
        return Path(content)
    return content


class _Download:
    """Checks the bytes of one download against the metadata that came first."""

    def __init__(self) -> None:
        self.metadata: artifact_pb2.ArtifactMetadata | None = None
        self.size = 0
        self._digest = hashlib.sha256()

    def take(self, message: A.DownloadArtifactResponse) -> bytes | None:
        if message.WhichOneof("part") == "metadata":
            self.metadata = message.metadata
            return None
        self.size += len(message.chunk)
        self._digest.update(message.chunk)
        return message.chunk

    def verify(self, ptr: str) -> artifact_pb2.ArtifactMetadata:
        meta = self.metadata
        if meta is None:
            raise ArtifactIntegrityError(f"{ptr}: the download carried no metadata")
        if self.size != meta.size_bytes or self._digest.hexdigest() != meta.sha256:
            raise ArtifactIntegrityError(
                f"{ptr}: got {self.size} bytes with sha256 {self._digest.hexdigest()}, "
                f"expected {meta.size_bytes} bytes with sha256 {meta.sha256}"
            )
        return meta


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


class AsyncArtifactsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> artifact_service_pb2_grpc.ArtifactServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("artifact_service_pb2_grpc.ArtifactServiceAsyncStub", self._t.stub(Stub))

    async def put(
        self,
        content: Content,
        *,
        content_type: str | None = None,
        retention: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        timeout: float | None = None,  # noqa: ASYNC109 (gRPC deadline)
    ) -> A.PutArtifactResponse:
        """Upload ``content`` in chunks of ``chunk_size``. ``retention``: ``short``,
        ``standard`` (default) or ``audit``; a file's content type is guessed from its name.
        Larger than ``max_bytes`` or the server's limit: ``ResourceExhausted``, and nothing
        is stored."""
        content = _content(content)
        header = _header(_guess_type(content, content_type), retention, labels, max_bytes)

        async def requests() -> AsyncIterator[A.UploadArtifactRequest]:
            yield header
            sent = _Sent()
            async for piece in _async_chunks(content, chunk_size):
                yield sent.chunk(piece)
            yield sent.end()

        return await self._t.stream_unary(self._stub.UploadArtifact, requests(), timeout=timeout)

    async def get(self, artifact_ptr: str) -> A.GetArtifactResponse:
        """Bytes and metadata in one message (artifacts up to the server's unary limit,
        3 MiB by default; use :meth:`download` or :meth:`chunks` beyond)."""
        request = A.GetArtifactRequest(artifact_ptr=artifact_ptr)
        return await self._t.unary(self._stub.GetArtifact, request)

    async def head(self, artifact_ptr: str) -> artifact_pb2.ArtifactMetadata:
        """The metadata only (the download stream is ended after its first message)."""
        stream = self._download(artifact_ptr, None, None)
        try:
            first = await anext(stream)
        finally:
            await stream.aclose()
        return first.metadata

    def _download(
        self, artifact_ptr: str, chunk_size: int | None, timeout: float | None
    ) -> AsyncGenerator[A.DownloadArtifactResponse, None]:
        request = A.DownloadArtifactRequest(artifact_ptr=artifact_ptr, chunk_size=chunk_size or 0)
        return self._t.stream(self._stub.DownloadArtifact, request, timeout=timeout)

    async def chunks(
        self,
        artifact_ptr: str,
        *,
        chunk_size: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[bytes]:
        """The artifact's bytes, chunk by chunk, checked against its size and SHA-256 at the
        end (:class:`ArtifactIntegrityError`)."""
        check = _Download()
        stream = self._download(artifact_ptr, chunk_size, timeout)
        try:
            async for message in stream:
                piece = check.take(message)
                if piece is not None:
                    yield piece
        finally:
            await stream.aclose()
        check.verify(artifact_ptr)

    async def read(self, artifact_ptr: str) -> bytes:
        """The whole artifact in memory (streamed, so no unary size limit applies)."""
        return b"".join([piece async for piece in self.chunks(artifact_ptr)])

    async def download(
        self,
        artifact_ptr: str,
        destination: Destination,
        *,
        chunk_size: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> artifact_pb2.ArtifactMetadata:
        """Stream the artifact into a file (a path, or a binary file object left open)."""
        check = _Download()
        stream = self._download(artifact_ptr, chunk_size, timeout)
        if hasattr(destination, "write"):
            handle = cast(BinaryIO, destination)
            async for message in stream:
                piece = check.take(message)
                if piece is not None:
                    await asyncio.to_thread(handle.write, piece)
            return check.verify(artifact_ptr)
        path = Path(cast(PathLike, destination))
        part = _part_path(path)
        try:
            with part.open("wb") as out:
                async for message in stream:
                    piece = check.take(message)
                    if piece is not None:
                        await asyncio.to_thread(out.write, piece)
            meta = check.verify(artifact_ptr)
            part.replace(path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return meta

    async def delete(self, artifact_ptr: str) -> None:
        request = A.DeleteArtifactRequest(artifact_ptr=artifact_ptr)
        await self._t.unary(self._stub.DeleteArtifact, request)

    async def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> A.ListArtifactsResponse:
        request = A.ListArtifactsRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListArtifacts, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[artifact_pb2.Artifact]:
        """The caller's artifacts, newest first, fetching pages as the iteration needs."""

        async def fetch(token: str, size: int | None) -> A.ListArtifactsResponse:
            return await self.list_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.artifacts, page_size=page_size, limit=limit)


class ArtifactsClient:
    """The blocking twin of :class:`AsyncArtifactsClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def put(
        self,
        content: SyncContent,
        *,
        content_type: str | None = None,
        retention: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        timeout: float | None = None,
    ) -> A.PutArtifactResponse:
        content = cast(SyncContent, _content(content))
        header = _header(_guess_type(content, content_type), retention, labels, max_bytes)

        def requests() -> Iterator[A.UploadArtifactRequest]:
            yield header
            sent = _Sent()
            for piece in _sync_chunks(content, chunk_size):
                yield sent.chunk(piece)
            yield sent.end()

        return self._t.stream_unary(self._stub.UploadArtifact, requests(), timeout=timeout)

    def get(self, artifact_ptr: str) -> A.GetArtifactResponse:
        return self._t.unary(
            self._stub.GetArtifact, A.GetArtifactRequest(artifact_ptr=artifact_ptr)
        )

    def head(self, artifact_ptr: str) -> artifact_pb2.ArtifactMetadata:
        stream = self._download(artifact_ptr, None, None)
        try:
            first = next(stream)
        finally:
            stream.close()
        return first.metadata

    def _download(
        self, artifact_ptr: str, chunk_size: int | None, timeout: float | None
    ) -> Generator[A.DownloadArtifactResponse, None, None]:
        request = A.DownloadArtifactRequest(artifact_ptr=artifact_ptr, chunk_size=chunk_size or 0)
        return self._t.stream(self._stub.DownloadArtifact, request, timeout=timeout)

    def chunks(
        self, artifact_ptr: str, *, chunk_size: int | None = None, timeout: float | None = None
    ) -> Iterator[bytes]:
        check = _Download()
        stream = self._download(artifact_ptr, chunk_size, timeout)
        try:
            for message in stream:
                piece = check.take(message)
                if piece is not None:
                    yield piece
        finally:
            stream.close()
        check.verify(artifact_ptr)

    def read(self, artifact_ptr: str) -> bytes:
        return b"".join(self.chunks(artifact_ptr))

    def download(
        self,
        artifact_ptr: str,
        destination: Destination,
        *,
        chunk_size: int | None = None,
        timeout: float | None = None,
    ) -> artifact_pb2.ArtifactMetadata:
        check = _Download()
        stream = self._download(artifact_ptr, chunk_size, timeout)
        if hasattr(destination, "write"):
            handle = cast(BinaryIO, destination)
            for message in stream:
                piece = check.take(message)
                if piece is not None:
                    handle.write(piece)
            return check.verify(artifact_ptr)
        path = Path(cast(PathLike, destination))
        part = _part_path(path)
        try:
            with part.open("wb") as out:
                for message in stream:
                    piece = check.take(message)
                    if piece is not None:
                        out.write(piece)
            meta = check.verify(artifact_ptr)
            part.replace(path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return meta

    def delete(self, artifact_ptr: str) -> None:
        self._t.unary(self._stub.DeleteArtifact, A.DeleteArtifactRequest(artifact_ptr=artifact_ptr))

    def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> A.ListArtifactsResponse:
        request = A.ListArtifactsRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListArtifacts, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[artifact_pb2.Artifact]:
        def fetch(token: str, size: int | None) -> A.ListArtifactsResponse:
            return self.list_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.artifacts, page_size=page_size, limit=limit)
