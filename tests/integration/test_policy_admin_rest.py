"""PolicyService as REST through Envoy (upstream's /api/v1/policy paths), against an app
and an Envoy of their own: publishing changes what the whole namespace enforces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio

from cordum.server.app import App

from support.admin import keys_with, own_app, rest_reason, rest_violations
from support.cordum import start_envoy_for


@pytest_asyncio.fixture
async def stack(
    nats_url: str, redis_url: str, config_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[App, httpx.AsyncClient]]:
    async with own_app(nats_url, redis_url, config_dir, roles=["gateway", "safety"]) as app:
        envoy, url = start_envoy_for(app, tmp_path / "envoy")
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                yield app, http
        finally:
            envoy.stop()


def deny(rule_id: str, glob: str) -> str:
    return (
        f'rules:\n  - id: {rule_id}\n    match: {{topics: ["{glob}"]}}\n'
        "    decision: deny\n    reason: no\n"
    )


async def test_bundle_publish_evaluate_rollback_over_rest(
    stack: tuple[App, httpx.AsyncClient], prefix: str
) -> None:
    _app, http = stack
    topic = f"job.rest.{prefix}.x"
    put = await http.put(
        f"/api/v1/policy/bundles/secops~rest-{prefix}",
        json={"content": deny("rest-deny", f"job.rest.{prefix}.*"), "author": "alice"},
        headers={"x-principal-id": "alice"},
    )
    assert put.status_code == 200, put.text
    bundle = put.json()
    assert (bundle["id"], bundle["enabled"], bundle["source"], bundle["revision"]) == (
        f"secops/rest-{prefix}",
        True,
        "secops",
        "1",
    )
    got = await http.get(f"/api/v1/policy/bundles/secops%2Frest-{prefix}")
    assert got.status_code == 200 and got.json()["content"] == bundle["content"]
    listed = await http.get("/api/v1/policy/bundles")
    assert [b["id"] for b in listed.json()["bundles"]] == [f"secops/rest-{prefix}"]

    evaluate = {"topic": topic, "job_id": "j-1", "meta": {"actor_type": "human"}}
    assert (await http.post("/api/v1/policy/evaluate", json=evaluate)).json()[
        "decision"
    ] == "DECISION_TYPE_ALLOW"

    simulated = await http.post(
        f"/api/v1/policy/bundles/secops~rest-{prefix}/simulate", json={"request": {"topic": topic}}
    )
    assert simulated.status_code == 200, simulated.text
    assert (simulated.json()["decision"], simulated.json()["rule_id"]) == (
        "DECISION_TYPE_DENY",
        "rest-deny",
    )

    replay = await http.post(
        "/api/v1/policy:replay",
        json={"bundles": {f"secops/rest-{prefix}": deny("rest-deny", f"job.rest.{prefix}.*")}},
    )
    assert replay.status_code == 200, replay.text
    assert [c["job_id"] for c in replay.json()["changes"]] == ["j-1"]
    assert replay.json()["changes"][0]["after"] == "DECISION_TYPE_DENY"

    first = await http.post("/api/v1/policy/publish", json={"message": "one"})
    assert first.status_code == 200, first.text
    v1 = first.json()
    assert v1["published"] == [f"secops/rest-{prefix}"]
    assert v1["version"]["version"] == "1"
    denied = await http.post("/api/v1/policy/evaluate", json=evaluate)
    assert (denied.json()["decision"], denied.json()["rule_id"]) == (
        "DECISION_TYPE_DENY",
        "rest-deny",
    )
    explained = await http.post("/api/v1/policy/explain", json=evaluate)
    assert explained.status_code == 200
    matched = [e for e in explained.json()["evaluations"] if e["matched"]]
    assert matched[0]["rule_id"] == "rest-deny"
    assert matched[0]["source"] == f"secops/rest-{prefix}"

    await http.delete(f"/api/v1/policy/bundles/secops~rest-{prefix}")
    second = await http.post("/api/v1/policy/publish", json={"message": "two"})
    assert second.json()["version"]["version"] == "2"
    assert (await http.post("/api/v1/policy/evaluate", json=evaluate)).json()[
        "decision"
    ] == "DECISION_TYPE_ALLOW"

    rolled = await http.post("/api/v1/policy/rollback", json={"version": 1, "message": "undo"})
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["rollback_to"], rolled.json()["version"]["version"]) == ("1", "3")
    assert (await http.post("/api/v1/policy/evaluate", json=evaluate)).json()[
        "decision"
    ] == "DECISION_TYPE_DENY"

    versions = (await http.get("/api/v1/policy/versions")).json()["versions"]
    assert [v["version"] for v in versions] == ["3", "2", "1"]
    one = await http.get("/api/v1/policy/versions/1")
    assert one.json()["snapshot"] == v1["snapshot_after"]
    snapshots = (await http.get("/api/v1/policy/snapshots")).json()["snapshots"]
    assert snapshots[0] == v1["snapshot_after"]
    rules = (await http.get("/api/v1/policy/rules", params={"include_disabled": "true"})).json()
    assert "rest-deny" in [r["id"] for r in rules["rules"]]
    audit = (await http.get("/api/v1/policy/audit")).json()["entries"]
    assert [e["action"] for e in audit] == [
        "rollback",
        "publish",
        "bundle_delete",
        "publish",
        "bundle_put",
    ]
    assert audit[-1]["actor_id"] == "alice"
    assert audit[0]["version"] == "3"


async def test_policy_errors_over_rest(stack: tuple[App, httpx.AsyncClient], prefix: str) -> None:
    app, http = stack
    bad = await http.put(
        f"/api/v1/policy/bundles/secops~{prefix}",
        json={"content": "rules:\n  - id: x\n    decision: maybe\n"},
    )
    assert bad.status_code == 400
    assert rest_reason(bad.json()) == "INVALID_ARGUMENT"
    assert set(rest_violations(bad.json())) == {"content.rules[0].decision"}
    assert await keys_with(app, prefix) == []

    missing = await http.get(f"/api/v1/policy/bundles/secops~{prefix}")
    assert missing.status_code == 404
    assert rest_reason(missing.json()) == "POLICY_BUNDLE_NOT_FOUND"

    nothing = await http.post("/api/v1/policy/publish", json={})
    assert nothing.status_code == 400  # FAILED_PRECONDITION: no bundles
    no_version = await http.post("/api/v1/policy/rollback", json={"version": 7})
    assert no_version.status_code == 404
    assert rest_reason(no_version.json()) == "POLICY_VERSION_NOT_FOUND"

    no_topic = await http.post("/api/v1/policy/evaluate", json={"priority": "urgent"})
    assert no_topic.status_code == 400
    assert set(rest_violations(no_topic.json())) == {"topic", "priority"}
    bad_token = await http.get("/api/v1/policy/audit", params={"page_token": "bm90LWEtbnVtYmVy"})
    assert bad_token.status_code == 400
    assert set(rest_violations(bad_token.json())) == {"page_token"}
