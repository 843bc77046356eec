"""The workflow API over REST through Envoy, on upstream's paths and JSON shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from cordum.server.app import App

from support.waiting import eventually


@pytest_asyncio.fixture
async def http(rest_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=rest_url, timeout=15) as client:
        yield client


async def run_json(http: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    reply = await http.get(f"/api/v1/workflow-runs/{run_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def test_create_start_get_timeline_and_approve_over_rest(
    cordum: App, http: httpx.AsyncClient, prefix: str
) -> None:
    definition = {
        "id": f"rest-{prefix}",
        "name": "REST flow",
        "steps": {
            "ok": {"type": "approval"},
            "tell": {
                "type": "notify",
                "depends_on": ["ok"],
                "input": {"message": "hello ${input.who}"},
            },
        },
    }
    created = await http.post("/api/v1/workflows", json=definition)
    assert created.status_code == 200, created.text
    assert created.json()["id"] == definition["id"]
    assert created.json()["steps"]["tell"]["depends_on"] == ["ok"]

    got = await http.get(f"/api/v1/workflows/{definition['id']}")
    assert got.status_code == 200 and got.json()["name"] == "REST flow"

    # The body is the run input, as upstream; the key travels in a header.
    headers = {"Idempotency-Key": f"rest-{prefix}"}
    started = await http.post(
        f"/api/v1/workflows/{definition['id']}/runs", json={"who": "ann"}, headers=headers
    )
    assert started.status_code == 200, started.text
    run_id = started.json()["run_id"]
    replay = await http.post(
        f"/api/v1/workflows/{definition['id']}/runs", json={"who": "ann"}, headers=headers
    )
    assert replay.json()["run_id"] == run_id and replay.json()["idempotent_replay"] is True

    async def waiting() -> dict[str, Any]:
        return await run_json(http, run_id)

    run = await eventually(waiting, until=lambda r: r["status"] == "RUN_STATUS_WAITING")
    assert run["steps"]["ok"]["status"] == "STEP_STATUS_WAITING"
    assert run["input"] == {"who": "ann"}

    approved = await http.post(
        f"/api/v1/workflows/{definition['id']}/runs/{run_id}/steps/ok/approve",
        json={"approved": True},
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["steps"]["ok"]["status"] == "STEP_STATUS_SUCCEEDED"
    run = await eventually(waiting, until=lambda r: r["status"] == "RUN_STATUS_SUCCEEDED")
    assert run["steps"]["tell"]["output"] == {"message": "hello ann"}
    assert run["context"]["steps"]["tell"]["status"] == "SUCCEEDED"

    timeline = await http.get(f"/api/v1/workflow-runs/{run_id}/timeline")
    assert timeline.status_code == 200
    types = [e["type"] for e in timeline.json()["events"]]
    assert types[0] == "run_created"
    assert {"step_waiting", "step_approved", "step_event_emitted"} <= set(types)

    listed = await http.get("/api/v1/workflow-runs", params={"workflow_id": definition["id"]})
    assert [r["id"] for r in listed.json()["runs"]] == [run_id]
    by_workflow = await http.get(f"/api/v1/workflows/{definition['id']}/runs")
    assert [r["id"] for r in by_workflow.json()["runs"]] == [run_id]


async def test_rest_errors_are_json_with_the_right_status(
    cordum: App, http: httpx.AsyncClient, prefix: str
) -> None:
    bad = await http.post(
        "/api/v1/workflows",
        json={"id": f"rest-bad-{prefix}", "steps": {"a": {"depends_on": ["zz"]}}},
    )
    assert bad.status_code == 400
    assert "steps.a.depends_on[0]" in bad.json()["message"]
    missing = await http.get(f"/api/v1/workflow-runs/{prefix}")
    assert missing.status_code == 404
    rejected_start = await http.post(f"/api/v1/workflows/nope-{prefix}/runs", json={})
    assert rejected_start.status_code == 404
    # upstream's `{"approved": false}` rejects; here the run is unknown.
    reject = await http.post(
        f"/api/v1/workflows/x/runs/{prefix}/steps/ok/approve", json={"approved": False}
    )
    assert reject.status_code == 404


async def test_dry_run_and_reject_over_rest(
    cordum: App, http: httpx.AsyncClient, prefix: str
) -> None:
    wf_id = f"rest-dry-{prefix}"
    definition = {"id": wf_id, "steps": {"ok": {"type": "approval"}}}
    assert (await http.post("/api/v1/workflows", json=definition)).status_code == 200
    dry = await http.post(f"/api/v1/workflows/{wf_id}/runs?dry_run=true", json={})
    assert dry.json()["run"]["dry_run"] is True

    async def finished() -> dict[str, Any]:
        return await run_json(http, dry.json()["run_id"])

    assert await eventually(finished, until=lambda r: r["status"] == "RUN_STATUS_SUCCEEDED")
    real = await http.post(f"/api/v1/workflows/{wf_id}/runs", json={})
    run_id = real.json()["run_id"]

    async def waiting() -> dict[str, Any]:
        return await run_json(http, run_id)

    await eventually(waiting, until=lambda r: r["status"] == "RUN_STATUS_WAITING")
    rejected = await http.post(
        f"/api/v1/workflows/{wf_id}/runs/{run_id}/steps/ok/approve", json={"approved": False}
    )
    assert rejected.status_code == 200
    assert rejected.json()["status"] == "RUN_STATUS_FAILED"
