"""Workflow engine figures: a 10-step linear workflow and a 100-item fan-out.

Starts its own nats-server and valkey-server, one in-process Cordum app (every role: gateway,
scheduler, safety, workflow engine) and one no-op worker in the same process, then runs each
workflow `--runs` times with `--concurrency` runs in flight and prints:

- runs/s (start to terminal, measured by the run's own timestamps, wall clock overall);
- step-dispatch latency: for the linear workflow, the time from a step's completion being
  recorded to its successor's dispatch (timeline event times, ms); for the fan-out, the
  time from the expansion to the last child's dispatch, and the run duration.

    .venv/bin/python bench/workflows.py [--runs 50] [--concurrency 10]

Everything runs on one event loop, so the figures include the worker's and the scheduler's
share of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf import json_format, struct_pb2

from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.settings import Settings
from cordum.server.stack.services import start_nats, start_valkey
from cordum.v1 import (
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

POLICY = (
    'version: "bench"\ndefault_tenant: default\ntenants:\n  default:\n    allow_topics: ["job.*"]\n'
)
POOLS = "topics:\n  job.default: default\npools:\n  default:\n    requires: []\n"
TIMEOUTS = (
    "reconciler:\n  dispatch_timeout_seconds: 300\n  running_timeout_seconds: 9000\n"
    "  scan_interval_seconds: 5\n"
)
TERMINAL = {
    run_pb2.RUN_STATUS_SUCCEEDED,
    run_pb2.RUN_STATUS_FAILED,
    run_pb2.RUN_STATUS_CANCELLED,
    run_pb2.RUN_STATUS_TIMED_OUT,
}
TOPIC = "job.bench.noop"
# job id -> when the worker ran it (wall clock; the worker returns at once).
SEEN: dict[str, float] = {}


def out(line: str = "") -> None:
    print(line, flush=True)


def linear(n: int) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for i in range(n):
        step: dict[str, Any] = {"topic": TOPIC, "input": {"i": i}}
        if i:
            step["depends_on"] = [f"s{i - 1}"]
        steps[f"s{i}"] = step
    return {"id": "bench-linear", "steps": steps}


def fan_out(n: int) -> dict[str, Any]:
    return {
        "id": "bench-fan",
        "steps": {"fan": {"topic": TOPIC, "for_each": "input.items", "input": {"x": "${item}"}}},
        "input_schema": {"type": "object"},
        "_items": n,
    }


async def run_phase(
    runs: run_service_pb2_grpc.RunServiceStub,
    workflow_id: str,
    run_input: dict[str, Any],
    count: int,
    concurrency: int,
) -> tuple[float, list[run_pb2.Run], list[list[run_pb2.RunEvent]]]:
    sem = asyncio.Semaphore(concurrency)
    finished: list[run_pb2.Run] = []
    timelines: list[list[run_pb2.RunEvent]] = []
    body = json_format.ParseDict(run_input, struct_pb2.Struct())

    async def one() -> None:
        async with sem:
            started = await runs.StartRun(
                run_service_pb2.StartRunRequest(workflow_id=workflow_id, input=body)
            )
            # Follow the run's watch stream to its end: no polling.
            events: list[run_pb2.RunEvent] = []
            last: run_pb2.Run | None = None
            async for item in runs.WatchRun(run_service_pb2.WatchRunRequest(run_id=started.run_id)):
                events.append(item.event)
                last = item.run
            assert last is not None and last.status in TERMINAL
            finished.append(last)
            timelines.append(events)

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - began, finished, timelines


def ms(event: run_pb2.RunEvent) -> int:
    return event.time.ToMilliseconds()


def linear_latencies(run: run_pb2.Run) -> list[float]:
    """Worker ran step k-1 -> worker runs step k: result, scheduler, job event, engine pass,
    job submit, scheduler decision and dispatch, in ms."""
    out_: list[float] = []
    for i in range(1, 10):
        before, after = SEEN.get(f"{run.id}:s{i - 1}@1"), SEEN.get(f"{run.id}:s{i}@1")
        if before is not None and after is not None:
            out_.append((after - before) * 1000)
    return out_


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return (
        f"mean {statistics.mean(values):.1f} ms, p50 {statistics.median(values):.1f}, p95 {p95:.1f}"
    )


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cordum-wf-bench-") as tmp:
        base = Path(tmp)
        nats = start_nats(data_dir=base / "nats", log_path=base / "nats.log")
        valkey = start_valkey(data_dir=base / "valkey", log_path=base / "valkey.log", aof=False)
        try:
            config = base / "config"
            config.mkdir()
            (config / "safety.yaml").write_text(POLICY)
            (config / "pools.yaml").write_text(POOLS)
            (config / "timeouts.yaml").write_text(TIMEOUTS)
            settings = Settings(
                nats_url=nats.url,
                redis_url=valkey.url,
                grpc_port=0,
                metrics_port=0,
                config_dir=config,
                log_format="text",
                log_level="WARNING",
            )
            async with App(settings) as app:
                worker = Worker(
                    worker_id="bench-noop",
                    nats_url=nats.url,
                    redis_url=valkey.url,
                    max_parallel=64,
                    heartbeat_interval=1,
                )

                @worker.handler(TOPIC)
                async def noop(ctx: Any, data: Any) -> Any:
                    SEEN[ctx.job_id] = time.time()
                    return data

                async with worker, grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
                    await bench(ch, args)
        finally:
            valkey.stop()
            nats.stop()


async def bench(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
    runs = run_service_pb2_grpc.RunServiceStub(channel)
    for definition in (linear(10), fan_out(args.items)):
        definition = {k: v for k, v in definition.items() if not k.startswith("_")}
        wf = json_format.ParseDict(definition, workflow_pb2.Workflow())
        await workflows.UpsertWorkflow(workflow_service_pb2.UpsertWorkflowRequest(workflow=wf))

    await run_phase(runs, "bench-linear", {}, 3, 3)  # warm-up
    took, done, _ = await run_phase(runs, "bench-linear", {}, args.runs, args.concurrency)
    ok = sum(r.status == run_pb2.RUN_STATUS_SUCCEEDED for r in done)
    durations = [r.completed_at.ToMilliseconds() - r.started_at.ToMilliseconds() for r in done]
    latencies = [x for r in done for x in linear_latencies(r)]
    out(
        f"10-step linear workflow: {args.runs} runs ({ok} succeeded), "
        f"{args.concurrency} in flight: {args.runs / took:.1f} runs/s, "
        f"{args.runs * 10 / took:.0f} steps/s"
    )
    out(f"  run duration: {summary(durations)}")
    out(f"  step-to-step latency (worker ran step k-1 -> worker runs step k): {summary(latencies)}")

    items = {"items": list(range(args.items))}
    fan_runs = max(args.runs // 5, 3)
    took, done, _ = await run_phase(runs, "bench-fan", items, fan_runs, args.concurrency)
    ok = sum(r.status == run_pb2.RUN_STATUS_SUCCEEDED for r in done)
    for r in done:
        if r.status != run_pb2.RUN_STATUS_SUCCEEDED:
            out(f"  run {r.id} {run_pb2.RunStatus.Name(r.status)}: {r.error.message}")
    durations = [r.completed_at.ToMilliseconds() - r.started_at.ToMilliseconds() for r in done]
    spread = []
    for r in done:
        started = r.started_at.ToMilliseconds() / 1000
        ran = [
            SEEN[f"{r.id}:fan[{i}]@1"] for i in range(args.items) if f"{r.id}:fan[{i}]@1" in SEEN
        ]
        if ran:
            spread.append((max(ran) - started) * 1000)
    out(
        f"{args.items}-item fan-out: {fan_runs} runs ({ok} succeeded), "
        f"{args.concurrency} in flight: {fan_runs / took:.2f} runs/s, "
        f"{fan_runs * args.items / took:.0f} items/s"
    )
    out(f"  run duration: {summary(durations)}")
    out(f"  run start -> last child running on the worker: {summary(spread)}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--items", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    uvloop.run(main(parse()))
