"""The chaos suite's worker: the example echo worker (examples/echo_worker.py) that also
serves `job.chaos` with an echo handler which records every execution.

Each execution appends two JSON lines to ``CHAOS_RECORD``: ``{"ev": "start", ...}`` when the
handler starts and ``{"ev": "done", ...}`` when it returns (``"cancelled"`` when it was
cancelled instead), with the job id and the dispatch id. The suite counts the ``done``
lines per job (how many times the job really ran) and, for the worker-pause fault, looks for
a ``start`` without its end (a job in the middle of its run). A file, not Redis: it must
keep counting while valkey-server is down.

Environment: as the echo worker, plus ``CHAOS_RECORD`` (the file) and ``CHAOS_HEARTBEAT_S``
(heartbeat interval, default 1).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, TextIO

from cordum.sdk.worker import JobContext, Worker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "echo_worker.py"
TOPIC = "job.chaos"


def load_example() -> Any:
    # examples/ is not a package: load the example worker's module from its file.
    spec = importlib.util.spec_from_file_location("echo_worker", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, event: str, ctx: JobContext) -> None:
        line = {
            "ev": event,
            "job": ctx.job_id,
            "dispatch": ctx.request.dispatch.dispatch_id,
            "worker": ctx.worker_id,
            "t": time.time(),
        }
        # One write per line, flushed: a SIGKILL or SIGSTOP never leaves half a record.
        self._out.write(json.dumps(line) + "\n")
        self._out.flush()


def build(record: TextIO) -> Worker:
    worker: Worker = load_example().build_worker(
        heartbeat_interval=float(os.environ.get("CHAOS_HEARTBEAT_S", "1"))
    )
    recorder = Recorder(record)

    async def chaos(ctx: JobContext, data: Any) -> Any:
        recorder.write("start", ctx)
        sleep_ms = data.get("sleep_ms", 0) if isinstance(data, dict) else 0
        try:
            await asyncio.sleep(float(sleep_ms) / 1000)
        except asyncio.CancelledError:  # cancelled, past its deadline, or shutting down
            recorder.write("cancelled", ctx)
            raise
        recorder.write("done", ctx)
        # The example's echo output: it names the worker, so a result written by a second
        # execution elsewhere can be told apart from the first.
        return {"echo": data, "job_id": ctx.job_id, "worker_id": ctx.worker_id}

    worker.add_handler(TOPIC, chaos)
    return worker


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with open(os.environ["CHAOS_RECORD"], "a", encoding="utf-8") as record:
        asyncio.run(build(record).run())


if __name__ == "__main__":
    main()
