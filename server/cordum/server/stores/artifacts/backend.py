"""What an artifact byte store must do. Bytes always stream: a writer takes pieces as they
arrive and a reader yields pieces, so no backend holds a whole artifact in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class BlobMissing(Exception):
    """The bytes are gone (expired, deleted, or never completed)."""


@dataclass(frozen=True)
class BlobInfo:
    """What a backend may record next to the bytes (S3 object metadata and tags)."""

    tenant: str
    retention: str
    content_type: str
    expires_ms: int


class BlobWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> str:
        """Finish the upload; returns the location to store in the metadata."""
        ...

    async def abort(self) -> None:
        """Remove whatever was written (safe to call after a failed commit)."""
        ...


class ArtifactBackend(Protocol):
    # Recorded in each artifact's metadata (`redis`, `s3`), so an artifact is read back from
    # the backend that wrote it even after the default backend changed.
    name: str

    def writer(self, artifact_id: str, info: BlobInfo) -> BlobWriter: ...

    def read(self, artifact_id: str, location: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The bytes in pieces of at most `chunk_bytes`; raises BlobMissing when gone."""
        ...

    async def delete(self, artifact_id: str, location: str) -> None: ...

    async def close(self) -> None: ...
