"""DLQService as REST through Envoy (upstream's /api/v1/dlq paths)."""

from __future__ import annotations

import grpc
import httpx

from cordum.server.app import App

from support.admin import rest_reason, rest_violations
from support.jobs import J, jobs, wait_dlq, wait_state


async def test_dlq_over_rest(
    cordum: App, channel: grpc.aio.Channel, rest_url: str, prefix: str
) -> None:
    topic = f"job.t.deny.{prefix}"
    reply = await jobs(channel).SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=topic, labels={"team": "sre"}, priority="critical")
    )
    await wait_state(jobs(channel), reply.job_id, "DENIED")
    await wait_dlq(cordum, reply.job_id)
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        listed = await http.get("/api/v1/dlq", params={"topic": topic})
        assert listed.status_code == 200, listed.text
        (entry,) = listed.json()["entries"]
        assert entry["job_id"] == reply.job_id
        assert entry["status"] == "JOB_STATUS_DENIED"
        assert entry["reason_code"] == "safety_denied"
        assert entry["created_at"].endswith("Z")
        assert listed.json()["next_page_token"] == ""

        # Upstream's /dlq/page path answers the same way (page tokens, not cursors).
        page = await http.get("/api/v1/dlq/page", params={"topic": topic, "page_size": 1})
        assert page.status_code == 200, page.text
        assert [e["job_id"] for e in page.json()["entries"]] == [reply.job_id]

        got = await http.get(f"/api/v1/dlq/{reply.job_id}")
        assert got.status_code == 200
        assert got.json() == entry

        retried = await http.post(f"/api/v1/dlq/{reply.job_id}/retry", json={})
        assert retried.status_code == 200, retried.text
        new_id = retried.json()["job_id"]
        assert new_id == f"{reply.job_id}-retry-1"
        job = retried.json()["job"]
        assert job["labels"] == {"team": "sre", "retry_of": reply.job_id}
        assert job["priority"] == "JOB_PRIORITY_CRITICAL"
        assert job["parent_job_id"] == reply.job_id
        await wait_state(jobs(channel), new_id, "DENIED")
        linked = await http.get(f"/api/v1/dlq/{reply.job_id}")
        assert linked.json()["retry_job_ids"] == [new_id]

        deleted = await http.delete(f"/api/v1/dlq/{reply.job_id}")
        assert deleted.status_code == 200, deleted.text
        for response in (
            await http.get(f"/api/v1/dlq/{reply.job_id}"),
            await http.delete(f"/api/v1/dlq/{reply.job_id}"),
            await http.post(f"/api/v1/dlq/{reply.job_id}/retry", json={}),
        ):
            assert response.status_code == 404
            assert rest_reason(response.json()) == "DLQ_ENTRY_NOT_FOUND"

        bad = await http.get("/api/v1/dlq", params={"page_size": -1, "page_token": "x"})
        assert bad.status_code == 400
        assert set(rest_violations(bad.json())) == {"page_size", "page_token"}
        unknown = await http.get("/api/v1/dlq", params={"limit": 5})
        assert unknown.status_code == 400  # upstream's `limit` is `page_size` here
