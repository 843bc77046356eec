"""Artifacts: blobs with a content type, a size, a SHA-256 and a retention class.

- Pointers are `redis://art:<id>` (id: 32 hex digits) whatever backend holds the bytes, so
  CAP workers and job results (`artifact_ptrs`) see one pointer form; the metadata in Redis
  says where the bytes are (`backend`, `location`).
- Retention class → TTL: `short` 24 h, `standard` (default) 7 d, `audit` 30 d (settings).
  An unknown class is refused (upstream silently used `standard`).
- Size: the server's limit (`artifact_max_bytes`, default 64 MiB) and the caller's
  `max_bytes`, whichever is smaller; exceeding it is RESOURCE_EXHAUSTED ARTIFACT_TOO_LARGE
  and leaves nothing behind. Empty artifacts are refused (as upstream).
- Bytes stream both ways: an upload is written piece by piece while its SHA-256 is computed,
  a download reads piece by piece; neither holds the whole artifact. The metadata is written
  last, so an incomplete or refused upload is never visible, and its pieces are removed.
- Tenancy: an artifact belongs to the caller's tenant (label `tenant_id`, filled in as
  upstream does); another tenant's artifact is NOT_FOUND (upstream: 403), so its existence
  does not leak.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from cordum.server.errors import CordumError, Violations, invalid_field, not_found
from cordum.server.services.caller import Caller
from cordum.server.services.job_validation import (
    LABEL_KEY_RE,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    TENANT_RE,
)
from cordum.server.stores.artifacts import (
    ArtifactBackend,
    ArtifactMeta,
    ArtifactMetaStore,
    BlobInfo,
    BlobMissing,
)
from cordum.v1 import error_reason_pb2

logger = logging.getLogger(__name__)
R = error_reason_pb2

ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_CONTENT_TYPE = 200
DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 2 * 1024 * 1024
# GetArtifact answers in one message; larger artifacts are for DownloadArtifact.
MAX_UNARY_BYTES = 3 * 1024 * 1024
DEFAULT_PAGE = 50
MAX_PAGE = 500
POINTER_PREFIX = "redis://"


@dataclass(frozen=True)
class ArtifactLimits:
    max_bytes: int = 64 * 1024 * 1024
    ttl_s: Mapping[str, int] = field(
        default_factory=lambda: {
            "short": 24 * 3600,
            "standard": 7 * 24 * 3600,
            "audit": 30 * 24 * 3600,
        }
    )
    max_unary_bytes: int = MAX_UNARY_BYTES


@dataclass(frozen=True)
class ArtifactHeader:
    content_type: str = ""
    retention: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    max_bytes: int = 0


@dataclass(frozen=True)
class ArtifactListing:
    artifacts: list[ArtifactMeta]
    next_token: str


def pointer(artifact_id: str) -> str:
    return f"{POINTER_PREFIX}art:{artifact_id}"


def artifact_id_of(value: str, field_name: str = "artifact_ptr") -> str:
    """The id in `redis://art:<id>` (also accepted: `art:<id>`)."""
    text = value.strip()
    key = text.removeprefix(POINTER_PREFIX)
    if not text:
        raise invalid_field(field_name, "required (`redis://art:<id>`)")
    if not key.startswith("art:") or not ID_RE.match(key[4:]):
        raise invalid_field(field_name, "must be an artifact pointer `redis://art:<32 hex>`")
    return key[4:]


def _too_large(limit: int) -> CordumError:
    return CordumError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        R.ERROR_REASON_ARTIFACT_TOO_LARGE,
        f"artifact too large: the limit is {limit} bytes",
        metadata={"limit_bytes": str(limit)},
    )


def _missing(artifact_id: str) -> CordumError:
    return not_found(
        R.ERROR_REASON_ARTIFACT_NOT_FOUND, f"artifact {pointer(artifact_id)} not found"
    )


class ArtifactService:
    def __init__(
        self,
        meta: ArtifactMetaStore,
        backends: Mapping[str, ArtifactBackend],
        *,
        default_backend: str = "redis",
        limits: ArtifactLimits | None = None,
    ) -> None:
        if default_backend not in backends:
            raise ValueError(f"unknown artifact backend {default_backend!r}")
        self._meta = meta
        self._backends = dict(backends)
        self._default = default_backend
        self.limits = limits or ArtifactLimits()

    def backend(self, name: str) -> ArtifactBackend:
        """The byte store called `name` (`redis`, `s3`)."""
        return self._backends[name]

    # -- writing ----------------------------------------------------------------------

    def check_header(
        self, header: ArtifactHeader, caller: Caller, prefix: str = ""
    ) -> tuple[ArtifactHeader, str, int]:
        """The header with defaults filled in, its tenant and the effective size limit."""
        problems = Violations()
        content_type = header.content_type.strip() or "application/octet-stream"
        if len(content_type) > MAX_CONTENT_TYPE or any(ord(c) < 0x20 for c in content_type):
            problems.add(
                f"{prefix}content_type", f"at most {MAX_CONTENT_TYPE} printable characters"
            )
        retention = header.retention.strip().lower() or "standard"
        if retention not in self.limits.ttl_s:
            problems.add(
                f"{prefix}retention", f"must be one of {', '.join(sorted(self.limits.ttl_s))}"
            )
        labels = dict(header.labels)
        if len(labels) > MAX_LABELS:
            problems.add(f"{prefix}labels", f"at most {MAX_LABELS} entries")
        for key, value in labels.items():
            if not LABEL_KEY_RE.match(key):
                problems.add(f"{prefix}labels[{key}]", "key: 1-100 characters from [A-Za-z0-9._/-]")
            if len(value) > MAX_LABEL_VALUE:
                problems.add(
                    f"{prefix}labels[{key}]", f"value: at most {MAX_LABEL_VALUE} characters"
                )
        requested = labels.get("tenant_id", "")
        caller.check_tenant(requested, f"{prefix}labels[tenant_id]")
        tenant = caller.tenant_for(requested)
        if not TENANT_RE.match(tenant):
            problems.add(f"{prefix}labels[tenant_id]", "1-100 characters from [A-Za-z0-9._-]")
        if header.max_bytes < 0:
            problems.add(f"{prefix}max_bytes", "must not be negative")
        problems.raise_if_any()
        labels["tenant_id"] = tenant
        limit = self.limits.max_bytes
        if header.max_bytes:
            limit = min(limit, header.max_bytes)
        checked = ArtifactHeader(content_type, retention, labels, header.max_bytes)
        return checked, tenant, limit

    async def put(
        self,
        header: ArtifactHeader,
        chunks: AsyncIterable[bytes],
        caller: Caller,
        *,
        chunk_field: str = "chunk",
        header_prefix: str = "",
        verify: Callable[[int, str], None] | None = None,
    ) -> ArtifactMeta:
        """Store the bytes `chunks` yields (already-checked callers may pass any iterable).
        `verify(size, sha256_hex)` runs before anything is committed and may refuse."""
        header, tenant, limit = self.check_header(header, caller, header_prefix)
        now = int(time.time() * 1000)
        expires = now + self.limits.ttl_s[header.retention] * 1000
        artifact_id = uuid.uuid4().hex
        backend = self._backends[self._default]
        writer = backend.writer(
            artifact_id, BlobInfo(tenant, header.retention, header.content_type, expires)
        )
        digest = hashlib.sha256()
        size = 0
        try:
            async for piece in chunks:
                size += len(piece)
                if size > limit:
                    raise _too_large(limit)
                digest.update(piece)
                await writer.write(piece)
            if size == 0:
                raise invalid_field(chunk_field, "the artifact is empty: send at least one byte")
            if verify is not None:
                verify(size, digest.hexdigest())
            location = await writer.commit()
        except BaseException:
            await _quietly(writer.abort())
            raise
        meta = ArtifactMeta(
            id=artifact_id,
            tenant=tenant,
            content_type=header.content_type,
            size=size,
            sha256=digest.hexdigest(),
            retention=header.retention,
            created_ms=now,
            expires_ms=expires,
            backend=backend.name,
            location=location,
            labels=dict(header.labels),
        )
        try:
            await self._meta.commit(meta, max(self.limits.ttl_s.values()) * 1000)
        except BaseException:
            await _quietly(backend.delete(artifact_id, location))
            raise
        return meta

    # -- reading ----------------------------------------------------------------------

    async def metadata(self, ptr: str, caller: Caller) -> ArtifactMeta:
        artifact_id = artifact_id_of(ptr)
        meta = await self._meta.get(artifact_id)
        if meta is None or not caller.can_see(meta.tenant):
            raise _missing(artifact_id)
        return meta

    def _backend(self, meta: ArtifactMeta) -> ArtifactBackend:
        backend = self._backends.get(meta.backend)
        if backend is None:
            raise CordumError(
                grpc.StatusCode.UNAVAILABLE,
                R.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
                f"artifact {meta.id} is stored in backend {meta.backend!r}, "
                "which this server is not configured for",
            )
        return backend

    async def stream(self, meta: ArtifactMeta, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The artifact's bytes in pieces of at most `chunk_bytes`."""
        backend = self._backend(meta)
        try:
            async for piece in backend.read(meta.id, meta.location, chunk_bytes):
                for start in range(0, len(piece), chunk_bytes):
                    yield piece[start : start + chunk_bytes]
        except BlobMissing:
            raise _missing(meta.id) from None

    async def download(
        self, ptr: str, chunk_size: int, caller: Caller
    ) -> tuple[ArtifactMeta, AsyncIterator[bytes]]:
        if chunk_size < 0 or chunk_size > MAX_CHUNK:
            raise invalid_field(
                "chunk_size", f"must be between 0 (default {DEFAULT_CHUNK}) and {MAX_CHUNK}"
            )
        meta = await self.metadata(ptr, caller)
        return meta, self.stream(meta, chunk_size or DEFAULT_CHUNK)

    async def read_prefix(self, meta: ArtifactMeta, limit: int) -> bytes:
        """At most `limit` bytes from the start of the artifact."""
        out = bytearray()
        stream = self.stream(meta, min(max(limit, 1), DEFAULT_CHUNK))
        try:
            async for piece in stream:
                out += piece[: limit - len(out)]
                if len(out) >= limit:
                    break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return bytes(out)

    async def get(self, ptr: str, caller: Caller) -> tuple[ArtifactMeta, bytes]:
        meta = await self.metadata(ptr, caller)
        if meta.size > self.limits.max_unary_bytes:
            error = _too_large(self.limits.max_unary_bytes)
            error.message = (
                f"artifact {pointer(meta.id)} has {meta.size} bytes, more than GetArtifact "
                f"returns ({self.limits.max_unary_bytes}); use DownloadArtifact"
            )
            raise error
        return meta, await self.read_prefix(meta, meta.size)

    async def delete(self, ptr: str, caller: Caller) -> None:
        meta = await self.metadata(ptr, caller)
        if not await self._meta.delete(meta):
            raise _missing(meta.id)
        await _quietly(self._backend(meta).delete(meta.id, meta.location))

    async def list(self, page_size: int, page_token: str, caller: Caller) -> ArtifactListing:
        problems = Violations()
        if page_size < 0:
            problems.add("page_size", "must not be negative")
        scope = caller.tenant or ""
        after: tuple[int, str] | None = None
        if page_token:
            try:
                raw = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (int(raw["s"]), str(raw["m"]))
                if raw["t"] != scope:
                    problems.add("page_token", "the token belongs to another caller")
            except (binascii.Error, ValueError, KeyError, TypeError):
                problems.add("page_token", "not a token from a previous ListArtifacts")
        problems.raise_if_any()
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        page = await self._meta.list(caller.tenant, size, after)
        token = ""
        if page.next_after is not None:
            raw_token = {"s": page.next_after[0], "m": page.next_after[1], "t": scope}
            token = base64.urlsafe_b64encode(json.dumps(raw_token).encode()).decode()
        return ArtifactListing(page.artifacts, token)

    async def close(self) -> None:
        for backend in self._backends.values():
            await _quietly(backend.close())


async def _quietly(step: object) -> None:
    """Run a clean-up step; its failure must not hide the error that made it necessary."""
    try:
        await step  # type: ignore[misc]
    except Exception:
        logger.warning("artifact clean-up step failed", exc_info=True)


async def single(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data
