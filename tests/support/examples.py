"""The repository's examples in tests: the example worker (`examples/echo_worker.py`, loaded
from its file as `cordumctl up` runs it) and the example workflows."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

from cordum.sdk.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
HELLO = EXAMPLES / "workflows" / "hello.json"
REVIEW = EXAMPLES / "workflows" / "review.yaml"

# One id for every example worker of the session. The example topics (job.echo, job.sleep)
# are shared by the tests that use them, and the scheduler places jobs on workers it heard
# from recently: a worker that stopped at the end of an earlier test would still look alive
# for a while under an id of its own, and could be handed a job nobody answers. Under one id
# the worker running now takes over the entry (and the `worker.<id>.jobs` subject).
WORKER_ID = "examples-worker"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_worker", EXAMPLES / "echo_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def example_worker(nats_url: str, redis_url: str) -> AsyncIterator[Worker]:
    """The example worker (job.echo, job.default, job.sleep, job.fail), running."""
    worker: Worker = _module().build_worker(
        worker_id=WORKER_ID, nats_url=nats_url, redis_url=redis_url, heartbeat_interval=0.2
    )
    async with worker:
        yield worker
