"""Starting an in-process Cordum app (and Envoy in front of it) on free loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cordum.server.app import App
from cordum.server.settings import Settings
from cordum.server.stack.envoy_config import (
    EnvoyConfig,
    EnvoyPorts,
    api_services,
    packaged_descriptor,
)
from cordum.server.stack.process import pick_free_port
from cordum.server.stack.services import RunningService, start_envoy

TEST_POLICY = """\
version: "test"
default_tenant: default
tenants:
  default:
    allow_topics: ["job.*"]
rules:
  - id: deny-rule
    match: {topics: ["job.t.deny.*"]}
    decision: deny
    reason: denied by the test policy
    remediations:
      - id: use-safe
        title: Use the safe topic
        replacement_topic: job.t.safe.remediated
        add_labels: {remediated: "yes"}
  - id: approve-rule
    match: {topics: ["job.t.approve.*"]}
    decision: require_approval
    reason: needs a human
  - id: throttle-rule
    match: {topics: ["job.t.throttle.*"]}
    decision: throttle
    reason: slow down
    retry_after_ms: 200
  - id: constrained-rule
    match: {topics: ["job.t.constrained.*"]}
    decision: allow_with_constraints
    constraints:
      budgets: {max_runtime_ms: 5000, max_retries: 1}
      redaction_level: high
  - id: cel-rule
    match: {topics: ["job.t.cel.*"], cel: "'risk' in labels && labels.risk == 'high'"}
    decision: deny
    reason: high risk (CEL)
"""

TEST_POOLS = """\
topics:
  job.default: default
pools:
  default:
    requires: []
"""

TEST_TIMEOUTS = """\
reconciler:
  dispatch_timeout_seconds: 300
  running_timeout_seconds: 9000
  scan_interval_seconds: 30
"""


def write_config(
    directory: Path,
    *,
    policy: str = TEST_POLICY,
    pools: str = TEST_POOLS,
    timeouts: str = TEST_TIMEOUTS,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "safety.yaml").write_text(policy)
    (directory / "pools.yaml").write_text(pools)
    (directory / "timeouts.yaml").write_text(timeouts)
    return directory


def app_settings(nats_url: str, redis_url: str, config_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "redis_url": redis_url,
        "grpc_port": 0,
        "metrics_port": 0,
        "ws_port": 0,
        "namespace": f"t{uuid.uuid4().hex[:8]}.",
        "config_dir": config_dir,
        "reconcile_interval_s": 0.2,
        "policy_watch_s": 0.1,
        "log_format": "text",
        # JetStream mode (when on): small streams, since a session creates many (file stores
        # reserve their max_bytes).
        "jetstream_max_bytes": 16 * 1024 * 1024,
        "jetstream_max_age_s": 3600.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[App]:
    async with App(settings) as app:
        yield app


def start_envoy_for(
    app: App,
    workdir: Path,
    *,
    allowed_origins: tuple[str, ...] | None = None,
    max_request_bytes: int | None = None,
) -> tuple[RunningService, str]:
    """Envoy in front of `app` (REST + native gRPC on one port); returns it and its base URL.
    CORS origins and the body limit default to the app's settings."""
    listen, admin = pick_free_port(), pick_free_port()
    if allowed_origins is None:
        allowed_origins = tuple(app.settings.allowed_origins)
    descriptor = packaged_descriptor()
    config = EnvoyConfig(
        ports=EnvoyPorts(
            listen_port=listen,
            admin_port=admin,
            grpc_port=app.grpc_port,
            ws_port=app.ws_port,
        ),
        descriptor=descriptor,
        services=tuple(api_services(descriptor)),
        allowed_origins=allowed_origins,
        max_request_bytes=max_request_bytes or app.settings.max_request_bytes,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.yaml"
    path.write_text(config.render())
    service = start_envoy(config_path=path, admin_port=admin, log_path=workdir / "envoy.log")
    return service, f"http://127.0.0.1:{listen}"
