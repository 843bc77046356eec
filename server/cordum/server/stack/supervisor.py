"""Runs a stack in the background for `cordumctl up --detach`.

Envoy exits when the thread that started it exits, so a detached stack needs a parent that
stays alive: this process. It starts the stack, writes the state file, and stops every
component (in reverse order) on SIGTERM or when one of them dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from cordum.server.stack.launcher import Stack, StackSettings

logger = logging.getLogger(__name__)


def supervise(stack: Stack, stop: threading.Event, *, poll_s: float = 0.5) -> str:
    """Block until `stop` is set or a component dies; returns why it stopped."""
    while not stop.wait(poll_s):
        dead = stack.first_dead()
        if dead is not None:
            return f"{dead.name} exited with code {dead.process.returncode}"
    return "stop requested"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    raw = _decode(json.loads(sys.argv[1]))
    # `cordumctl up --detach` passes the server's environment (API keys) out of argv.
    raw["server_env"] = json.loads(os.environ.pop("CORDUM_STACK_SERVER_ENV", "{}"))
    settings = StackSettings(**raw)
    stack = Stack(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack.start()
    except Exception as exc:
        logger.error("stack failed to start: %s", exc)
        return 1
    logger.info("stack ready")
    reason = supervise(stack, stop)
    logger.info("stopping stack: %s", reason)
    stack.stop()
    return 0


def _decode(raw: dict[str, object]) -> dict[str, object]:
    for key in ("data_dir", "config_dir", "worker_script"):
        if raw.get(key) is not None:
            raw[key] = Path(str(raw[key]))
    return raw


if __name__ == "__main__":
    sys.exit(main())
