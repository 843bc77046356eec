"""ArtifactService over gRPC: proto in, ArtifactService call, proto out. Uploads and
downloads stream straight through (one chunk at a time)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.api.metadata import caller
from cordum.server.errors import invalid_field
from cordum.server.services.artifacts import ArtifactHeader, ArtifactService, pointer, single
from cordum.server.stores.artifacts import ArtifactMeta
from cordum.v1 import artifact_pb2, artifact_service_pb2, artifact_service_pb2_grpc

Ctx = grpc.aio.ServicerContext
A = artifact_service_pb2


def _ms(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def metadata_proto(meta: ArtifactMeta) -> artifact_pb2.ArtifactMetadata:
    return artifact_pb2.ArtifactMetadata(
        content_type=meta.content_type,
        size_bytes=meta.size,
        retention=meta.retention,
        labels=meta.labels,
        sha256=meta.sha256,
        created_at=_ms(meta.created_ms),
        expires_at=_ms(meta.expires_ms),
        backend=meta.backend,
    )


def _put_response(meta: ArtifactMeta) -> A.PutArtifactResponse:
    return A.PutArtifactResponse(
        artifact_ptr=pointer(meta.id), size_bytes=meta.size, metadata=metadata_proto(meta)
    )


class _Upload:
    """The chunks of an upload stream, and its closing `end` message.

    grpc.aio ends a client stream the same way whether the client finished or was cancelled
    half-way, so only an explicit `end` message says the bytes are complete: `verify` refuses
    (and so stores nothing) without it."""

    def __init__(self, requests: AsyncIterator[A.UploadArtifactRequest]) -> None:
        self._requests = requests
        self.end: A.ArtifactUploadEnd | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        async for message in self._requests:
            part = message.WhichOneof("part")
            if self.end is not None:
                raise invalid_field("end", "must be the last message of the upload")
            if part == "end":
                self.end = message.end
            elif part == "chunk":
                if message.chunk:
                    yield message.chunk
            else:
                raise invalid_field("header", "only the first message may carry the header")

    def verify(self, size: int, sha256: str) -> None:
        if self.end is None:
            raise invalid_field(
                "end", "required: the upload stopped before its final `end` message"
            )
        if self.end.size_bytes and self.end.size_bytes != size:
            raise invalid_field(
                "end.size_bytes", f"the client sent {self.end.size_bytes} bytes, {size} arrived"
            )
        if self.end.sha256 and self.end.sha256.lower() != sha256:
            raise invalid_field("end.sha256", "does not match the SHA-256 of the bytes received")


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, service: ArtifactService) -> None:
        self._artifacts = service

    async def PutArtifact(
        self, request: A.PutArtifactRequest, context: Ctx
    ) -> A.PutArtifactResponse:
        if request.content_base64 and request.content:
            raise invalid_field("content", "give content_base64 or content, not both")
        data = request.content_base64 or request.content.encode()
        content_type = request.content_type
        if request.content and not content_type:
            content_type = "text/plain; charset=utf-8"
        header = ArtifactHeader(
            content_type=content_type,
            retention=request.retention,
            labels=dict(request.labels),
            max_bytes=request.max_bytes,
        )
        meta = await self._artifacts.put(
            header, single(data), caller(context), chunk_field="content_base64"
        )
        return _put_response(meta)

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[A.UploadArtifactRequest], context: Ctx
    ) -> A.PutArtifactResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid_field("header", "required: the first message carries the header")
        h = first.header
        header = ArtifactHeader(
            content_type=h.content_type,
            retention=h.retention,
            labels=dict(h.labels),
            max_bytes=h.max_bytes,
        )
        upload = _Upload(request_iterator)
        meta = await self._artifacts.put(
            header,
            upload.chunks(),
            caller(context),
            header_prefix="header.",
            verify=upload.verify,
        )
        return _put_response(meta)

    async def GetArtifact(
        self, request: A.GetArtifactRequest, context: Ctx
    ) -> A.GetArtifactResponse:
        meta, data = await self._artifacts.get(request.artifact_ptr, caller(context))
        return A.GetArtifactResponse(
            artifact_ptr=pointer(meta.id), content_base64=data, metadata=metadata_proto(meta)
        )

    async def DownloadArtifact(
        self, request: A.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[A.DownloadArtifactResponse]:
        meta, chunks = await self._artifacts.download(
            request.artifact_ptr, request.chunk_size, caller(context)
        )
        yield A.DownloadArtifactResponse(metadata=metadata_proto(meta))
        async for piece in chunks:
            yield A.DownloadArtifactResponse(chunk=piece)

    async def DeleteArtifact(
        self, request: A.DeleteArtifactRequest, context: Ctx
    ) -> A.DeleteArtifactResponse:
        await self._artifacts.delete(request.artifact_ptr, caller(context))
        return A.DeleteArtifactResponse()

    async def ListArtifacts(
        self, request: A.ListArtifactsRequest, context: Ctx
    ) -> A.ListArtifactsResponse:
        listing = await self._artifacts.list(request.page_size, request.page_token, caller(context))
        return A.ListArtifactsResponse(
            artifacts=[
                artifact_pb2.Artifact(artifact_ptr=pointer(m.id), metadata=metadata_proto(m))
                for m in listing.artifacts
            ],
            next_page_token=listing.next_token,
        )
