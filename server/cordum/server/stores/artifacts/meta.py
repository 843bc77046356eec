"""Artifact metadata in Redis, whatever backend holds the bytes.

Keys (under the store's prefix):

  art:<id>            HASH  tenant, content_type, size, sha256, retention, labels (JSON),
                            created_ms, expires_ms, backend, location; expires with the
                            artifact (PEXPIREAT expires_ms), which is what ends it
  arts:idx            ZSET  id -> created ms, every artifact (listing, unscoped callers)
  arts:idx:t:<tenant> ZSET  id -> created ms, per tenant (listing)

The metadata is written only once the bytes are complete, so a half-written upload is never
visible. Index members outlive their (expired) artifact at most until the next put trims
everything older than the longest retention, or a listing that finds them gone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis


@dataclass(frozen=True)
class ArtifactMeta:
    id: str
    tenant: str
    content_type: str
    size: int
    sha256: str
    retention: str
    created_ms: int
    expires_ms: int
    backend: str
    location: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactPage:
    artifacts: list[ArtifactMeta]
    # (created ms, id) of the last listed artifact when more may follow.
    next_after: tuple[int, str] | None


def _s(value: bytes | None) -> str:
    return value.decode() if value else ""


def _meta(artifact_id: str, raw: dict[bytes, bytes]) -> ArtifactMeta | None:
    if not raw or b"backend" not in raw:
        return None
    return ArtifactMeta(
        id=artifact_id,
        tenant=_s(raw.get(b"tenant")),
        content_type=_s(raw.get(b"content_type")),
        size=int(raw.get(b"size") or 0),
        sha256=_s(raw.get(b"sha256")),
        retention=_s(raw.get(b"retention")),
        created_ms=int(raw.get(b"created_ms") or 0),
        expires_ms=int(raw.get(b"expires_ms") or 0),
        backend=_s(raw.get(b"backend")),
        location=_s(raw.get(b"location")),
        labels=json.loads(raw.get(b"labels") or b"{}"),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class ArtifactMetaStore:
    def __init__(self, redis: Redis, *, prefix: str = "") -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, artifact_id: str) -> str:
        return f"{self.prefix}art:{artifact_id}"

    def _index(self, tenant: str | None) -> str:
        return f"{self.prefix}arts:idx" + (f":t:{tenant}" if tenant is not None else "")

    async def commit(self, meta: ArtifactMeta, longest_ttl_ms: int) -> None:
        pipe = self.redis.pipeline(transaction=True)
        key = self.key(meta.id)
        pipe.hset(
            key,
            mapping={
                "tenant": meta.tenant,
                "content_type": meta.content_type,
                "size": meta.size,
                "sha256": meta.sha256,
                "retention": meta.retention,
                "labels": json.dumps(meta.labels, separators=(",", ":")),
                "created_ms": meta.created_ms,
                "expires_ms": meta.expires_ms,
                "backend": meta.backend,
                "location": meta.location,
            },
        )
        pipe.pexpireat(key, meta.expires_ms)
        oldest = meta.created_ms - longest_ttl_ms
        for index in (self._index(None), self._index(meta.tenant)):
            pipe.zadd(index, {meta.id: meta.created_ms})
            pipe.zremrangebyscore(index, "-inf", oldest)
        await pipe.execute()

    async def get(self, artifact_id: str) -> ArtifactMeta | None:
        meta = _meta(artifact_id, await self.redis.hgetall(self.key(artifact_id)))
        if meta is None or meta.expires_ms <= _now_ms():
            return None
        return meta

    async def delete(self, meta: ArtifactMeta) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key(meta.id))
        pipe.zrem(self._index(None), meta.id)
        pipe.zrem(self._index(meta.tenant), meta.id)
        deleted, _, _ = await pipe.execute()
        return bool(deleted)

    async def list(
        self, tenant: str | None, page_size: int, after: tuple[int, str] | None
    ) -> ArtifactPage:
        """Newest first; `tenant` None lists every tenant's artifacts."""
        index = self._index(tenant)
        found: list[ArtifactMeta] = []
        high: float | str = after[0] if after else "+inf"
        offset, batch, scanned = 0, max(page_size * 2, 50), 0
        now = _now_ms()
        while len(found) < page_size and scanned < 10_000:
            rows = await self.redis.zrevrangebyscore(
                index, high, "-inf", start=offset, num=batch, withscores=True
            )
            if not rows:
                break
            offset += len(rows)
            scanned += len(rows)
            listed = [
                (member.decode(), int(score))
                for member, score in rows
                if after is None or (int(score), member.decode()) < after
            ]
            pipe = self.redis.pipeline(transaction=False)
            for artifact_id, _ in listed:
                pipe.hgetall(self.key(artifact_id))
            gone = []
            for (artifact_id, _), raw in zip(listed, await pipe.execute(), strict=True):
                meta = _meta(artifact_id, raw)
                if meta is None or meta.expires_ms <= now:
                    gone.append(artifact_id)
                    continue
                found.append(meta)
                if len(found) == page_size:
                    break
            if gone:
                await self.redis.zrem(index, *gone)
                offset -= len(gone)
            if len(rows) < batch:
                break
        more = len(found) == page_size
        return ArtifactPage(found, (found[-1].created_ms, found[-1].id) if more else None)
