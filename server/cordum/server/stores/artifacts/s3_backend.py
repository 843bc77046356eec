"""Artifact bytes in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto), via boto3.

  <bucket>/<prefix><id>   one object per artifact

Uploads stream: pieces are gathered into parts of `part_bytes` (S3 wants at least 5 MiB per
part except the last) and sent as a multipart upload as they fill, so at most one part is
in memory; an artifact smaller than one part is a single PUT. Reads stream the object body.

Expiry: the metadata in Redis expires with the retention class, which is what makes an
artifact unreadable through the API. The object carries the same facts as user metadata
(`expires-ms`, `tenant`, `retention`) and a `retention=<class>` tag; a read also refuses an
object whose `expires-ms` has passed. S3 deletes nothing by itself: give the bucket a
lifecycle rule per retention tag (expire `retention=short` after 1 day, `standard` after 7,
`audit` after 30), or one rule expiring the prefix after 30 days, so the bytes of expired
artifacts are removed too.

boto3 is synchronous; each call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from cordum.server.stores.artifacts.backend import BlobInfo, BlobMissing

DEFAULT_PART_BYTES = 8 * 1024 * 1024
MIN_PART_BYTES = 5 * 1024 * 1024


def _missing(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


class _S3Writer:
    def __init__(self, backend: S3Backend, key: str, info: BlobInfo) -> None:
        self._backend = backend
        self._key = key
        self._info = info
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._committed = False

    def _object_args(self) -> dict[str, Any]:
        info = self._info
        return {
            "Bucket": self._backend.bucket,
            "Key": self._key,
            "ContentType": info.content_type,
            "Metadata": {
                "expires-ms": str(info.expires_ms),
                "tenant": info.tenant,
                "retention": info.retention,
            },
            "Tagging": f"retention={quote(info.retention)}",
        }

    async def _send_part(self, part: bytes) -> None:
        client = self._backend.client
        if self._upload_id is None:
            created = await asyncio.to_thread(client.create_multipart_upload, **self._object_args())
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        sent = await asyncio.to_thread(
            client.upload_part,
            Bucket=self._backend.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=part,
        )
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})

    async def write(self, data: bytes) -> None:
        size = self._backend.part_bytes
        self._buffer += data
        while len(self._buffer) >= size:
            part = bytes(self._buffer[:size])
            del self._buffer[:size]
            await self._send_part(part)

    async def commit(self) -> str:
        client = self._backend.client
        if self._upload_id is None:
            body = bytes(self._buffer)
            self._buffer.clear()
            await asyncio.to_thread(client.put_object, Body=body, **self._object_args())
        else:
            if self._buffer:
                part = bytes(self._buffer)
                self._buffer.clear()
                await self._send_part(part)
            await asyncio.to_thread(
                client.complete_multipart_upload,
                Bucket=self._backend.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._committed = True
        return f"s3://{self._backend.bucket}/{self._key}"

    async def abort(self) -> None:
        self._buffer.clear()
        client = self._backend.client
        if self._committed:
            await asyncio.to_thread(
                client.delete_object, Bucket=self._backend.bucket, Key=self._key
            )
        elif self._upload_id is not None:
            await asyncio.to_thread(
                client.abort_multipart_upload,
                Bucket=self._backend.bucket,
                Key=self._key,
                UploadId=self._upload_id,
            )


class S3Backend:
    name = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "cordum/artifacts/",
        endpoint_url: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        part_bytes: int = DEFAULT_PART_BYTES,
        read_bytes: int = 1024 * 1024,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("the S3 artifact backend needs a bucket (artifact_s3_bucket)")
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = max(part_bytes, MIN_PART_BYTES)
        self.read_bytes = read_bytes
        credentials: dict[str, str] = {}
        if access_key_id:
            credentials = {
                "aws_access_key_id": access_key_id,
                "aws_secret_access_key": secret_access_key,
            }
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            config=Config(
                # Path-style works with every S3-compatible server, also on an IP address.
                s3={"addressing_style": "path"} if endpoint_url else {},
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=32,
            ),
            **credentials,
        )

    def object_key(self, artifact_id: str) -> str:
        return f"{self.prefix}{artifact_id}"

    def writer(self, artifact_id: str, info: BlobInfo) -> _S3Writer:
        return _S3Writer(self, self.object_key(artifact_id), info)

    def _locate(self, artifact_id: str, location: str) -> tuple[str, str]:
        if location.startswith("s3://"):
            bucket, _, key = location.removeprefix("s3://").partition("/")
            return bucket, key
        return self.bucket, self.object_key(artifact_id)

    async def read(self, artifact_id: str, location: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        bucket, key = self._locate(artifact_id, location)
        try:
            found = await asyncio.to_thread(self.client.get_object, Bucket=bucket, Key=key)
        except Exception as error:
            if _missing(error):
                raise BlobMissing(artifact_id) from None
            raise
        body = found["Body"]
        try:
            expires = int(found.get("Metadata", {}).get("expires-ms") or 0)
            if expires and expires <= time.time() * 1000:
                raise BlobMissing(artifact_id)
            size = min(chunk_bytes, self.read_bytes)
            while True:
                data = await asyncio.to_thread(body.read, size)
                if not data:
                    return
                yield data
        finally:
            await asyncio.to_thread(body.close)

    async def delete(self, artifact_id: str, location: str) -> None:
        bucket, key = self._locate(artifact_id, location)
        await asyncio.to_thread(self.client.delete_object, Bucket=bucket, Key=key)

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)
