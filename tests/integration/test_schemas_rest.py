"""SchemaService as REST through Envoy (/api/v1/schemas)."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from cordum.server.app import App

from support.admin import keys_with, rest_reason, rest_violations


async def test_schema_lifecycle_over_rest(cordum: App, rest_url: str, prefix: str) -> None:
    schema_id = f"rest/{prefix}"
    path = f"/api/v1/schemas/{quote(schema_id, safe='')}"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        created = await http.post("/api/v1/schemas", json={"id": schema_id, "schema": schema})
        assert created.status_code == 200, created.text
        assert created.json()["id"] == schema_id
        assert created.json()["schema"] == schema

        got = await http.get(path)
        assert got.status_code == 200, got.text
        assert got.json()["schema"] == schema

        listed = await http.get("/api/v1/schemas", params={"page_size": 1000})
        assert schema_id in [s["id"] for s in listed.json()["schemas"]]

        checked = await http.post(f"{path}:validate", json={"document": {"n": -1}})
        assert checked.status_code == 200, checked.text
        body = checked.json()
        assert body["valid"] is False
        assert [(v["pointer"], v["schema_pointer"]) for v in body["violations"]] == [
            ("/n", "/properties/n/minimum")
        ]
        ok = await http.post(f"{path}:validate", json={"document": {"n": 3}})
        assert ok.json() == {"valid": True, "violations": []}

        deleted = await http.delete(path)
        assert deleted.status_code == 200
        missing = await http.get(path)
        assert missing.status_code == 404
        assert rest_reason(missing.json()) == "SCHEMA_NOT_FOUND"


async def test_bad_schemas_are_400_with_named_fields(
    cordum: App, rest_url: str, prefix: str
) -> None:
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        bad = await http.post(
            "/api/v1/schemas",
            json={"id": f"bad-{prefix}", "schema": {"type": "object", "required": "name"}},
        )
        assert bad.status_code == 400
        assert set(rest_violations(bad.json())) == {"schema.required"}

        no_id = await http.post("/api/v1/schemas", json={"schema": {}})
        assert no_id.status_code == 400
        assert set(rest_violations(no_id.json())) == {"id"}

        not_json = await http.post(
            "/api/v1/schemas", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
    assert await keys_with(cordum, prefix) == []
