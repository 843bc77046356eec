"""Fault injection against the multi-process stack (`cordumctl up --replicas N`).

One stack (nats-server, valkey-server with AOF, a gateway, a safety kernel, a context engine,
N schedulers, N workflow engines, Envoy, and recording echo workers) takes a steady load of
jobs and workflow runs through the SDK against the gateway. One fault per window: a component
is SIGKILLed and restarted (scheduler, workflow engine, gateway, nats-server, valkey-server),
or a worker is paused with SIGSTOP in the middle of a job and resumed with SIGCONT. After each
window every *accepted* job and run (its submit or start returned OK) is checked:

- lost:       its record is gone (the job or run the platform said it took does not exist);
- stuck:      its record exists but is not terminal past its timeout (job: the deadline it was
              submitted with; run: the workflow's `timeout_sec`) plus the reconciler's slack;
- duplicated: the platform recorded its completion more than once. A job: more than one
              terminal transition in its event log (a late or repeated result is logged as
              "ignored", which is fine). A run: more than one terminal `run_status` event, or a
              step completing SUCCEEDED more than once;
- re-run:     (allowed, counted) the job, or one of the run's step jobs, ran to completion on
              the workers more than once. Plain NATS is at-least-once: a job whose dispatch or
              result was lost in a fault, or whose worker froze, is dispatched again, so it may
              run twice; the contract is one recorded completion. The result a client reads
              (`res:<job id>`) is the last execution's (CAP has one result key per job).
- failed:     terminal but not SUCCEEDED (e.g. TIMEOUT after the retries ran out).

The processes are all ours and stopped by their PIDs (through their Popen handles); the
ports are free loopback ports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from cordum.sdk import AsyncClient
from cordum.server.stack.launcher import Stack, StackSettings, worker_registered
from cordum.server.stack.process import pick_free_port
from cordum.server.stack.services import RunningService, start_python_service
from cordum.v1 import run_pb2

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("worker.py")
TOPIC = "job.chaos"
WORKFLOW_ID = "chaos"
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "TIMEOUT", "CANCELLED", "DENIED"}
TERMINAL_RUN = {
    "RUN_STATUS_SUCCEEDED",
    "RUN_STATUS_FAILED",
    "RUN_STATUS_CANCELLED",
    "RUN_STATUS_TIMED_OUT",
}

# fault -> (what it does, the component it hits)
FAULTS: dict[str, tuple[str, str]] = {
    "none": ("no fault (baseline)", ""),
    "scheduler": ("SIGKILL scheduler-1, restart it", "scheduler-1"),
    "workflow": ("SIGKILL workflow-1, restart it", "workflow-1"),
    "gateway": ("SIGKILL the gateway, restart it", "gateway"),
    "nats": ("SIGKILL nats-server, restart it", "nats-server"),
    "valkey": ("SIGKILL valkey-server, restart it (AOF)", "valkey-server"),
    "worker-pause": ("SIGSTOP a worker mid-job, SIGCONT it later", "chaos-worker-1"),
}
# The subset `make test` runs: both multi-replica roles, each recovering within seconds.
QUICK_FAULTS = ("scheduler", "workflow")

# Short timeouts so the reconciler's recovery paths show within a window: a job with no
# result 10 s after its dispatch is re-queued (or timed out when out of retries).
TIMEOUTS_YAML = f"""\
topics:
  {TOPIC}: {{timeout_seconds: 10}}
workflows: {{}}
reconciler:
  dispatch_timeout_seconds: 10
  running_timeout_seconds: 10
  scan_interval_seconds: 1
"""


@dataclass(frozen=True)
class Options:
    mode: str = "plain"  # or "jetstream" (NATS_USE_JETSTREAM=1)
    faults: tuple[str, ...] = tuple(FAULTS)
    replicas: int = 2
    workers: int = 2
    job_rate: float = 20.0  # jobs submitted per second
    run_rate: float = 2.0  # runs started per second
    load_s: float = 10.0  # load per window (at least until 2 s after the fault ended)
    fault_at_s: float = 3.0
    down_s: float = 1.0  # how long a killed component stays down
    pause_s: float = 20.0  # SIGSTOP length: longer than the job timeout (10 s)
    sleep_ms: int = 100  # each job's run time on the worker
    max_retries: int = 3
    job_deadline_s: int = 30
    run_timeout_s: int = 60
    step_timeout_s: int = 15
    reconcile_s: float = 1.0
    # Past a timeout, how long the reconcilers may take to act on it.
    slack_s: float = 10.0
    # False: config/timeouts.yaml as shipped (dispatch 300 s, running 9000 s) instead of the
    # suite's short job timeouts.
    short_timeouts: bool = True


def chaos_workflow(o: Options) -> dict[str, Any]:
    """Four job steps, a -> (b, c) -> d, each retried by the engine."""

    def step(name: str, *after: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "type": "job",
            "topic": TOPIC,
            "input": {"step": name, "n": "${input.n}", "sleep_ms": o.sleep_ms},
            "retry": {"max_retries": 2, "initial_backoff_sec": 1},
            "timeout_sec": o.step_timeout_s,
        }
        if after:
            spec["depends_on"] = list(after)
        return spec

    return {
        "id": WORKFLOW_ID,
        "name": "Chaos: four job steps",
        "timeout_sec": o.run_timeout_s,
        "steps": {
            "a": step("a"),
            "b": step("b", "a"),
            "c": step("c", "a"),
            "d": step("d", "b", "c"),
        },
    }


# --- the stack ------------------------------------------------------------------------------


class ChaosStack:
    """`cordumctl up --replicas N`'s stack on free ports, plus recording workers. start()
    must run on a thread that outlives the stack (Envoy dies with the thread that started it)."""

    def __init__(self, options: Options, base: Path) -> None:
        self.options = options
        self.base = base
        self.stack: Stack | None = None
        self.workers: list[RunningService] = []
        self.records: dict[str, Path] = {}

    @property
    def grpc_target(self) -> str:
        assert self.stack is not None
        return self.stack.endpoints().grpc

    @property
    def redis_url(self) -> str:
        assert self.stack is not None
        return self.stack.endpoints().redis

    def start(self) -> None:
        o = self.options
        config = self.base / "config"
        shutil.copytree(ROOT / "config", config, dirs_exist_ok=True)
        if o.short_timeouts:
            (config / "timeouts.yaml").write_text(TIMEOUTS_YAML)
        server_env = {
            "CORDUM_RECONCILE_INTERVAL_S": str(o.reconcile_s),
            "CORDUM_LOG_FORMAT": "text",
            # Explicit both ways: it wins over a CORDUM_USE_JETSTREAM the suite inherited.
            "NATS_USE_JETSTREAM": "1" if o.mode == "jetstream" else "0",
        }
        settings = StackSettings(
            data_dir=self.base / "stack",
            grpc_port=pick_free_port(),
            rest_port=pick_free_port(),
            ws_port=pick_free_port(),
            nats_port=pick_free_port(),
            redis_port=pick_free_port(),
            metrics_port=pick_free_port(),
            envoy_admin_port=pick_free_port(),
            config_dir=config,
            server_env=server_env,
            replicas=o.replicas,
        )
        self.stack = Stack(settings)
        self.stack.start()
        self._start_workers()

    def _start_workers(self) -> None:
        assert self.stack is not None
        endpoints = self.stack.endpoints()
        starters = []
        for i in range(1, self.options.workers + 1):
            worker_id = f"chaos-worker-{i}"
            record = self.base / f"{worker_id}.jsonl"
            self.records[worker_id] = record
            env = {
                "NATS_URL": endpoints.nats,
                "REDIS_URL": endpoints.redis,
                "WORKER_ID": worker_id,
                "CHAOS_RECORD": str(record),
                "WORKER_PARALLEL": "16",
            }
            starters.append(
                functools.partial(
                    start_python_service,
                    worker_id,
                    [sys.executable, str(WORKER_SCRIPT)],
                    env=env,
                    log_path=self.base / "stack" / "logs" / f"{worker_id}.log",
                    ready=functools.partial(worker_registered, endpoints.grpc, worker_id),
                )
            )
        # Together: each worker process spends a second or two on its imports.
        with ThreadPoolExecutor(max_workers=len(starters)) as pool:
            futures = [pool.submit(start) for start in starters]
            wait(futures)
        self.workers = [f.result() for f in futures if f.exception() is None]
        for future in futures:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def component(self, name: str) -> RunningService:
        for worker in self.workers:
            if worker.name == name:
                return worker
        assert self.stack is not None
        return self.stack.component(name)

    def dead(self) -> list[str]:
        services = [*(self.stack.services if self.stack else []), *self.workers]
        return [s.name for s in services if not s.process.alive]

    def stop(self) -> None:
        for worker in self.workers:
            # A worker left paused would answer SIGTERM only after its stop timeout.
            worker.process.send_signal(signal.SIGCONT)
        while self.workers:
            self.workers.pop().stop()
        if self.stack is not None:
            self.stack.stop()


# --- executions recorded by the workers ------------------------------------------------------


def read_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written right now
                lines.append(json.loads(raw))
    return lines


def executions(paths: Iterable[Path]) -> collections.Counter[str]:
    """How many times each job's handler ran to completion."""
    return collections.Counter(r["job"] for r in read_records(paths) if r["ev"] == "done")


def mid_job(path: Path) -> set[str]:
    """Dispatches a worker started and has not finished (nor had cancelled)."""
    started: set[str] = set()
    for record in read_records([path]):
        key = record["dispatch"] or record["job"]
        if record["ev"] == "start":
            started.add(key)
        else:
            started.discard(key)
    return started


# --- one window: load, fault, settle, check -------------------------------------------------


@dataclass
class Accepted:
    id: str
    at: float  # time.time() when the submit answered OK


@dataclass
class Outcome:
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    rerun: int = 0
    # The longest time from acceptance to the terminal state, in seconds.
    slowest_s: float = 0.0
    rejected: int = 0
    # A few (id: why) per bad outcome, for the report.
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, text: str) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < 5:
            found.append(text)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck)


@dataclass
class WindowResult:
    fault: str
    mode: str
    jobs: Outcome
    runs: Outcome
    fault_note: str
    settle_s: float
    rejected_reasons: collections.Counter[str]
    dead_after: list[str]

    @property
    def ok(self) -> bool:
        return self.jobs.ok and self.runs.ok and not self.dead_after


class Window:
    def __init__(self, chaos: ChaosStack, client: AsyncClient, redis: Redis, fault: str) -> None:
        self.chaos = chaos
        self.o = chaos.options
        self.client = client
        self.redis = redis
        self.fault = fault
        self.jobs: list[Accepted] = []
        self.runs: list[Accepted] = []
        self.rejected_jobs = 0
        self.rejected_runs = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self._inflight = asyncio.Semaphore(64)

    async def run(self) -> WindowResult:
        stop_load = asyncio.Event()
        began = time.monotonic()
        load = asyncio.create_task(self._load(stop_load))
        await asyncio.sleep(self.o.fault_at_s)  # steady load before the fault
        note = await self._inject()
        # The load goes on for `load_s` in all, and through 2 s of recovery at least.
        end = max(began + self.o.load_s, time.monotonic() + 2.0)
        await asyncio.sleep(end - time.monotonic())
        stop_load.set()
        await load
        started = time.monotonic()
        jobs, runs = await self._settle_and_check()
        return WindowResult(
            fault=self.fault,
            mode=self.o.mode,
            jobs=jobs,
            runs=runs,
            fault_note=note,
            settle_s=time.monotonic() - started,
            rejected_reasons=self.reasons,
            dead_after=self.chaos.dead(),
        )

    # -- load ----------------------------------------------------------------------------

    async def _load(self, stop: asyncio.Event) -> None:
        o = self.o
        tasks: set[asyncio.Task[None]] = set()
        every_run = max(round(o.job_rate / o.run_rate), 1)
        t0, i = time.monotonic(), 0
        while not stop.is_set():
            i += 1
            for call in [self._submit_job(i)] + (
                [self._start_run(i)] if i % every_run == 0 else []
            ):
                task = asyncio.create_task(call)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # An open loop on a fixed schedule: a slow call never slows the load down.
            await asyncio.sleep(max(0.0, t0 + i / o.job_rate - time.monotonic()))
        await asyncio.gather(*tasks)

    async def _call(self, call: Callable[[], Awaitable[str]], kind: str) -> str | None:
        async with self._inflight:
            try:
                return await call()
            except Exception as exc:  # refused or failed: not accepted, so not checked
                code = getattr(exc, "code", None)
                name = getattr(code, "name", type(exc).__name__)
                message = str(getattr(exc, "message", "") or exc)[:60]
                self.reasons[f"{kind}: {name} {message}"] += 1
                return None

    async def _submit_job(self, i: int) -> None:
        async def call() -> str:
            reply = await self.client.jobs.submit(
                topic=TOPIC,
                input={"i": i, "sleep_ms": self.o.sleep_ms},
                labels={"chaos": self.fault},
                max_retries=self.o.max_retries,
                deadline_ms=self.o.job_deadline_s * 1000,
            )
            return reply.job_id

        job_id = await self._call(call, "job")
        if job_id is None:
            self.rejected_jobs += 1
        else:
            self.jobs.append(Accepted(job_id, time.time()))

    async def _start_run(self, i: int) -> None:
        async def call() -> str:
            reply = await self.client.runs.start(WORKFLOW_ID, input={"n": i})
            return reply.run_id

        run_id = await self._call(call, "run")
        if run_id is None:
            self.rejected_runs += 1
        else:
            self.runs.append(Accepted(run_id, time.time()))

    # -- faults --------------------------------------------------------------------------

    async def _inject(self) -> str:
        if self.fault == "none":
            return ""
        if self.fault == "worker-pause":
            return await self._pause_worker()
        name = FAULTS[self.fault][1]
        assert self.chaos.stack is not None
        process = self.chaos.component(name).process
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.stop)  # reaps it
        await asyncio.sleep(self.o.down_s)  # the outage itself
        began = time.monotonic()
        await asyncio.to_thread(self.chaos.stack.restart, name)
        return f"down {self.o.down_s:g}s, back in {time.monotonic() - began:.1f}s"

    async def _pause_worker(self) -> str:
        name = FAULTS["worker-pause"][1]
        process = self.chaos.component(name).process
        record = self.chaos.records[name]
        deadline = time.monotonic() + 15
        while True:
            # Stop it while it runs a job; the record file is final once it is stopped.
            if mid_job(record):
                process.send_signal(signal.SIGSTOP)
                # Re-read: the job may have ended just before the stop landed.
                held = mid_job(record)
                if held:
                    break
                process.send_signal(signal.SIGCONT)
            if time.monotonic() > deadline:
                return "no job ever in flight on the worker: not paused"
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.o.pause_s)  # the freeze itself
        process.send_signal(signal.SIGCONT)
        return f"paused {self.o.pause_s:g}s holding {len(held)} running job(s)"

    # -- the check -----------------------------------------------------------------------

    def _settle_deadline(self) -> float:
        """time.time() by which every accepted job and run must be terminal."""
        last_job = max((a.at for a in self.jobs), default=time.time())
        last_run = max((a.at for a in self.runs), default=time.time())
        return max(last_job + self.o.job_deadline_s, last_run + self.o.run_timeout_s) + (
            self.o.slack_s
        )

    async def _settle_and_check(self) -> tuple[Outcome, Outcome]:
        deadline = self._settle_deadline()
        open_jobs = {a.id for a in self.jobs}
        open_runs = {a.id for a in self.runs}
        while open_jobs or open_runs:
            open_jobs = {
                j for j, s in (await self._job_states(open_jobs)).items() if s not in TERMINAL_JOB
            }
            open_runs = {
                r for r, s in (await self._run_states(open_runs)).items() if s not in TERMINAL_RUN
            }
            if time.time() > deadline:
                break
            await asyncio.sleep(0.5)
        await self._quiesce()
        return await self._check_jobs(), await self._check_runs()

    async def _quiesce(self, within: float = 15.0) -> None:
        """Late results (a paused worker's, a re-run's) may land after their jobs ended, and
        a second completion would show only then: wait until no worker is mid-job and the
        event logs of the jobs run more than once stop growing."""
        deadline = time.monotonic() + within
        records = self.chaos.records.values()
        while True:
            if not any(mid_job(path) for path in records) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        ran = executions(records)
        rerun = [a.id for a in self.jobs if ran[a.id] > 1]
        previous: list[int] | None = None
        while time.monotonic() < deadline:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in rerun:
                    pipe.llen(f"job:{job_id}:events")
                lengths = list(await pipe.execute())
            except Exception:  # valkey still coming back
                lengths = None
            if lengths is not None and lengths == previous:
                return
            previous = lengths
            await asyncio.sleep(0.5)

    async def _job_states(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        if not ids:
            return {}
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(f"job:{job_id}", "state")
            values = await pipe.execute()
        except Exception:  # valkey still coming back
            return dict.fromkeys(ids, "?")
        return {j: (v or b"").decode() for j, v in zip(ids, values, strict=True)}

    async def _run_states(self, ids: Iterable[str]) -> dict[str, str]:
        async def one(run_id: str) -> tuple[str, str]:
            try:
                run = await self.client.runs.get(run_id)
            except Exception as exc:
                return run_id, f"?{type(exc).__name__}"
            return run_id, run_pb2.RunStatus.Name(run.status)

        return dict(await asyncio.gather(*(one(r) for r in ids)))

    async def _job_details(self, ids: list[str]) -> list[tuple[bool, str, list[str]]]:
        """(exists, state, event log) of each job."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(f"job:{job_id}")
            pipe.hget(f"job:{job_id}", "state")
            pipe.lrange(f"job:{job_id}:events", 0, -1)
        raw = await pipe.execute()
        return [
            (
                bool(raw[3 * i]),
                (raw[3 * i + 1] or b"").decode(),
                [e.decode() for e in raw[3 * i + 2]],
            )
            for i in range(len(ids))
        ]

    async def _check_jobs(self) -> Outcome:
        out = Outcome(accepted=len(self.jobs), rejected=self.rejected_jobs)
        ran = executions(self.chaos.records.values())
        ids = [a.id for a in self.jobs]
        for job_id, (exists, state, events) in zip(ids, await self._job_details(ids), strict=True):
            classify_job(out, job_id, exists, state, events, ran[job_id])
        return out

    async def _check_runs(self) -> Outcome:
        out = Outcome(accepted=len(self.runs), rejected=self.rejected_runs)
        ran = executions(self.chaos.records.values())
        for accepted in self.runs:
            run_id = accepted.id
            try:
                run = await self.client.runs.get(run_id)
            except Exception as exc:
                if "NotFound" in type(exc).__name__:
                    out.lost += 1
                    out.note("lost", f"{run_id}: not found")
                else:
                    out.stuck += 1
                    out.note("stuck", f"{run_id}: unreadable ({exc})")
                continue
            status = run_pb2.RunStatus.Name(run.status)
            events = [e async for e in self.client.runs.timeline(run_id)]
            terminal_events = [
                e for e in events if e.type == "run_status" and e.status in TERMINAL_RUN
            ]
            succeeded_steps = collections.Counter(
                e.step_id
                for e in events
                if e.type == "step_completed" and e.status == "STEP_STATUS_SUCCEEDED"
            )
            step_jobs = [sr.job_id for sr in run.steps.values() if sr.job_id]
            step_details = await self._job_details(step_jobs) if step_jobs else []
            twice_jobs = [
                j
                for j, (_, _, log) in zip(step_jobs, step_details, strict=True)
                if completions(log) > 1
            ]
            twice_steps = [s for s, n in succeeded_steps.items() if n > 1]
            if status not in TERMINAL_RUN:
                out.stuck += 1
                steps = {k: run_pb2.StepStatus.Name(v.status) for k, v in run.steps.items()}
                out.note("stuck", f"{run_id}: {status} {steps}")
            elif status == "RUN_STATUS_SUCCEEDED":
                out.succeeded += 1
            else:
                out.failed += 1
                out.note("failed", f"{run_id}: {status} {run.error.message}")
            if len(terminal_events) > 1 or twice_steps or twice_jobs:
                out.duplicated += 1
                out.note(
                    "duplicated",
                    f"{run_id}: {len(terminal_events)} terminal events, steps {twice_steps}, "
                    f"jobs {twice_jobs}",
                )
            if any(ran[j] > 1 for j in step_jobs):
                out.rerun += 1
            if status in TERMINAL_RUN and run.HasField("completed_at"):
                took = run.completed_at.ToMilliseconds() / 1000 - accepted.at
                out.slowest_s = max(out.slowest_s, took)
        return out


def completions(events: list[str]) -> int:
    """Terminal transitions in a job's event log (entries `ms|STATE|message`); results that
    came after the job ended are logged as `ignored ...` and are not completions."""
    count = 0
    for entry in events:
        _, state, message = entry.split("|", 2)
        if state in TERMINAL_JOB and not message.startswith("ignored"):
            count += 1
    return count


def classify_job(
    out: Outcome, job_id: str, exists: bool, state: str, events: list[str], runs: int
) -> None:
    if not exists:
        out.lost += 1
        out.note("lost", f"{job_id}: no record")
        return
    if state == "SUCCEEDED":
        out.succeeded += 1
        if runs == 0:
            # Succeeded without ever running: as bad as a duplicate.
            out.duplicated += 1
            out.note("duplicated", f"{job_id}: SUCCEEDED but no worker ran it")
    elif state in TERMINAL_JOB:
        out.failed += 1
        out.note("failed", f"{job_id}: {events[-1] if events else state}")
    else:
        out.stuck += 1
        out.note("stuck", f"{job_id}: {state} {events[-3:]}")
    if completions(events) > 1:
        out.duplicated += 1
        out.note("duplicated", f"{job_id}: {[e for e in events if '|' in e][-4:]}")
    if runs > 1:
        out.rerun += 1
    out.slowest_s = max(out.slowest_s, time_to_terminal_s(events))


def time_to_terminal_s(events: list[str]) -> float:
    """From the first entry of a job's event log to its first terminal transition."""
    if not events:
        return 0.0
    first = int(events[0].split("|", 1)[0])
    for entry in events:
        ms, state, message = entry.split("|", 2)
        if state in TERMINAL_JOB and not message.startswith("ignored"):
            return (int(ms) - first) / 1000
    return 0.0


# --- the suite ------------------------------------------------------------------------------


async def _run_windows(chaos: ChaosStack, on_result: Callable[[WindowResult], None]) -> None:
    o = chaos.options
    redis = Redis.from_url(chaos.redis_url, socket_timeout=5, socket_connect_timeout=2)
    async with AsyncClient(chaos.grpc_target, timeout=5.0) as client:
        try:
            await client.workflows.upsert(chaos_workflow(o))
            for fault in o.faults:
                logger.info("chaos window: %s (%s)", fault, o.mode)
                result = await Window(chaos, client, redis, fault).run()
                on_result(result)
        finally:
            await redis.aclose()


def run_suite(
    options: Options,
    base: Path,
    on_result: Callable[[WindowResult], None] | None = None,
) -> list[WindowResult]:
    """Start the stack, run one window per fault, stop the stack; the results in order.
    Call it from the main thread (see ChaosStack)."""
    results: list[WindowResult] = []

    def keep(result: WindowResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    chaos = ChaosStack(options, base)
    try:
        chaos.start()
        asyncio.run(_run_windows(chaos, keep))
    finally:
        chaos.stop()
    return results


def table(results: list[WindowResult], title: str = "Faults and outcomes") -> Table:
    t = Table(title=title)
    for column in (
        "mode",
        "fault",
        "kind",
        "accepted",
        "succeeded",
        "failed",
        "lost",
        "duplicated",
        "stuck",
        "re-run",
        "slowest",
        "refused",
        "settled in",
    ):
        t.add_column(column, justify="right" if column not in ("mode", "fault", "kind") else "left")

    def bad(n: int) -> str:
        return f"[red]{n}[/red]" if n else "0"

    for r in results:
        for kind, out in (("jobs", r.jobs), ("runs", r.runs)):
            t.add_row(
                r.mode,
                r.fault,
                kind,
                str(out.accepted),
                str(out.succeeded),
                str(out.failed),
                bad(out.lost),
                bad(out.duplicated),
                bad(out.stuck),
                str(out.rerun),
                f"{out.slowest_s:.1f}s",
                str(out.rejected),
                f"{r.settle_s:.1f}s" if kind == "jobs" else "",
            )
    return t


def details(results: list[WindowResult]) -> list[str]:
    """One line per example of a bad (or failed) outcome, and per refused-call reason."""
    lines = []
    for r in results:
        if r.fault_note:
            lines.append(f"[{r.mode}/{r.fault}] {FAULTS[r.fault][0]}: {r.fault_note}")
        if r.dead_after:
            lines.append(f"[{r.mode}/{r.fault}] components not running afterwards: {r.dead_after}")
        for kind, out in (("jobs", r.jobs), ("runs", r.runs)):
            for what, examples in out.examples.items():
                for example in examples:
                    lines.append(f"[{r.mode}/{r.fault}] {kind} {what}: {example}")
        if r.rejected_reasons:
            lines.append(f"[{r.mode}/{r.fault}] refused calls: {dict(r.rejected_reasons)}")
    return lines


def print_report(results: list[WindowResult], console: Console | None = None) -> None:
    console = console or Console()
    console.print(table(results))
    for line in details(results):
        console.print(line, markup=False, highlight=False)


def new_base(root: Path | None = None) -> Path:
    base = (root or Path(os.environ.get("TMPDIR", "/tmp"))) / f"cordum-chaos-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    return base
