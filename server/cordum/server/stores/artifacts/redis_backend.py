"""Artifact bytes in Redis, chunked: an artifact is never one Redis value.

  art:<id>:chunk:<n>   STRING  bytes n*chunk_bytes .. (n+1)*chunk_bytes, n from 0

Every chunk expires at the artifact's expiry (PXAT, fixed when the upload starts), so the
chunks of an upload that never completed (a crashed gateway) disappear on their own. The
location recorded in the metadata is the number of chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from redis.asyncio import Redis

from cordum.server.stores.artifacts.backend import BlobInfo, BlobMissing

DEFAULT_CHUNK_BYTES = 1024 * 1024


class _RedisWriter:
    def __init__(self, backend: RedisBackend, artifact_id: str, info: BlobInfo) -> None:
        self._backend = backend
        self._id = artifact_id
        self._expires_ms = info.expires_ms
        self._buffer = bytearray()
        self._chunks = 0

    async def _flush(self, data: bytes) -> None:
        key = self._backend.chunk_key(self._id, self._chunks)
        await self._backend.redis.set(key, data, pxat=self._expires_ms)
        self._chunks += 1

    async def write(self, data: bytes) -> None:
        size = self._backend.chunk_bytes
        self._buffer += data
        while len(self._buffer) >= size:
            piece = bytes(self._buffer[:size])
            del self._buffer[:size]
            await self._flush(piece)

    async def commit(self) -> str:
        if self._buffer or not self._chunks:
            await self._flush(bytes(self._buffer))
            self._buffer.clear()
        return str(self._chunks)

    async def abort(self) -> None:
        self._buffer.clear()
        await self._backend.delete_chunks(self._id, self._chunks)


class RedisBackend:
    name = "redis"

    def __init__(
        self, redis: Redis, *, prefix: str = "", chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes

    def chunk_key(self, artifact_id: str, n: int) -> str:
        return f"{self.prefix}art:{artifact_id}:chunk:{n}"

    def writer(self, artifact_id: str, info: BlobInfo) -> _RedisWriter:
        return _RedisWriter(self, artifact_id, info)

    async def read(self, artifact_id: str, location: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        for n in range(int(location or 0)):
            data = await self.redis.get(self.chunk_key(artifact_id, n))
            if data is None:
                raise BlobMissing(artifact_id)
            for start in range(0, len(data), chunk_bytes):
                yield data[start : start + chunk_bytes]

    async def delete(self, artifact_id: str, location: str) -> None:
        await self.delete_chunks(artifact_id, int(location or 0))

    async def delete_chunks(self, artifact_id: str, count: int) -> None:
        for start in range(0, count, 500):
            keys = [self.chunk_key(artifact_id, n) for n in range(start, min(count, start + 500))]
            await self.redis.delete(*keys)

    async def close(self) -> None:
        return None
