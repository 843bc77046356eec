"""The processes a bench run starts (nats-server, valkey-server, cordum-server, example workers,
a Celery worker) and how much CPU each of them spends.

Every process is started through `cordum.server.stack.services` and stopped by the PID we got
when we started it; Celery's pool children are looked up under the PID of the Celery worker we
started and, if they outlive it, stopped by their own PID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cordum.server.stack.launcher import grpc_serving, worker_registered
from cordum.server.stack.process import pick_free_port, wait_until
from cordum.server.stack.services import (
    RunningService,
    start_nats,
    start_python_service,
    start_valkey,
)

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
_TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


# --- CPU accounting ------------------------------------------------------------------------


def cpu_ms(pid: int) -> float:
    """utime + stime of a process (all its threads), in milliseconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; everything after its ')' is fixed.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_MS


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the PID, a unique identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def machine_busy_ms() -> float:
    """CPU time all processes of the machine spent, from /proc/stat (all CPUs), in ms."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) * _TICK_MS


@dataclass
class CpuGroup:
    """A named set of PIDs whose CPU time is added up."""

    name: str
    pids: Callable[[], list[int]]


class CpuMeter:
    """CPU ms per group between `start()` and `stop()`."""

    def __init__(self, groups: list[CpuGroup]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}
        self._wall = 0.0
        self.wall_s = 0.0
        self.used: dict[str, float] = {}
        self._machine = 0.0
        self.other_ms = 0.0

    def start(self) -> None:
        self._before = {pid: cpu_ms(pid) for g in self.groups for pid in g.pids()}
        self._machine = machine_busy_ms()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        self.wall_s = time.monotonic() - self._wall
        self.used = {}
        for g in self.groups:
            # A PID born during the phase (a Celery child replaced) counts from 0.
            self.used[g.name] = sum(cpu_ms(pid) - self._before.get(pid, 0.0) for pid in g.pids())
        ours = sum(self.used.values())
        # Everything else on the machine (other users' processes, the kernel's own threads):
        # it competes for the same 2 cores, so it is printed with the figures.
        self.other_ms = max(0.0, machine_busy_ms() - self._machine - ours)
        return self.used


# --- what went over the wire ----------------------------------------------------------------


@dataclass
class WireSample:
    redis_reads: int = 0
    redis_commands: dict[str, int] = field(default_factory=dict)
    redis_usec: int = 0
    nats_in: int = 0
    nats_out: int = 0


class WireMeter:
    """Redis round trips (valkey's `total_reads_processed`: one per request batch it read),
    Redis commands by name, and NATS messages in/out (nats-server's /varz), between two
    points in time."""

    def __init__(self, redis_url: str, nats_monitor_url: str | None) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url)
        self._monitor = nats_monitor_url
        self._before = WireSample()
        self.delta = WireSample()

    def _sample(self) -> WireSample:
        stats = self._redis.info("stats")
        commands = self._redis.info("commandstats")
        sample = WireSample(
            redis_reads=int(stats["total_reads_processed"]),
            redis_commands={
                k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in commands.items()
            },
            redis_usec=sum(int(v["usec"]) for v in commands.values()),
        )
        if self._monitor:
            with urllib.request.urlopen(self._monitor + "/varz", timeout=2) as reply:
                varz = json.load(reply)
            sample.nats_in, sample.nats_out = int(varz["in_msgs"]), int(varz["out_msgs"])
        return sample

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> WireSample:
        after, before = self._sample(), self._before
        # Our own INFO calls (2 per sample) are left out.
        commands = {
            name: calls - before.redis_commands.get(name, 0)
            for name, calls in after.redis_commands.items()
            if name != "info"
        }
        self.delta = WireSample(
            redis_reads=after.redis_reads - before.redis_reads - 2,
            redis_commands={k: v for k, v in commands.items() if v > 0},
            redis_usec=after.redis_usec - before.redis_usec,
            nats_in=after.nats_in - before.nats_in,
            nats_out=after.nats_out - before.nats_out,
        )
        return self.delta

    def close(self) -> None:
        self._redis.close()


# --- the stack -----------------------------------------------------------------------------


@dataclass
class BenchStack:
    work_dir: Path
    workers: int
    max_parallel: int
    worker_uvloop: bool = True
    aof: bool = True
    # "one": all roles in one cordum-server; "split": scheduler (+ safety kernel) in one
    # process, `gateways` gateway processes sharing the gRPC port (SO_REUSEPORT).
    layout: str = "one"
    gateways: int = 1
    # JetStream mode (README "Durability: NATS modes"): nats-server with JetStream on.
    jetstream: bool = False
    server_env: dict[str, str] = field(default_factory=dict)
    services: list[RunningService] = field(default_factory=list)
    nats_url: str = ""
    redis_url: str = ""
    grpc_target: str = ""
    server: RunningService | None = None
    servers: list[RunningService] = field(default_factory=list)
    worker_services: list[RunningService] = field(default_factory=list)
    valkey: RunningService | None = None
    nats: RunningService | None = None

    def start(self) -> None:
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.nats = start_nats(
            data_dir=self.work_dir / "nats",
            log_path=logs / "nats.log",
            jetstream=self.jetstream,
            monitor_port=0,
        )
        self.services.append(self.nats)
        self.nats_url = self.nats.url
        self.valkey = start_valkey(
            data_dir=self.work_dir / "valkey", log_path=logs / "valkey.log", aof=self.aof
        )
        self.services.append(self.valkey)
        self.redis_url = self.valkey.url
        grpc_port = pick_free_port()
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        base = {
            "NATS_URL": self.nats_url,
            "REDIS_URL": self.redis_url,
            "CORDUM_GRPC_HOST": "127.0.0.1",
            "CORDUM_METRICS_PORT": "0",
            "CORDUM_WS_PORT": "0",
            "CORDUM_CONFIG_DIR": str(REPO / "config"),
            "NATS_USE_JETSTREAM": "1" if self.jetstream else "0",
            **self.server_env,
        }
        target = self.grpc_target
        if self.layout == "one":
            plan = [("cordum-server", {"CORDUM_GRPC_PORT": str(grpc_port)}, target)]
        else:
            sched_port = pick_free_port()
            sched_target = f"127.0.0.1:{sched_port}"
            plan = [
                (
                    "cordum-scheduler",
                    {"CORDUM_GRPC_PORT": str(sched_port), "CORDUM_ROLES": "scheduler,safety"},
                    sched_target,
                )
            ]
            plan += [
                (
                    f"cordum-gateway-{i + 1}",
                    {"CORDUM_GRPC_PORT": str(grpc_port), "CORDUM_ROLES": "gateway,safety"},
                    target,
                )
                for i in range(self.gateways)
            ]
        for name, extra, ready_target in plan:
            log_path = logs / f"{name}.log"
            service = start_python_service(
                name,
                [sys.executable, "-m", "cordum.server", "run"],
                env={**base, **extra},
                log_path=log_path,
                # Gateways share a port, so a health check may reach another one: wait for
                # this process's own "ready" log line as well.
                ready=lambda t=ready_target, lp=log_path: (
                    "cordum-server ready" in lp.read_text(errors="replace") and grpc_serving(t)
                ),
                port=int(ready_target.rsplit(":", 1)[1]),
                url=f"grpc://{ready_target}",
            )
            self.services.append(service)
            self.servers.append(service)
        # The process the client talks to (the first gateway, or the all-roles server).
        self.server = self.servers[0] if self.layout == "one" else self.servers[1]
        for i in range(self.workers):
            worker_id = f"bench-echo-{i + 1}"
            service = start_python_service(
                worker_id,
                [sys.executable, str(BENCH_DIR / "echo_worker_runner.py")],
                env={
                    "NATS_URL": self.nats_url,
                    "REDIS_URL": self.redis_url,
                    "WORKER_ID": worker_id,
                    "WORKER_TOPICS": "job.echo",
                    "BENCH_MAX_PARALLEL": str(self.max_parallel),
                    "BENCH_UVLOOP": "1" if self.worker_uvloop else "0",
                    "LOG_LEVEL": "WARNING",
                },
                log_path=logs / f"{worker_id}.log",
                ready=lambda w=worker_id: worker_registered(target, w),
            )
            self.services.append(service)
            self.worker_services.append(service)

    def stop(self) -> None:
        while self.services:
            service = self.services.pop()
            try:
                service.stop(timeout=10)
            except BaseException:  # keep stopping the others, even on a second Ctrl-C
                logger.exception("stopping %s failed", service.name)

    def pid_of(self, service: RunningService | None) -> list[int]:
        if service is None or service.process.pid is None:
            return []
        return [service.process.pid]

    def cpu_groups(self) -> list[CpuGroup]:
        return [
            CpuGroup("bench client", lambda: [os.getpid()]),
            *[CpuGroup(svc.name, lambda svc=svc: self.pid_of(svc)) for svc in self.servers],
            CpuGroup(
                f"workers (x{self.workers})",
                lambda: [p for s in self.worker_services for p in self.pid_of(s)],
            ),
            CpuGroup("nats-server", lambda: self.pid_of(self.nats)),
            CpuGroup("valkey-server", lambda: self.pid_of(self.valkey)),
        ]


# --- Celery ---------------------------------------------------------------------------------


class CeleryWorker:
    """`celery worker` from the bench's Celery venv; stopped by PID, its pool children too."""

    def __init__(self, python: Path, broker_url: str, work_dir: Path, concurrency: int) -> None:
        self.python = python
        self.broker_url = broker_url
        self.work_dir = work_dir
        self.concurrency = concurrency
        self.service: RunningService | None = None
        # PID -> start time, so a recycled PID is never signalled.
        self._children: dict[int, int | None] = {}

    def start(self) -> None:
        ready_file = self.work_dir / "celery-ready"
        ready_file.unlink(missing_ok=True)
        argv = [
            str(self.python),
            "-m",
            "celery",
            "-A",
            "celery_bench",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(self.concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            "bench",
            "-n",
            f"bench@{os.getpid()}",
        ]
        self.service = start_python_service(
            "celery-worker",
            argv,
            log_path=self.work_dir / "logs" / "celery-worker.log",
            env={"BENCH_CELERY_URL": self.broker_url, "BENCH_CELERY_READY": str(ready_file)},
            cwd=BENCH_DIR,
            ready=ready_file.exists,
            timeout=60,
        )
        # The pool's children exist once the worker is ready.
        wait_until(
            lambda: len(self.pids()) > self.concurrency, timeout=10, what="celery pool children"
        )

    def pids(self) -> list[int]:
        if (
            self.service is None
            or self.service.process.pid is None
            or not self.service.process.alive
        ):
            return sorted(self._children)
        main = self.service.process.pid
        kids = children(main)
        for kid in kids:
            self._children.setdefault(kid, start_time(kid))
        return [main, *kids]

    def stop(self) -> None:
        if self.service is None:
            return
        self.pids()  # remember the children before the parent goes
        self.service.stop(timeout=10)
        for pid, started in self._children.items():
            # A pool child outliving its parent: stop it by its own PID (if it is still it).
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.service = None
