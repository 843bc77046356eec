"""The job and approval API over REST through Envoy (gRPC-JSON transcoding), with upstream
Cordum's request shapes and URLs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from cordum.sdk.worker import Worker
from cordum.server.app import App

from support.jobs import make_worker, wait_dlq
from support.waiting import eventually


@pytest_asyncio.fixture
async def http(rest_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=rest_url, timeout=15) as client:
        yield client


@pytest_asyncio.fixture
async def echo(nats_url: str, redis_url: str, prefix: str) -> AsyncIterator[Worker]:
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(f"job.t.rest.{prefix}")
    async def run(ctx: Any, data: Any) -> Any:
        return {"echo": data}

    async with worker:
        yield worker


async def get_json(http: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_upstream_style_submit_runs_and_is_readable(
    http: httpx.AsyncClient, echo: Worker, prefix: str
) -> None:
    tenant = f"rest-{prefix}"
    body = {
        "prompt": "hello over REST",
        "topic": f"job.t.rest.{prefix}",
        "labels": {"team": "sre"},
        "priority": "batch",
        "context": {"ticket": 42, "tags": ["a", "b"]},
        "tenant_id": tenant,
    }
    response = await http.post("/api/v1/jobs", json=body)
    assert response.status_code == 200, response.text
    submitted = response.json()
    job_id = submitted["job_id"]
    assert submitted["job"]["state"] == "JOB_STATE_PENDING"
    assert submitted["job"]["priority"] == "JOB_PRIORITY_BATCH"

    job = await eventually(
        lambda: get_json(http, f"/api/v1/jobs/{job_id}"),
        until=lambda j: j["state"] == "JOB_STATE_SUCCEEDED",
        what="SUCCEEDED over REST",
    )
    assert job["labels"] == {"team": "sre"}
    assert job["worker_id"] == echo.worker_id

    result = await get_json(http, f"/api/v1/jobs/{job_id}/result")
    echoed = result["result"]["echo"]
    assert echoed["prompt"] == "hello over REST"
    assert echoed["priority"] == "batch"
    assert echoed["context"] == {"ticket": 42, "tags": ["a", "b"]}
    assert result["state"] == "JOB_STATE_SUCCEEDED"

    listed = await get_json(http, "/api/v1/jobs", state="SUCCEEDED", tenant_id=tenant)
    assert [j["id"] for j in listed["jobs"]] == [job_id]
    decisions = await get_json(http, f"/api/v1/jobs/{job_id}/decisions")
    assert decisions["decisions"][0]["decision"] == "DECISION_TYPE_ALLOW"
    trace = await get_json(http, f"/api/v1/traces/{submitted['trace_id']}")
    assert [j["id"] for j in trace["jobs"]] == [job_id]


async def test_submit_and_wait_over_rest(
    http: httpx.AsyncClient, echo: Worker, prefix: str
) -> None:
    response = await http.post(
        "/api/v1/jobs:submitAndWait",
        json={"job": {"topic": f"job.t.rest.{prefix}", "input": {"n": 7}}, "timeout_ms": 10_000},
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["done"] is True
    assert reply["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert reply["result"] == {"echo": {"n": 7}}


async def test_bad_input_is_a_400_naming_the_fields(
    cordum: App, http: httpx.AsyncClient, prefix: str
) -> None:
    response = await http.post(
        "/api/v1/jobs", json={"prompt": "x", "priority": "urgent", "job_id": f"bad id {prefix}"}
    )
    assert response.status_code == 400
    error = response.json()
    bad = [d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    fields = {v["field"] for v in bad[0]["field_violations"]}
    assert fields == {"topic", "priority", "job_id"}
    assert cordum.redis is not None
    assert await cordum.redis.keys(f"*{prefix}*") == []


async def test_non_json_body_is_a_400(cordum: App, http: httpx.AsyncClient, prefix: str) -> None:
    response = await http.post(
        "/api/v1/jobs",
        content=f"prompt={prefix}&topic=job.t.rest.{prefix}".encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert "message" in response.json()
    assert cordum.redis is not None
    assert await cordum.redis.keys(f"*{prefix}*") == []


async def test_unknown_job_is_a_404(http: httpx.AsyncClient, prefix: str) -> None:
    for path in (f"/api/v1/jobs/missing-{prefix}", f"/api/v1/jobs/missing-{prefix}/result"):
        response = await http.get(path)
        assert response.status_code == 404
        assert response.json()["details"][0]["reason"] == "JOB_NOT_FOUND"
    response = await http.post(f"/api/v1/jobs/missing-{prefix}/cancel", json={})
    assert response.status_code == 404


async def test_approvals_over_rest(
    cordum: App, http: httpx.AsyncClient, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.approve.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    approve_me = (await http.post("/api/v1/jobs", json={"prompt": "a", "topic": topic})).json()
    reject_me = (await http.post("/api/v1/jobs", json={"prompt": "r", "topic": topic})).json()
    for job in (approve_me, reject_me):
        await eventually(
            lambda job=job: get_json(http, f"/api/v1/jobs/{job['job_id']}"),
            until=lambda j: j["state"] == "JOB_STATE_APPROVAL_REQUIRED",
            what="held for approval",
        )
    listed = await get_json(http, "/api/v1/approvals", page_size=500)
    held = {a["job"]["id"] for a in listed["approvals"]}
    assert {approve_me["job_id"], reject_me["job_id"]} <= held

    async with worker:
        response = await http.post(
            f"/api/v1/approvals/{approve_me['job_id']}/approve", json={"reason": "ok"}
        )
        assert response.status_code == 200, response.text
        await eventually(
            lambda: get_json(http, f"/api/v1/jobs/{approve_me['job_id']}"),
            until=lambda j: j["state"] == "JOB_STATE_SUCCEEDED",
            what="approved job SUCCEEDED",
        )
    response = await http.post(
        f"/api/v1/approvals/{reject_me['job_id']}/reject", json={"reason": "nope"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["job"]["state"] == "JOB_STATE_DENIED"
    assert (await wait_dlq(cordum, reject_me["job_id"]))["reason_code"] == "approval_rejected"
    # Approving again is a conflict on the job's state: FAILED_PRECONDITION → 400.
    response = await http.post(f"/api/v1/approvals/{reject_me['job_id']}/approve", json={})
    assert response.status_code == 400
    assert response.json()["details"][0]["reason"] == "JOB_NOT_AWAITING_APPROVAL"


async def test_cancel_over_rest(http: httpx.AsyncClient, prefix: str) -> None:
    job = (
        await http.post("/api/v1/jobs", json={"prompt": "x", "topic": f"job.t.approve.{prefix}"})
    ).json()
    await eventually(
        lambda: get_json(http, f"/api/v1/jobs/{job['job_id']}"),
        until=lambda j: j["state"] == "JOB_STATE_APPROVAL_REQUIRED",
        what="held for approval",
    )
    response = await http.post(f"/api/v1/jobs/{job['job_id']}/cancel", json={"reason": "r"})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "JOB_STATE_CANCELLED"
