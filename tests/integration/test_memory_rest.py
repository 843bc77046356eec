"""MemoryService as REST through Envoy (upstream's GET /api/v1/memory)."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import httpx

from cordum.server.app import App

from support.admin import rest_reason, rest_violations
from support.jobs import J, jobs, json_value, make_worker, wait_state


async def test_read_memory_over_rest(
    cordum: App,
    channel: grpc.aio.Channel,
    rest_url: str,
    nats_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    topic = f"job.t.mem.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"done": data["x"]}

    async with worker:
        request = J.SubmitJobRequest(topic=topic)
        request.input.CopyFrom(json_value({"x": "y"}))
        reply = await jobs(channel).SubmitJob(request)
        await wait_state(jobs(channel), reply.job_id, "SUCCEEDED")
    assert cordum.redis is not None
    events = f"mem:mem:{reply.job_id}:events"
    await cordum.redis.rpush(events, json.dumps({"role": "user", "content": "hi"}))
    try:
        async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
            ctx = await http.get("/api/v1/memory", params={"ptr": f"redis://ctx:{reply.job_id}"})
            assert ctx.status_code == 200, ctx.text
            body = ctx.json()
            assert (body["kind"], body["key"], body["redis_type"]) == (
                "context",
                f"ctx:{reply.job_id}",
                "string",
            )
            assert body["json"] == {"x": "y"}
            assert base64.b64decode(body["base64"]) == body["text"].encode()

            res = await http.get("/api/v1/memory", params={"key": f"res:{reply.job_id}"})
            assert res.status_code == 200, res.text
            assert res.json()["json"] == {"done": "y"}

            mem = await http.get("/api/v1/memory", params={"key": events})
            assert mem.status_code == 200, mem.text
            assert (mem.json()["redis_type"], mem.json()["length"]) == ("list", "1")
            assert mem.json()["items"] == [{"role": "user", "content": "hi"}]

            missing = await http.get("/api/v1/memory", params={"key": f"res:none-{prefix}"})
            assert missing.status_code == 404
            assert rest_reason(missing.json()) == "MEMORY_NOT_FOUND"

            bad = await http.get("/api/v1/memory", params={"key": "wf:run:1"})
            assert bad.status_code == 400
            assert set(rest_violations(bad.json())) == {"key"}
            none = await http.get("/api/v1/memory")
            assert none.status_code == 400
            assert set(rest_violations(none.json())) == {"ptr"}
    finally:
        await cordum.redis.delete(events)
