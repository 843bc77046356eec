"""ArtifactService as REST through Envoy: upstream's body (`content_base64`), the pointer
URL-encoded in the path, the streamed download, delete, list, and errors as JSON."""

from __future__ import annotations

import base64
import hashlib
import json
from urllib.parse import quote

import httpx

from cordum.server.app import App

from support.admin import rest_reason, rest_violations


def path(ptr: str, suffix: str = "") -> str:
    return f"/api/v1/artifacts/{quote(ptr, safe='')}{suffix}"


async def test_put_get_download_delete_over_rest(cordum: App, rest_url: str, prefix: str) -> None:
    content = b"\x00rest artifact " + prefix.encode() + b"\xff"
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        put = await http.post(
            "/api/v1/artifacts",
            json={
                "content_base64": base64.b64encode(content).decode(),
                "content_type": "application/x-bin",
                "retention": "short",
                "labels": {"p": prefix},
            },
        )
        assert put.status_code == 200, put.text
        body = put.json()
        ptr = body["artifact_ptr"]
        assert ptr.startswith("redis://art:")
        assert body["size_bytes"] == str(len(content))  # int64 in JSON
        assert body["metadata"]["sha256"] == hashlib.sha256(content).hexdigest()
        assert body["metadata"]["labels"] == {"p": prefix, "tenant_id": "default"}
        assert body["metadata"]["retention"] == "short"

        got = await http.get(path(ptr))
        assert got.status_code == 200, got.text
        assert base64.b64decode(got.json()["content_base64"]) == content
        assert got.json()["metadata"]["content_type"] == "application/x-bin"

        # The server stream arrives as server-sent events: metadata, then the chunks.
        download = await http.get(path(ptr, ":download"))
        assert download.status_code == 200, download.text
        events = [
            json.loads(line.removeprefix("data: "))
            for line in download.text.splitlines()
            if line.startswith("data: ")
        ]
        assert events[0]["metadata"]["size_bytes"] == str(len(content))
        chunks = b"".join(base64.b64decode(e["chunk"]) for e in events[1:])
        assert chunks == content

        listed = await http.get("/api/v1/artifacts", params={"page_size": 500})
        assert listed.status_code == 200
        assert ptr in [a["artifact_ptr"] for a in listed.json()["artifacts"]]

        deleted = await http.delete(path(ptr))
        assert deleted.status_code == 200, deleted.text
        missing = await http.get(path(ptr))
        assert missing.status_code == 404
        assert rest_reason(missing.json()) == "ARTIFACT_NOT_FOUND"

        text = await http.post("/api/v1/artifacts", json={"content": "plain"})
        assert text.status_code == 200, text.text
        assert text.json()["metadata"]["content_type"] == "text/plain; charset=utf-8"
        await http.delete(path(text.json()["artifact_ptr"]))


async def test_artifact_errors_over_rest(cordum: App, rest_url: str, prefix: str) -> None:
    assert cordum.redis is not None
    before = set(await cordum.redis.keys(f"{cordum.settings.namespace}art*"))
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        empty = await http.post("/api/v1/artifacts", json={"content_type": "text/plain"})
        assert empty.status_code == 400
        assert set(rest_violations(empty.json())) == {"content_base64"}

        bad = await http.post(
            "/api/v1/artifacts",
            json={"content": "x", "retention": "forever", "labels": {"a b": "c"}},
        )
        assert bad.status_code == 400
        assert set(rest_violations(bad.json())) == {"retention", "labels[a b]"}

        not_base64 = await http.post("/api/v1/artifacts", json={"content_base64": "%%%"})
        assert not_base64.status_code == 400

        too_large = await http.post(
            "/api/v1/artifacts", json={"content": "0123456789", "max_bytes": 5}
        )
        assert too_large.status_code == 429  # RESOURCE_EXHAUSTED (upstream: 413)
        assert rest_reason(too_large.json()) == "ARTIFACT_TOO_LARGE"

        malformed = await http.get(path("redis://art:nope"))
        assert malformed.status_code == 400  # upstream: 500
        assert set(rest_violations(malformed.json())) == {"artifact_ptr"}
    assert set(await cordum.redis.keys(f"{cordum.settings.namespace}art*")) == before
