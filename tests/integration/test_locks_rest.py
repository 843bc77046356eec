"""LockService as REST through Envoy (upstream's /api/v1/locks paths)."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from cordum.server.app import App

from support.admin import keys_with, rest_reason, rest_violations


async def test_lock_lifecycle_over_rest(rest_url: str, prefix: str) -> None:
    resource = f"pack/{prefix}"
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        acquired = await http.post(
            "/api/v1/locks/acquire", json={"resource": resource, "owner": "a", "ttl_ms": 60_000}
        )
        assert acquired.status_code == 200, acquired.text
        lock = acquired.json()
        assert (lock["resource"], lock["mode"], lock["owners"]) == (
            resource,
            "exclusive",
            {"a": 1},
        )
        assert int(lock["fencing_token"]) > 0  # int64: a JSON string
        assert lock["expires_at"].endswith("Z")

        # Upstream's query form and the path form read the same lock.
        by_query = await http.get("/api/v1/locks", params={"resource": resource})
        assert by_query.status_code == 200, by_query.text
        by_path = await http.get(f"/api/v1/locks/{quote(resource, safe='')}")
        assert by_path.status_code == 200, by_path.text
        assert by_query.json()["owners"] == by_path.json()["owners"] == {"a": 1}

        listed = await http.get("/api/v1/locks:list", params={"prefix": f"pack/{prefix}"})
        assert listed.status_code == 200, listed.text
        assert [lock["resource"] for lock in listed.json()["locks"]] == [resource]

        held = await http.post("/api/v1/locks/acquire", json={"resource": resource, "owner": "b"})
        assert held.status_code == 400  # FAILED_PRECONDITION (upstream: 409)
        assert rest_reason(held.json()) == "LOCK_HELD"

        renewed = await http.post(
            "/api/v1/locks/renew", json={"resource": resource, "owner": "a", "ttl_ms": 5000}
        )
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["fencing_token"] == lock["fencing_token"]

        for path in ("/api/v1/locks/renew", "/api/v1/locks/release"):
            not_held = await http.post(path, json={"resource": resource, "owner": "b"})
            assert not_held.status_code == 400, path
            assert rest_reason(not_held.json()) == "LOCK_NOT_HELD"

        released = await http.post(
            "/api/v1/locks/release", json={"resource": resource, "owner": "a"}
        )
        assert released.status_code == 200, released.text
        assert released.json() == {"released": True}

        for response in (
            await http.get("/api/v1/locks", params={"resource": resource}),
            await http.post("/api/v1/locks/release", json={"resource": resource, "owner": "a"}),
            await http.post("/api/v1/locks/renew", json={"resource": resource, "owner": "a"}),
        ):
            assert response.status_code == 404
            assert rest_reason(response.json()) == "LOCK_NOT_FOUND"


async def test_bad_lock_requests_are_400_naming_the_field(
    cordum: App, rest_url: str, prefix: str
) -> None:
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        bad = await http.post(
            "/api/v1/locks/acquire",
            json={"resource": f"r-{prefix}", "owner": "", "mode": "both", "ttl_ms": -1},
        )
        assert bad.status_code == 400
        assert rest_reason(bad.json()) == "INVALID_ARGUMENT"
        assert set(rest_violations(bad.json())) == {"owner", "mode", "ttl_ms"}

        missing = await http.get("/api/v1/locks")
        assert missing.status_code == 400
        assert set(rest_violations(missing.json())) == {"resource"}

        not_json = await http.post(
            "/api/v1/locks/acquire",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert not_json.status_code == 400
    assert await keys_with(cordum, prefix) == []
