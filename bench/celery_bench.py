"""The Celery side of the bench (runs in the bench's own Celery venv, not the project venv).

As a Celery app (`celery -A celery_bench worker ...`): one no-op task on queue `bench`, Redis
broker and Redis result backend on the URL in `BENCH_CELERY_URL`.

As a script: the client. `python celery_bench.py --concurrency 64 --duration 10` runs
`noop.delay()` + `.get()` from that many threads at once for that long (after a warm-up),
then `--sequential N` calls one at a time, and prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready

URL = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/1")

app = Celery("celery_bench", broker=URL, backend=URL)
app.conf.update(
    task_default_queue="bench",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@worker_ready.connect
def _mark_ready(**_: object) -> None:
    path = os.environ.get("BENCH_CELERY_READY")
    if path:
        Path(path).touch()


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    index = min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))
    return sorted_ms[index]


def _closed_loop(concurrency: int, duration: float, timeout: float) -> tuple[int, float, list]:
    """`concurrency` threads each doing delay()+get() until `duration` is over."""
    stop_at = time.monotonic() + duration
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop(n: int) -> None:
        mine: list[float] = []
        i = 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                noop.delay(n * 1_000_000 + i).get(timeout=timeout)
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            mine.append((time.perf_counter() - start) * 1000)
            i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), time.monotonic() - began, [sorted(latencies), errors]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--phase-file", default="", help="written 'ready' / 'measure' / 'done'")
    parser.add_argument("--go-file", default="", help="after warm-up, wait until this exists")
    parser.add_argument("--out", default="", help="write the JSON result here too")
    args = parser.parse_args()

    def mark(what: str) -> None:
        if args.phase_file:
            Path(args.phase_file).write_text(what)

    _closed_loop(args.concurrency, args.warmup, args.timeout)
    if args.go_file:
        # Several client processes start measuring together.
        mark("ready")
        while not Path(args.go_file).exists():
            time.sleep(0.002)
    mark("measure")
    done, wall, (lat, errors) = _closed_loop(args.concurrency, args.duration, args.timeout)
    mark("sequential")
    seq: list[float] = []
    for i in range(args.sequential):
        start = time.perf_counter()
        noop.delay(i).get(timeout=args.timeout)
        seq.append((time.perf_counter() - start) * 1000)
    seq.sort()
    mark("done")
    line = json.dumps(
        {
            "jobs": done,
            "wall_s": wall,
            "jobs_per_s": done / wall,
            "p50_ms": _percentile(lat, 50),
            "p99_ms": _percentile(lat, 99),
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "seq_p50_ms": _percentile(seq, 50),
            "seq_p99_ms": _percentile(seq, 99),
            "latencies_ms": [round(v, 3) for v in lat],
        }
    )
    if args.out:
        Path(args.out).write_text(line)
    print(line[:300], flush=True)


if __name__ == "__main__":
    main()
