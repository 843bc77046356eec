"""A Cordum worker with three demo handlers: echo, sleep (progress, cancel, timeout) and fail.

    python examples/echo_worker.py

Environment: ``WORKER_ID`` (default ``echo-worker``), ``NATS_URL``, ``REDIS_URL``,
``WORKER_TOPICS`` (default ``job.echo,job.default``: topics served by the echo handler),
``WORKER_PARALLEL`` (default 4: jobs run at once, so a workflow's for_each fans out),
``LOG_LEVEL`` (default ``INFO``). ``job.sleep`` and ``job.fail`` are always served.
Stop with Ctrl-C or SIGTERM: running jobs get 10 s to finish.

The example workflows in ``examples/workflows/`` run against this worker.
"""

import asyncio
import logging
import os
from typing import Any

from cordum.sdk.worker import JobContext, JobFailed, Worker


def build_worker(
    *,
    worker_id: str | None = None,
    nats_url: str | None = None,
    redis_url: str | None = None,
    heartbeat_interval: float = 5.0,
) -> Worker:
    """The example worker; arguments left out come from the environment (see above)."""
    worker = Worker(
        worker_id=worker_id or os.environ.get("WORKER_ID", "echo-worker"),
        nats_url=nats_url,
        redis_url=redis_url,
        max_parallel=int(os.environ.get("WORKER_PARALLEL", "4")),
        heartbeat_interval=heartbeat_interval,
    )
    topics = os.environ.get("WORKER_TOPICS", "job.echo,job.default")

    async def echo(ctx: JobContext, data: Any) -> Any:
        return {"echo": data, "job_id": ctx.job_id, "worker_id": ctx.worker_id}

    for topic in filter(None, (t.strip() for t in topics.split(","))):
        worker.add_handler(topic, echo)

    @worker.handler("job.sleep")
    async def sleep(ctx: JobContext, data: Any) -> Any:
        """Sleep ``data["seconds"]`` (default 1), reporting progress every step."""
        seconds = float(data.get("seconds", 1)) if isinstance(data, dict) else 1.0
        steps = 10
        for step in range(steps):
            await ctx.progress(step * 100 // steps, f"step {step + 1}/{steps}")
            await asyncio.sleep(seconds / steps)
        await ctx.progress(100, "done")
        return {"slept": seconds, "job_id": ctx.job_id}

    @worker.handler("job.fail")
    async def fail(ctx: JobContext, data: Any) -> Any:
        """Fail on purpose. ``{"public": true}`` shows a JobFailed message to the control plane."""
        if isinstance(data, dict) and data.get("public"):
            raise JobFailed(str(data.get("message", "asked to fail")), code="demo_failure")
        raise RuntimeError("asked to fail; this text stays in the worker log")

    return worker


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker = build_worker()
    print(f"worker {worker.worker_id} serving {', '.join(worker.topics)}; Ctrl-C to stop")
    asyncio.run(worker.run())


if __name__ == "__main__":
    main()
