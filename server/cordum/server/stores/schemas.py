"""The JSON Schema registry in Redis.

Keys (under the store's prefix):

  schema:<id>     STRING  the schema itself, as JSON (what `get_schema` returns; the workflow
                          engine and job validation read this key directly)
  schemas:index   ZSET    every id, score 0, listed in id order (ZRANGEBYLEX), bounded:
                          registering a new id beyond `max_schemas` is refused, so no key
                          outlives the index (upstream trimmed the index and left the
                          schema keys behind)
  schemas:meta    HASH    id → "<created ms>|<updated ms>|<sha256>"

Ids never contain `:`, so `schema:<id>` cannot collide with the `schemas:` keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from cordum.server.jsonvalue import canonical_json
from cordum.server.stores import scripts


class SchemaLookup(Protocol):
    """What a consumer (workflow engine, job validation) needs: the schema of an id."""

    async def get_schema(self, schema_id: str) -> dict[str, Any] | None: ...


def schema_key(prefix: str, schema_id: str) -> str:
    return f"{prefix}schema:{schema_id}"


async def get_schema(redis: Redis, prefix: str, schema_id: str) -> dict[str, Any] | None:
    """The registered schema `schema_id` (a JSON object), or None. One GET."""
    raw = await redis.get(schema_key(prefix, schema_id))
    if not raw:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class StoredSchema:
    id: str
    schema: dict[str, Any]
    sha256: str
    created_ms: int
    updated_ms: int


@dataclass(frozen=True)
class SchemaPage:
    schemas: list[StoredSchema]
    next_token: str


def _meta(raw: bytes | None) -> tuple[int, int, str]:
    if not raw:
        return 0, 0, ""
    created, updated, sha = raw.decode().split("|", 2)
    return int(created), int(updated), sha


class SchemaStore:
    def __init__(self, redis: Redis, *, prefix: str = "", max_schemas: int = 10_000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_schemas = max_schemas
        self._index = f"{prefix}schemas:index"
        self._meta = f"{prefix}schemas:meta"
        self._put = scripts.load(redis, "schema_put.lua")

    def key(self, schema_id: str) -> str:
        return schema_key(self.prefix, schema_id)

    async def get_schema(self, schema_id: str) -> dict[str, Any] | None:
        return await get_schema(self.redis, self.prefix, schema_id)

    async def put(
        self, schema_id: str, schema: dict[str, Any], sha256: str, now_ms: int
    ) -> StoredSchema | None:
        """Store (create or replace); None when the registry is full and the id is new."""
        status, created = await self._put(
            keys=[self.key(schema_id), self._index, self._meta],
            args=[schema_id, canonical_json(schema), now_ms, sha256, self.max_schemas],
        )
        if int(status) == 0:
            return None
        return StoredSchema(schema_id, schema, sha256, int(created), now_ms)

    async def get(self, schema_id: str) -> StoredSchema | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.key(schema_id))
        pipe.hget(self._meta, schema_id)
        raw, meta = await pipe.execute()
        if not raw:
            return None
        created, updated, sha = _meta(meta)
        return StoredSchema(schema_id, json.loads(raw), sha, created, updated)

    async def delete(self, schema_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key(schema_id))
        pipe.zrem(self._index, schema_id)
        pipe.hdel(self._meta, schema_id)
        deleted, _, _ = await pipe.execute()
        return bool(deleted)

    async def list(self, page_size: int, after: str) -> SchemaPage:
        """Schemas in id order, starting after the id `after` ("" = from the start)."""
        start = b"(" + after.encode() if after else b"-"
        ids = await self.redis.zrangebylex(self._index, start, b"+", start=0, num=page_size + 1)
        more = len(ids) > page_size
        ids = [i.decode() for i in ids[:page_size]]
        if not ids:
            return SchemaPage([], "")
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([self.key(i) for i in ids])
        pipe.hmget(self._meta, ids)
        raws, metas = await pipe.execute()
        out = []
        for schema_id, raw, meta in zip(ids, raws, metas, strict=True):
            if raw:  # deleted between the two reads
                created, updated, sha = _meta(meta)
                out.append(StoredSchema(schema_id, json.loads(raw), sha, created, updated))
        return SchemaPage(out, ids[-1] if more else "")
