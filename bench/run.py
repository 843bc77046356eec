"""`make bench`: Cordum's job path end to end through the gRPC API, next to Celery.

Starts its own nats-server, valkey-server (AOF on, as `cordumctl up` runs it), cordum-server
(one process, all roles; `--layout split` runs the scheduler and `--gateways` gateway
processes apart) and `--workers` example workers (`examples/echo_worker.py`'s handlers,
`--max-parallel` jobs each), then measures through the gRPC API:

1. one job per call: SubmitJobAndWait from a closed loop of `--concurrency` calls in flight;
2. batch submit: BatchSubmitJobs (`--batch-size` per call) until every job completed (counted
   from the scheduler's job events on NATS);
3. idle sequential latency: one SubmitJobAndWait at a time (p50/p95/p99);
4. p50/p99 at a fixed offered load (`--rate`, open loop: calls start on schedule whatever
   completes; latency counts from the scheduled start);
5. the same no-op work through Celery 5 (prefork worker with as many processes as Cordum has
   workers, Redis broker + result backend on the same valkey-server, `delay()` + `get()` from
   `--concurrency` client threads), from a Celery venv the bench creates once
   (`.venv/bench-celery`).

After the figures it prints, per phase, the CPU each process spent per completed job (and
how busy the rest of the machine was: other load skews every figure on a 2-core machine),
Redis round trips / commands and NATS messages per job, then one summary line. `--pyspy DIR`
also records py-spy profiles of the server and one worker during phase 1.

Every process it started is stopped by its PID, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import uvloop
from benchstack import (
    BENCH_DIR,
    REPO,
    BenchStack,
    CeleryWorker,
    CpuGroup,
    CpuMeter,
    WireMeter,
    WireSample,
)
from cordum_load import CordumLoad, PhaseResult, percentile

from cordum.server.stack.process import ManagedProcess, wait_until

# Inside the (git-ignored) project venv directory, so `make clean` removes it too.
CELERY_VENV = REPO / ".venv" / "bench-celery"
CELERY_REQUIREMENT = "celery[redis]>=5.5,<6"
CELERY_STAMP = CELERY_VENV / ".installed-celery"

# Processes started outside the stack (py-spy recorders); stopped by PID in main()'s finally.
EXTRA: list[ManagedProcess] = []


def out(line: str = "") -> None:
    print(line, flush=True)


# --- setup ---------------------------------------------------------------------------------


def ensure_celery_venv() -> Path:
    """A venv of its own for Celery, so its pins never touch the project venv."""
    python = CELERY_VENV / "bin" / "python"
    if CELERY_STAMP.exists() and python.exists():
        return python
    out(f"installing Celery into {CELERY_VENV.relative_to(REPO)} (once) ...")
    subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True)
    reply = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", CELERY_REQUIREMENT, "hiredis"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if reply.returncode != 0:
        raise RuntimeError(f"installing Celery failed:\n{reply.stdout}\n{reply.stderr}")
    CELERY_STAMP.write_text(CELERY_REQUIREMENT + "\n")
    return python


def celery_version(python: Path) -> str:
    reply = subprocess.run(
        [str(python), "-c", "import celery, kombu; print(celery.__version__, kombu.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    celery, kombu = reply.stdout.split()
    return f"celery {celery} (kombu {kombu})"


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the `finally` blocks stop what we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- reporting -----------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value:.2f}"


def report_phase(r: PhaseResult) -> None:
    line = f"  {r.jobs} jobs in {r.wall_s:.2f} s = {r.jobs_per_s:,.0f} jobs/s"
    if r.latencies_ms:
        line += (
            f"; latency p50 {fmt_ms(r.pct(50))} ms, p95 {fmt_ms(r.pct(95))} ms, "
            f"p99 {fmt_ms(r.pct(99))} ms, max {fmt_ms(r.latencies_ms[-1])} ms"
        )
    out(line)
    if r.failed:
        out(f"  FAILED: {r.failed} (first: {r.first_error})")
    if r.extra:
        out("  " + ", ".join(f"{k} {v:,.1f}" for k, v in r.extra.items()))


class WireTable:
    """Redis round trips / commands and NATS messages per completed job, per phase."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, WireSample]] = []

    def add(self, phase: str, jobs: int, sample: WireSample) -> None:
        self.rows.append((phase, jobs, sample))

    def print(self) -> None:
        if not self.rows:
            return
        out("Wire per completed job (valkey INFO: round trips = requests read, commands;")
        out("nats-server /varz: messages published in, delivered out)")
        for phase, jobs, w in self.rows:
            if not jobs:
                continue
            commands = ", ".join(
                f"{name} {calls / jobs:.2f}"
                for name, calls in sorted(w.redis_commands.items(), key=lambda kv: -kv[1])
            )
            out(
                f"  {phase}: Redis {w.redis_reads / jobs:.2f} round trips, "
                f"{sum(w.redis_commands.values()) / jobs:.2f} commands "
                f"({w.redis_usec / jobs:.0f} us in valkey) [{commands}]; "
                f"NATS {w.nats_in / jobs:.2f} in, {w.nats_out / jobs:.2f} out"
            )


class CpuTable:
    """CPU ms per job per process group, one column per phase."""

    def __init__(self) -> None:
        self.columns: list[tuple[str, int, float, dict[str, float], float]] = []

    def add(self, phase: str, jobs: int, meter: CpuMeter) -> None:
        self.columns.append((phase, jobs, meter.wall_s, dict(meter.used), meter.other_ms))

    def print(self) -> None:
        if not self.columns:
            return
        out("CPU ms per completed job (utime+stime from /proc/<pid>/stat over the phase;")
        out("in brackets: % of one core over the phase; the machine has 2 cores = 200%)")
        for phase, jobs, wall, used, other in self.columns:
            out(f"  {phase}: {jobs} jobs in {wall:.1f} s")
            total = 0.0
            for name, ms in used.items():
                total += ms
                per = ms / jobs if jobs else float("nan")
                out(f"    {name:<26} {per:6.3f} ms/job  ({100 * ms / (wall * 1000):5.1f}%)")
            per = total / jobs if jobs else float("nan")
            out(f"    {'total':<26} {per:6.3f} ms/job  ({100 * total / (wall * 1000):5.1f}%)")
            out(
                f"    {'(not ours: other load)':<26} {'':6} {'':6}   "
                f"({100 * other / (wall * 1000):5.1f}%)"
            )


def describe(args: argparse.Namespace, stack: BenchStack) -> None:
    def pid(service: object) -> str:
        process = getattr(service, "process", None)
        return str(process.pid) if process is not None else "?"

    servers = ", ".join(
        f"{svc.name} pid {pid(svc)}" + (" (all roles)" if args.layout == "one" else "")
        for svc in stack.servers
    )
    out(
        f"processes: nats-server pid {pid(stack.nats)}"
        f"{' (JetStream mode)' if args.jetstream else ''}; valkey-server pid {pid(stack.valkey)} "
        f"(AOF {'off' if args.no_aof else 'on'}); {servers}; {args.workers} example worker(s) "
        f"x max_parallel {args.max_parallel} "
        f"({'asyncio' if args.no_worker_uvloop else 'uvloop'}); bench client pid {os.getpid()} "
        f"(grpc.aio on uvloop, {args.channels} channel(s)); {os.cpu_count()} CPUs"
    )


class Recorder:
    """CPU per process and wire counts over one measured phase, into the two tables."""

    def __init__(self, cpu: CpuTable, wire_table: WireTable, wire: WireMeter) -> None:
        self.cpu_table = cpu
        self.wire_table = wire_table
        self.wire = wire
        self.meter = CpuMeter([])

    def start(self, groups: list[CpuGroup]) -> None:
        self.meter = CpuMeter(groups)
        self.wire.start()
        self.meter.start()

    def stop(self) -> None:
        self.meter.stop()
        self.wire.stop()

    def record(self, phase: str, jobs: int) -> None:
        self.cpu_table.add(phase, jobs, self.meter)
        self.wire_table.add(phase, jobs, self.wire.delta)


# --- the Cordum phases ---------------------------------------------------------------------


async def cordum_phases(
    args: argparse.Namespace, stack: BenchStack, rec: Recorder
) -> dict[str, PhaseResult]:
    results: dict[str, PhaseResult] = {}
    groups = stack.cpu_groups()
    async with CordumLoad(stack.grpc_target, stack.nats_url, channels=args.channels) as load:
        out(f"warm-up: {args.warmup:g} s at {args.concurrency} in flight ...")
        await load.closed_loop(args.concurrency, args.warmup)
        await load.sequential(50, 2.0)

        out(
            f"[1] one job per call: SubmitJobAndWait, {args.concurrency} in flight, "
            f"{args.duration:g} s"
        )
        profilers = start_profilers(args, stack)
        rec.start(groups)
        r = await load.closed_loop(args.concurrency, args.duration)
        rec.stop()
        rec.record("[1] one job per call", r.jobs)
        report_phase(r)
        results["one"] = r
        finish_profilers(args, profilers)

        out(
            f"[2] batch submit: BatchSubmitJobs x{args.batch_size}, up to {args.batch_jobs} jobs,"
            f" until all complete"
        )
        rec.start(groups)
        r = await load.batch(
            total=args.batch_jobs,
            batch_size=args.batch_size,
            in_flight_calls=2,
            max_outstanding=args.batch_outstanding,
            max_s=args.duration * 2,
        )
        rec.stop()
        rec.record("[2] batch submit", r.jobs)
        report_phase(r)
        results["batch"] = r
        left = await load.drain_batch(60.0)
        if r.extra.get("unfinished"):
            out(f"  (drained the unfinished jobs before the next phase; {left:.0f} still left)")

        out(f"[3] idle sequential latency: {args.sequential} calls, one at a time")
        rec.start(groups)
        r = await load.sequential(args.sequential, args.duration)
        rec.stop()
        rec.record("[3] idle sequential", r.jobs)
        report_phase(r)
        results["seq"] = r

        out(f"[4] fixed offered load: {args.rate:g} jobs/s open loop for {args.duration:g} s")
        rec.start(groups)
        r = await load.open_loop(args.rate, args.duration)
        rec.stop()
        rec.record(f"[4] open loop {args.rate:g}/s", r.jobs)
        report_phase(r)
        results["open"] = r
    return results


def start_profilers(args: argparse.Namespace, stack: BenchStack) -> list[ManagedProcess]:
    if not args.pyspy:
        return []
    from profiling import start_record

    targets = [("cordum-server", stack.server)]
    if stack.worker_services:
        targets.append(("worker-1", stack.worker_services[0]))
    started: list[ManagedProcess] = []
    for name, service in targets:
        assert service is not None and service.process.pid is not None
        started.append(
            start_record(
                service.process.pid, Path(args.pyspy), name, int(args.duration), args.pyspy_rate
            )
        )
    EXTRA.extend(started)
    return started


def finish_profilers(args: argparse.Namespace, profilers: list[ManagedProcess]) -> None:
    if not profilers:
        return
    from profiling import summarize

    for p in profilers:
        wait_until(lambda p=p: not p.alive, timeout=30, what=f"{p.name} to finish")
    for name in ("cordum-server", "worker-1"):
        raw = Path(args.pyspy) / f"{name}.txt"
        summary = summarize(raw, duration_s=int(args.duration), rate=args.pyspy_rate)
        (Path(args.pyspy) / f"{name}.summary.txt").write_text(summary + "\n")
        out(f"  py-spy summary: {Path(args.pyspy) / f'{name}.summary.txt'}")


# --- the Celery phase ----------------------------------------------------------------------


def celery_phase(
    args: argparse.Namespace, python: Path, stack: BenchStack, work_dir: Path, rec: Recorder
) -> dict[str, float]:
    """Celery worker + `--celery-clients` client processes sharing `--concurrency` threads."""
    assert stack.valkey is not None
    # Same valkey-server, its own database.
    url = stack.redis_url.rsplit("/", 1)[0] + "/1"
    worker = CeleryWorker(python, url, work_dir, args.celery_concurrency)
    clients: list[ManagedProcess] = []
    go_file = work_dir / "celery-go"
    go_file.unlink(missing_ok=True)
    n = max(1, args.celery_clients)
    shares = [args.concurrency // n + (1 if i < args.concurrency % n else 0) for i in range(n)]
    phase_files = [work_dir / f"celery-phase-{i}" for i in range(n)]
    out_files = [work_dir / f"celery-result-{i}.json" for i in range(n)]
    try:
        worker.start()
        for i, share in enumerate(shares):
            phase_files[i].unlink(missing_ok=True)
            out_files[i].unlink(missing_ok=True)
            clients.append(
                ManagedProcess(
                    f"celery-client-{i + 1}",
                    [
                        str(python),
                        str(BENCH_DIR / "celery_bench.py"),
                        "--concurrency",
                        str(share),
                        "--duration",
                        str(args.duration),
                        "--warmup",
                        str(args.warmup),
                        "--sequential",
                        str(min(args.sequential, 500) if i == 0 else 0),
                        "--phase-file",
                        str(phase_files[i]),
                        "--go-file",
                        str(go_file),
                        "--out",
                        str(out_files[i]),
                    ],
                    log_path=work_dir / "logs" / f"celery-client-{i + 1}.log",
                    env={"BENCH_CELERY_URL": url},
                    cwd=BENCH_DIR,
                )
            )
        groups = [
            CpuGroup(
                f"celery client (x{n})" if n > 1 else "celery client",
                lambda: [c.pid for c in clients if c.pid],
            ),
            CpuGroup("celery worker (main)", lambda: worker.pids()[:1]),
            CpuGroup(f"celery pool (x{args.celery_concurrency})", lambda: worker.pids()[1:]),
            CpuGroup("valkey-server", lambda: stack.pid_of(stack.valkey)),
        ]
        for c in clients:
            c.start()

        def phases() -> list[str]:
            return [f.read_text() if f.exists() else "" for f in phase_files]

        def running() -> bool:
            return any(c.alive for c in clients)

        deadline = time.monotonic() + args.warmup + args.duration + 120
        # Meter exactly the measured part: all clients warm, then go, until all are done.
        wait_until(
            lambda: all(p == "ready" for p in phases()) or not running(),
            timeout=args.warmup + 60,
            what="Celery clients to warm up",
        )
        rec.start(groups)
        go_file.touch()
        while running() and time.monotonic() < deadline:
            if all(p in ("sequential", "done") for p in phases()):
                break
            time.sleep(0.005)
        rec.stop()
        wait_until(lambda: not running(), timeout=120, what="Celery clients to finish")
        results = []
        for c, f in zip(clients, out_files, strict=True):
            if c.returncode != 0 or not f.exists():
                raise RuntimeError(f"{c.name} failed:\n{c.tail_log(30)}")
            results.append(json.loads(f.read_text()))
        latencies = sorted(v for r in results for v in r["latencies_ms"])
        jobs = sum(r["jobs"] for r in results)
        wall = max(r["wall_s"] for r in results)
        figures = {
            "jobs": jobs,
            "wall_s": wall,
            "jobs_per_s": jobs / wall,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "errors": sum(r["errors"] for r in results),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
            "seq_p50_ms": results[0]["seq_p50_ms"],
            "seq_p99_ms": results[0]["seq_p99_ms"],
        }
        rec.record(f"[5] Celery, {args.concurrency} in flight", jobs)
        return figures
    finally:
        for c in clients:
            c.stop(timeout=5)
        worker.stop()


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="example worker processes")
    p.add_argument("--max-parallel", type=int, default=32, help="jobs in flight per worker")
    p.add_argument("--no-worker-uvloop", action="store_true", help="workers on plain asyncio")
    p.add_argument(
        "--layout",
        choices=["one", "split"],
        default="one",
        help="one: all roles in one cordum-server; split: a scheduler process + gateway(s)",
    )
    p.add_argument("--gateways", type=int, default=1, help="gateway processes (split layout)")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels the client opens")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight in [1] and [5]")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batch-jobs", type=int, default=30_000)
    p.add_argument("--batch-outstanding", type=int, default=5_000)
    p.add_argument("--sequential", type=int, default=2_000)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--celery-concurrency", type=int, default=None, help="default: --workers")
    p.add_argument(
        "--celery-clients", type=int, default=1, help="Celery client processes (threads split)"
    )
    p.add_argument("--no-celery", action="store_true")
    p.add_argument("--no-aof", action="store_true", help="valkey without its append-only file")
    p.add_argument("--jetstream", action="store_true", help="NATS_USE_JETSTREAM=1 (durable)")
    p.add_argument("--pyspy", default="", help="dir: py-spy the server and a worker in [1]")
    p.add_argument("--pyspy-rate", type=int, default=250)
    p.add_argument("--keep", default="", help="dir for logs (default: a temp dir, removed)")
    args = p.parse_args()
    if args.celery_concurrency is None:
        args.celery_concurrency = args.workers
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    celery_python = None if args.no_celery else ensure_celery_venv()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cordum-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    stack = BenchStack(
        work_dir=work,
        workers=args.workers,
        max_parallel=args.max_parallel,
        worker_uvloop=not args.no_worker_uvloop,
        aof=not args.no_aof,
        layout=args.layout,
        gateways=args.gateways,
        jetstream=args.jetstream,
    )
    table = CpuTable()
    wires = WireTable()
    rec: Recorder | None = None
    with terminate_as_interrupt():
        try:
            stack.start()
            describe(args, stack)
            assert stack.nats is not None
            rec = Recorder(table, wires, WireMeter(stack.redis_url, stack.nats.monitor_url))
            results = uvloop.run(cordum_phases(args, stack, rec))
            celery: dict[str, float] | None = None
            if celery_python is not None:
                out(
                    f"[5] Celery: {celery_version(celery_python)}, prefork x"
                    f"{args.celery_concurrency}, Redis broker + result backend on the same "
                    f"valkey-server, delay()+get() from {args.concurrency} client threads in "
                    f"{args.celery_clients} process(es), "
                    f"{args.duration:g} s"
                )
                celery = celery_phase(args, celery_python, stack, work, rec)
                out(
                    f"  {celery['jobs']} jobs in {celery['wall_s']:.2f} s = "
                    f"{celery['jobs_per_s']:,.0f} jobs/s; latency p50 {fmt_ms(celery['p50_ms'])}"
                    f" ms, p99 {fmt_ms(celery['p99_ms'])} ms; sequential p50 "
                    f"{fmt_ms(celery['seq_p50_ms'])} ms, p99 {fmt_ms(celery['seq_p99_ms'])} ms"
                )
                if celery["errors"]:
                    out(f"  FAILED: {celery['errors']} (first: {celery['first_error']})")
        finally:
            for process in EXTRA:
                process.stop(timeout=5)
            if rec is not None:
                rec.wire.close()
            stack.stop()
    if args.keep:
        out(f"logs in {work / 'logs'}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)

    out()
    table.print()
    out()
    wires.print()
    out()
    one, batch, seq, opn = results["one"], results["batch"], results["seq"], results["open"]
    celery_rate = celery["jobs_per_s"] if celery else float("nan")
    ratio = one.jobs_per_s / celery_rate if celery else float("nan")
    out(f"one job per call   {one.jobs_per_s:8,.0f} jobs/s   (target >= 1,200)")
    out(f"batch submit       {batch.jobs_per_s:8,.0f} jobs/s   (target >= 3,000)")
    out(f"Celery             {celery_rate:8,.0f} jobs/s   ratio {ratio:.2f}x (target >= 1.5x)")
    out(f"idle p50 / p99     {seq.pct(50):8.2f} / {seq.pct(99):.2f} ms   (target <= 3 / 5)")
    out(
        f"p99 at {args.rate:g}/s      {opn.pct(99):8.2f} ms (achieved {opn.jobs_per_s:,.0f}/s, "
        f"p50 {opn.pct(50):.2f} ms)   (target <= 10)"
    )
    out(
        f"jobs_per_s={one.jobs_per_s:.0f} batch_jobs_per_s={batch.jobs_per_s:.0f} "
        f"celery_jobs_per_s={celery_rate:.0f} ratio={ratio:.2f} p50_ms={seq.pct(50):.2f} "
        f"p99_ms={seq.pct(99):.2f} p99_at_500_ms={opn.pct(99):.2f}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
