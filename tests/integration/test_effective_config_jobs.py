"""The effective config of a job (system → org → team → workflow → step) travels with it: the
scheduler attaches it to the dispatched request (env CORDUM_EFFECTIVE_CONFIG, the worker
sees it) and hands it to the safety kernel (PolicyCheckRequest.effective_config), where a
CEL rule reads it as `config`. The app runs with a policy of its own (one extra rule)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from cordum.sdk import AsyncClient
from cordum.sdk.convert import state_name
from cordum.server.app import App

from support.admin import own_app
from support.cordum import TEST_POLICY, write_config
from support.jobs import make_worker

FREEZE_RULE = """\
  - id: config-freeze
    match:
      topics: ["job.t.cfg.*"]
      cel: "'deploys' in config && config.deploys.frozen == true"
    decision: deny
    reason: deploys are frozen by config
"""


@pytest_asyncio.fixture
async def app(nats_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[App]:
    config_dir = write_config(tmp_path / "config", policy=TEST_POLICY + FREEZE_RULE)
    async with own_app(nats_url, redis_url, config_dir) as running:
        yield running


@pytest_asyncio.fixture
async def client(app: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{app.grpc_port}", timeout=10.0) as client:
        yield client


async def test_org_config_reaches_the_worker_and_the_safety_kernel(
    client: AsyncClient, nats_url: str, redis_url: str, prefix: str
) -> None:
    org, team, topic = f"acme-{prefix}", f"core-{prefix}", f"job.t.cfg.{prefix}"
    await client.config.set("org", org, {"deploys": {"frozen": False}, "model": "small"})
    await client.config.set("team", team, {"model": "large"})
    seen: list[dict[str, Any]] = []
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def record(ctx: Any, data: Any) -> Any:
        seen.append(json.loads(ctx.env["CORDUM_EFFECTIVE_CONFIG"]))
        return {"ok": True}

    async with worker:
        first = await client.jobs.run(topic=topic, prompt="go", tenant_id=org, timeout=20)
        assert state_name(first.job.state) == "SUCCEEDED"
        attached = seen[-1]
        # The system scope (config/*.yaml) merged with the org's document.
        assert attached["data"]["deploys"] == {"frozen": False}
        assert attached["data"]["model"] == "small" and "pools" in attached["data"]
        assert "|org:1|" in attached["version"] and len(attached["hash"]) == 64
        # The same merge the config API reports for those scopes.
        merged = await client.config.effective(org_id=org)
        assert (attached["version"], attached["hash"]) == (merged.version, merged.hash)

        with_team = await client.jobs.run(
            topic=topic, prompt="go", tenant_id=org, team_id=team, timeout=20
        )
        assert state_name(with_team.job.state) == "SUCCEEDED"
        assert seen[-1]["data"]["model"] == "large"

        # Freezing at org scope: the kernel's CEL rule reads it and denies the next job
        # (the write cleared this process's cache: no wait for its TTL).
        await client.config.set("org", org, {"deploys": {"frozen": True}, "model": "small"})
        frozen = await client.jobs.run(topic=topic, prompt="go", tenant_id=org, timeout=20)
        assert state_name(frozen.job.state) == "DENIED"
        assert frozen.job.safety.rule_id == "config-freeze"
        assert frozen.job.safety.reason == "deploys are frozen by config"
        # Another org's jobs are not affected.
        other = await client.jobs.run(topic=topic, prompt="go", tenant_id=f"x-{prefix}", timeout=20)
        assert state_name(other.job.state) == "SUCCEEDED"
        assert "deploys" not in seen[-1]["data"] and "model" not in seen[-1]["data"]
    assert len(seen) == 3  # the denied job never reached the worker
