"""Runs `examples/echo_worker.py`'s worker (same handlers, same SDK runtime) for the bench,
with two knobs the example does not expose: `BENCH_MAX_PARALLEL` (jobs in flight per worker
process; the example uses the SDK default of 1) and `BENCH_UVLOOP` (the example runs on the
default asyncio loop).
"""

import asyncio
import functools
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import echo_worker

from cordum.sdk.worker import Worker


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    max_parallel = int(os.environ.get("BENCH_MAX_PARALLEL", "1"))
    # build_worker() constructs the Worker; give it our max_parallel, keep everything else.
    echo_worker.Worker = functools.partial(Worker, max_parallel=max_parallel)  # type: ignore[misc]
    worker = echo_worker.build_worker()
    if os.environ.get("BENCH_UVLOOP", "1") == "1":
        import uvloop

        uvloop.run(worker.run())
    else:
        asyncio.run(worker.run())


if __name__ == "__main__":
    main()
