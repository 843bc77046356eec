"""ConfigService as REST through Envoy (upstream's /api/v1/config paths)."""

from __future__ import annotations

import hashlib
import json

import httpx

from cordum.server.app import App

from support.admin import keys_with, rest_reason, rest_violations


async def test_set_get_effective_and_reload_over_rest(rest_url: str, prefix: str) -> None:
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        org = f"rest-{prefix}"
        created = await http.post(
            "/api/v1/config",
            json={"scope": "org", "scope_id": org, "data": {"limits": {"a": 1, "b": [1, 2]}}},
        )
        assert created.status_code == 200, created.text
        body = created.json()
        assert (body["scope"], body["scope_id"], body["revision"]) == ("org", org, "1")
        assert body["data"] == {"limits": {"a": 1, "b": [1, 2]}}

        team = await http.post(
            "/api/v1/config",
            json={
                "scope": "team",
                "scope_id": f"team-{prefix}",
                "data": {"limits": {"b": [3]}},
                "expected_revision": 0,
            },
        )
        assert team.status_code == 200, team.text

        got = await http.get("/api/v1/config", params={"scope": "org", "scope_id": org})
        assert got.status_code == 200
        assert got.json()["data"] == {"limits": {"a": 1, "b": [1, 2]}}

        effective = await http.get(
            "/api/v1/config/effective", params={"org_id": org, "team_id": f"team-{prefix}"}
        )
        assert effective.status_code == 200, effective.text
        eff = effective.json()
        assert eff["data"]["limits"] == {"a": 1, "b": [3]}
        assert "|org:1|team:1|workflow:0|step:0" in eff["version"]
        canonical = json.dumps(eff["data"], sort_keys=True, separators=(",", ":"))
        assert eff["hash"] == hashlib.sha256(canonical.encode()).hexdigest()

        system = await http.get("/api/v1/config")
        assert system.status_code == 200
        assert (system.json()["scope"], system.json()["scope_id"]) == ("system", "default")

        reloaded = await http.post("/api/v1/config:reload", json={})
        assert reloaded.status_code == 200, reloaded.text
        assert any(f.endswith("pools.yaml") for f in reloaded.json()["files"])
        assert reloaded.json()["document"]["updated_by"] in ("", "config-files")


async def test_rest_errors_map_to_http_status_with_named_fields(
    cordum: App, rest_url: str, prefix: str
) -> None:
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        bad = await http.post(
            "/api/v1/config", json={"scope": "planet", "scope_id": f"x {prefix}", "data": {}}
        )
        assert bad.status_code == 400
        assert rest_reason(bad.json()) == "INVALID_ARGUMENT"
        assert set(rest_violations(bad.json())) == {"scope", "scope_id"}

        no_data = await http.post("/api/v1/config", json={"scope": "org", "scope_id": prefix})
        assert no_data.status_code == 400
        assert set(rest_violations(no_data.json())) == {"data"}

        missing = await http.get("/api/v1/config", params={"scope": "org", "scope_id": prefix})
        assert missing.status_code == 404
        assert rest_reason(missing.json()) == "CONFIG_NOT_FOUND"
        assert await keys_with(cordum, prefix) == []

        org = {"scope": "org", "scope_id": f"cas-{prefix}", "data": {"v": 1}}
        assert (await http.post("/api/v1/config", json=org)).status_code == 200
        conflict = await http.post("/api/v1/config", json={**org, "expected_revision": 5})
        assert conflict.status_code == 409
        assert rest_reason(conflict.json()) == "REVISION_MISMATCH"

        unknown = await http.get("/api/v1/config", params={"nope": "1"})
        assert unknown.status_code == 400
