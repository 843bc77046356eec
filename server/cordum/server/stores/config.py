"""Config documents in Redis, one JSON string per scope and id.

Key (under the store's prefix): `cfg:<scope>:<scope_id>` → JSON
`{scope, scope_id, data, revision, updated_at, updated_by, meta, origin, files_sha256}`.
`origin` is `files` when the document was written from the config/*.yaml defaults and
`api` when written through SetConfig; `files_sha256` is the hash of the files it was last
loaded from. Both decide whether a changed file may replace the stored system document on
start (see services/config_service.py).

Every write is a compare-and-set on the whole stored value (one Lua call), so the revision
really increments under concurrent writers and `expected_revision` is honoured exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from redis.asyncio import Redis

from cordum.server.errors import CordumError
from cordum.server.stores import scripts
from cordum.v1 import error_reason_pb2

_MAX_CAS_ATTEMPTS = 20


@dataclass(frozen=True)
class StoredConfig:
    scope: str
    scope_id: str
    data: dict[str, Any]
    revision: int
    updated_at: str = ""
    updated_by: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    origin: str = "api"
    files_sha256: str = ""

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "scope": self.scope,
                "scope_id": self.scope_id,
                "data": self.data,
                "revision": self.revision,
                "updated_at": self.updated_at,
                "updated_by": self.updated_by,
                "meta": self.meta,
                "origin": self.origin,
                "files_sha256": self.files_sha256,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StoredConfig:
        doc = json.loads(raw)
        return cls(
            scope=str(doc.get("scope", "")),
            scope_id=str(doc.get("scope_id", "")),
            data=doc.get("data") or {},
            revision=int(doc.get("revision") or 0),
            updated_at=str(doc.get("updated_at") or ""),
            updated_by=str(doc.get("updated_by") or ""),
            meta={str(k): str(v) for k, v in (doc.get("meta") or {}).items()},
            origin=str(doc.get("origin") or "api"),
            files_sha256=str(doc.get("files_sha256") or ""),
        )


# Given what is stored now (None: nothing), the document to write, or None to write nothing.
Update = Callable[[StoredConfig | None], StoredConfig | None]


def revision_mismatch(scope: str, scope_id: str, expected: int, actual: int) -> CordumError:
    return CordumError(
        grpc.StatusCode.ABORTED,
        error_reason_pb2.ERROR_REASON_REVISION_MISMATCH,
        f"config {scope}/{scope_id} is at revision {actual}, not {expected}",
        metadata={"expected_revision": str(expected), "revision": str(actual)},
    )


class ConfigStore:
    def __init__(self, redis: Redis, *, prefix: str = "") -> None:
        self.redis = redis
        self.prefix = prefix
        self._cas = scripts.load(redis, "cas_set.lua")

    def key(self, scope: str, scope_id: str) -> str:
        return f"{self.prefix}cfg:{scope}:{scope_id}"

    async def get(self, scope: str, scope_id: str) -> StoredConfig | None:
        raw = await self.redis.get(self.key(scope, scope_id))
        return StoredConfig.from_json(raw) if raw else None

    async def get_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredConfig | None]:
        """Several documents in one round trip (MGET), in the order asked."""
        if not refs:
            return []
        raws = await self.redis.mget([self.key(s, i) for s, i in refs])
        return [StoredConfig.from_json(r) if r else None for r in raws]

    async def update(
        self, scope: str, scope_id: str, build: Update, *, expected_revision: int | None = None
    ) -> StoredConfig | None:
        """Read, build the next document, compare-and-set; retried when another writer won.

        With `expected_revision` a lost race is not retried: the stored revision no longer
        matches, so the caller gets ABORTED (REVISION_MISMATCH). `build` must set the new
        revision (current + 1). Returns what was written, or the current document when
        `build` chose to write nothing.
        """
        key = self.key(scope, scope_id)
        for _ in range(_MAX_CAS_ATTEMPTS):
            raw = await self.redis.get(key)
            current = StoredConfig.from_json(raw) if raw else None
            actual = current.revision if current is not None else 0
            if expected_revision is not None and expected_revision != actual:
                raise revision_mismatch(scope, scope_id, expected_revision, actual)
            doc = build(current)
            if doc is None:
                return current
            if await self._cas(keys=[key], args=[raw or b"", doc.to_json()]):
                return doc
        raise CordumError(
            grpc.StatusCode.ABORTED,
            error_reason_pb2.ERROR_REASON_REVISION_MISMATCH,
            f"config {scope}/{scope_id} is being written concurrently; try again",
        )
