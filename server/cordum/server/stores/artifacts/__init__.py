"""Artifact storage: metadata and pointers in Redis, bytes in a pluggable backend
(`RedisBackend`, chunked in Redis; `S3Backend`, S3-compatible object storage)."""

from cordum.server.stores.artifacts.backend import (
    ArtifactBackend,
    BlobInfo,
    BlobMissing,
    BlobWriter,
)
from cordum.server.stores.artifacts.meta import ArtifactMeta, ArtifactMetaStore, ArtifactPage
from cordum.server.stores.artifacts.redis_backend import RedisBackend

__all__ = [
    "ArtifactBackend",
    "ArtifactMeta",
    "ArtifactMetaStore",
    "ArtifactPage",
    "BlobInfo",
    "BlobMissing",
    "BlobWriter",
    "RedisBackend",
]
