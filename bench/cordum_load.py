"""The load the bench puts on Cordum through its gRPC API (asyncio, grpc.aio).

Completions of batch-submitted jobs are counted from the scheduler's job events
(`<namespace>cordum.job.events.<kind>.<STATE>`, one `cordum.v1.JobEvent` per state change;
the phase listens to the terminal ones of plain jobs only).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import grpc
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

TOPIC = "job.echo"
WAIT_TIMEOUT_MS = 30_000
_TERMINAL = {
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
    job_pb2.JOB_STATE_TIMEOUT,
    job_pb2.JOB_STATE_DENIED,
}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values) - 1, max(0, rank - 1))]


@dataclass
class PhaseResult:
    name: str
    jobs: int = 0
    wall_s: float = 0.0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def finish(self) -> PhaseResult:
        self.latencies_ms.sort()
        return self


def _wait_request(seq: int) -> job_service_pb2.SubmitJobAndWaitRequest:
    return job_service_pb2.SubmitJobAndWaitRequest(
        job=job_service_pb2.SubmitJobRequest(topic=TOPIC, prompt=f"ping {seq}"),
        timeout_ms=WAIT_TIMEOUT_MS,
    )


class CordumLoad:
    def __init__(
        self, grpc_target: str, nats_url: str, namespace: str = "", channels: int = 1
    ) -> None:
        self.grpc_target = grpc_target
        self.channel_count = channels
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[job_service_pb2_grpc.JobServiceStub] = []
        self.nats_url = nats_url
        self.events_subject = namespace + "cordum.job.events.job.*"
        self.stub: job_service_pb2_grpc.JobServiceStub | None = None
        self.nc: NATS | None = None
        self._seq = 0
        # Batch phase: job id prefix -> terminal events seen.
        self._watch_prefix = ""
        self._done = 0
        self._done_failed = 0
        self._done_changed = asyncio.Event()
        self._last_done = 0.0
        self._batch_sub: Subscription | None = None
        self._batch_submitted = 0

    async def __aenter__(self) -> CordumLoad:
        # Several channels = several TCP connections (own subchannel pool each), so several
        # gateway processes sharing the port (SO_REUSEPORT) all get calls.
        for _ in range(self.channel_count):
            channel = grpc.aio.insecure_channel(
                self.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(channel)
            self.stubs.append(job_service_pb2_grpc.JobServiceStub(channel))
        self.stub = self.stubs[0]
        self.nc = await nats.connect(self.nats_url, name="cordum-bench")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()
        for channel in self.channels:
            await channel.close()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def _on_event(self, msg: Msg) -> None:
        if not self._watch_prefix:
            return
        event = job_pb2.JobEvent.FromString(msg.data)
        if event.state in _TERMINAL and event.job_id.startswith(self._watch_prefix):
            self._done += 1
            if event.state != job_pb2.JOB_STATE_SUCCEEDED:
                self._done_failed += 1
            self._last_done = time.perf_counter()
            self._done_changed.set()

    async def one(self, result: PhaseResult, start: float | None = None) -> None:
        """One SubmitJobAndWait; latency from `start` (perf_counter) or from now."""
        seq = self._next()
        stub = self.stubs[seq % len(self.stubs)]
        began = time.perf_counter() if start is None else start
        try:
            reply = await stub.SubmitJobAndWait(_wait_request(seq))
        except grpc.aio.AioRpcError as exc:
            result.failed += 1
            result.first_error = result.first_error or f"{exc.code().name}: {exc.details()}"
            return
        if not reply.done or reply.job.state != job_pb2.JOB_STATE_SUCCEEDED:
            result.failed += 1
            result.first_error = result.first_error or (
                f"job {reply.job_id} {job_pb2.JobState.Name(reply.job.state)} done={reply.done}"
            )
            return
        result.latencies_ms.append((time.perf_counter() - began) * 1000)
        result.jobs += 1

    # -- 1. one job per call, closed loop -------------------------------------------------------

    async def closed_loop(
        self, concurrency: int, duration_s: float, name: str = "one job per call"
    ) -> PhaseResult:
        result = PhaseResult(name)
        stop_at = time.perf_counter() + duration_s

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                await self.one(result)

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - began
        return result.finish()

    # -- 2. batch submit ------------------------------------------------------------------------

    async def batch(
        self,
        *,
        total: int,
        batch_size: int,
        in_flight_calls: int,
        max_outstanding: int,
        max_s: float,
    ) -> PhaseResult:
        """Submit `total` jobs with BatchSubmitJobs until all complete (or `max_s` passes).

        At most `in_flight_calls` calls and `max_outstanding` unfinished jobs at a time, so the
        backlog stays bounded; the rate is jobs completed / (last completion - first submit).
        """
        assert self.stub is not None
        result = PhaseResult("batch submit")
        prefix = f"bench-b{time.monotonic_ns()}-"
        self._watch_prefix, self._done, self._done_failed = prefix, 0, 0
        # Subscribed for this phase only: elsewhere the client does not pay for the events.
        assert self.nc is not None
        sub = await self.nc.subscribe(self.events_subject, cb=self._on_event)
        await self.nc.flush()
        submitted = 0
        submit_ms: list[float] = []
        calls = asyncio.Semaphore(in_flight_calls)
        began = time.perf_counter()
        deadline = began + max_s

        async def call(first: int, count: int) -> None:
            request = job_service_pb2.BatchSubmitJobsRequest(
                jobs=[
                    job_service_pb2.SubmitJobRequest(
                        topic=TOPIC, prompt=f"ping {first + i}", job_id=f"{prefix}{first + i}"
                    )
                    for i in range(count)
                ]
            )
            start = time.perf_counter()
            stub = self.stubs[first // batch_size % len(self.stubs)]
            try:
                reply = await stub.BatchSubmitJobs(request)
            except grpc.aio.AioRpcError as exc:
                result.failed += count
                result.first_error = result.first_error or f"{exc.code().name}: {exc.details()}"
                return
            finally:
                calls.release()
            submit_ms.append((time.perf_counter() - start) * 1000)
            for r in reply.results:
                if r.HasField("error"):
                    result.failed += 1
                    result.first_error = result.first_error or r.error.message

        tasks = []
        while submitted < total and time.perf_counter() < deadline:
            while submitted - self._done - result.failed + batch_size > max_outstanding:
                self._done_changed.clear()
                try:
                    await asyncio.wait_for(
                        self._done_changed.wait(), deadline - time.perf_counter()
                    )
                except TimeoutError:
                    break
            if time.perf_counter() >= deadline:
                break
            await calls.acquire()
            count = min(batch_size, total - submitted)
            tasks.append(asyncio.create_task(call(submitted, count)))
            submitted += count
        await asyncio.gather(*tasks)
        while self._done + result.failed < submitted and time.perf_counter() < deadline:
            self._done_changed.clear()
            try:
                await asyncio.wait_for(self._done_changed.wait(), deadline - time.perf_counter())
            except TimeoutError:
                break
        result.jobs = self._done - self._done_failed
        result.failed += self._done_failed
        result.wall_s = (self._last_done if self._done else time.perf_counter()) - began
        result.extra = {
            "submitted": submitted,
            "unfinished": submitted - self._done - result.failed + self._done_failed,
            "call_p50_ms": percentile(sorted(submit_ms), 50),
        }
        refused = result.failed - self._done_failed  # never accepted: no event will come
        self._batch_sub, self._batch_submitted = sub, submitted - refused
        return result.finish()

    async def drain_batch(self, timeout_s: float) -> float:
        """After `batch()`: wait (unmeasured) until its unfinished jobs are done, so they do not
        run into the next phase. Returns how many are still unfinished."""
        deadline = time.perf_counter() + timeout_s
        while self._done < self._batch_submitted and time.perf_counter() < deadline:
            self._done_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done_changed.wait(), deadline - time.perf_counter())
        self._watch_prefix = ""
        if self._batch_sub is not None:
            await self._batch_sub.unsubscribe()
            self._batch_sub = None
        return self._batch_submitted - self._done

    # -- 3. idle sequential latency -------------------------------------------------------------

    async def sequential(self, count: int, max_s: float) -> PhaseResult:
        result = PhaseResult("idle sequential")
        began = time.perf_counter()
        for _ in range(count):
            await self.one(result)
            if time.perf_counter() - began > max_s:
                break
        result.wall_s = time.perf_counter() - began
        return result.finish()

    # -- 4. fixed offered load, open loop -------------------------------------------------------

    async def open_loop(self, rate: float, duration_s: float) -> PhaseResult:
        """Start calls on a fixed schedule whatever completes; latency counts from the
        scheduled start, so a client that falls behind shows up in the figures."""
        result = PhaseResult(f"open loop {rate:g}/s")
        n = int(rate * duration_s)
        began = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        late = 0.0
        for i in range(n):
            due = began + i / rate
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                late = max(late, now - due)
            tasks.append(asyncio.create_task(self.one(result, start=due)))
        await asyncio.gather(*tasks)
        last = time.perf_counter()
        result.wall_s = last - began
        result.extra = {"offered": n, "max_start_lag_ms": late * 1000}
        return result.finish()
