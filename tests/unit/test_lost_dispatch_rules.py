"""The pure parts of lost-dispatch detection: how the registry pairs idle heartbeats, and how
the scheduler's memory of its dispatches stays bounded (services/workers.py,
services/lost_dispatches.py). The end-to-end behaviour is in
tests/integration/test_jobs_lost_dispatch.py."""

from __future__ import annotations

from typing import Any

from cordum.agent.v1 import heartbeat_pb2
from cordum.sdk import cap
from cordum.server.services.lost_dispatches import LostDispatches
from cordum.server.services.workers import WorkerRegistry


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock, idle_gap_s: float = 0.5) -> WorkerRegistry:
    # observe() never touches the connection.
    nats: Any = None
    return WorkerRegistry(nats, clock=clock, idle_gap_s=idle_gap_s)


def beat(reg: WorkerRegistry, clock: Clock, at: float, active: int, worker: str = "w") -> None:
    clock.now = at
    hb = heartbeat_pb2.Heartbeat(worker_id=worker, active_jobs=active, max_parallel_jobs=4)
    reg.observe(cap.envelope(sender_id=worker, trace_id=worker, heartbeat=hb))


def pair_at(reg: WorkerRegistry, worker: str = "w") -> float:
    return next(s for s in reg.workers() if s.worker_id == worker).idle_pair_at


def test_two_idle_heartbeats_a_gap_apart_make_a_pair() -> None:
    clock = Clock()
    reg = registry(clock)
    beat(reg, clock, 1000.0, 0)
    assert pair_at(reg) == 0.0  # one idle heartbeat says nothing yet
    beat(reg, clock, 1000.2, 0)
    assert pair_at(reg) == 0.0  # too close to the first: one observation
    beat(reg, clock, 1000.6, 0)
    # The latest earlier idle beat at least the gap before this one.
    assert pair_at(reg) == 1000.0
    beat(reg, clock, 1000.8, 0)
    assert pair_at(reg) == 1000.2
    assert reg.idle_since("w", 1000.1)
    assert not reg.idle_since("w", 1000.2)
    assert not reg.idle_since("other", 0.0)


def test_a_busy_heartbeat_breaks_the_run() -> None:
    clock = Clock()
    reg = registry(clock)
    beat(reg, clock, 1000.0, 0)
    beat(reg, clock, 1001.0, 1)  # holds a job
    beat(reg, clock, 1002.0, 0)
    assert pair_at(reg) == 0.0  # 1000 and 1002 are not in a row
    beat(reg, clock, 1003.0, 0)
    assert pair_at(reg) == 1002.0
    beat(reg, clock, 1004.0, 2)
    # A pair once seen stays: a dispatch sent before it was not on the worker back then.
    assert pair_at(reg) == 1002.0


def test_a_burst_of_buffered_heartbeats_counts_once() -> None:
    clock = Clock()
    reg = registry(clock)
    # A worker's heartbeats buffered while it was disconnected arrive at once.
    for _ in range(4):
        beat(reg, clock, 1000.0, 0)
    assert pair_at(reg) == 0.0
    beat(reg, clock, 1001.0, 0)
    assert pair_at(reg) == 1000.0


def test_heartbeat_listeners_are_told_after_the_state_is_updated() -> None:
    clock = Clock()
    reg = registry(clock)
    seen: list[tuple[str, float]] = []

    def listener(state: Any) -> None:
        seen.append((state.worker_id, state.idle_pair_at))

    def broken(state: Any) -> None:
        raise RuntimeError("a listener bug must not break the registry")

    reg.add_heartbeat_listener(broken)
    reg.add_heartbeat_listener(listener)
    beat(reg, clock, 1000.0, 0)
    beat(reg, clock, 1001.0, 0)
    assert seen == [("w", 0.0), ("w", 1000.0)]
    reg.remove_heartbeat_listener(listener)
    beat(reg, clock, 1002.0, 0)
    assert len(seen) == 2


def tracker(clock: Clock, **bounds: Any) -> LostDispatches:
    # note()/forget() are memory only: no store, events or metrics are touched.
    unused: Any = None
    return LostDispatches(
        store=unused,
        registry=registry(clock),
        events=unused,
        complete=unused,
        metrics=unused,
        clock=clock,
        **bounds,
    )


def test_memory_is_bounded_by_count_and_age_and_pruned_by_results() -> None:
    clock = Clock()
    lost = tracker(clock, max_tracked=3, max_age_s=60.0)
    for i in range(5):
        lost.note(f"j{i}", "w", 1)
    assert len(lost) == 3  # the oldest two were dropped
    assert "j0" not in lost and "j4" in lost
    lost.forget("j3")  # its result was applied here
    assert len(lost) == 2
    clock.now += 61
    lost.note("j5", "w2", 2)  # everything noted more than 60 s ago expires
    assert len(lost) == 1 and "j5" in lost
    # A job dispatched again is tracked once, under its new worker.
    lost.note("j5", "w3", 3)
    assert len(lost) == 1


def test_tracking_can_be_switched_off() -> None:
    lost = tracker(Clock(), max_tracked=0)
    lost.note("j", "w", 1)
    assert len(lost) == 0
