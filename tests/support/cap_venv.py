"""A venv holding the real ``cap-sdk-python`` 2.17.0 (it pins protobuf<7; ours is on 7), and
running a CAP worker process from it.

The venv is ``.venv-cap`` at the repository root (gitignored), built once under a file lock
and shared by every test that runs a real CAP worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import venv
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAP_VERSION = "2.17.0"
CAP_VENV = ROOT / ".venv-cap"


def _cap_installed(python: Path) -> bool:
    if not python.exists():
        return False
    probe = (
        "import importlib.metadata as m, cap.runtime, cap.client;"
        f"assert m.version('cap-sdk-python') == {CAP_VERSION!r}"
    )
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0


def ensure_cap_python() -> Path:
    """The Python of the CAP venv, built first if it is missing."""
    python = CAP_VENV / "bin" / "python"
    with open(ROOT / ".venv-cap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions build it once
        if not _cap_installed(python):
            venv.EnvBuilder(with_pip=True, clear=True).create(CAP_VENV)
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", f"cap-sdk-python=={CAP_VERSION}"],
                check=True,
                timeout=600,
            )
            assert _cap_installed(python), "cap-sdk-python did not install"
    return python


def cap_env(nats_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """The worker's environment: ours without CORDUM_*/PYTHON* variables, plus the servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORDUM_", "PYTHON"))}
    env.update(NATS_URL=nats_url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class CapProcess:
    process: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@asynccontextmanager
async def cap_process(
    python: Path, script: str, *, env: dict[str, str], workdir: Path
) -> AsyncIterator[CapProcess]:
    """Run `script` in the CAP venv (output to `workdir/worker.log`); stopped by its PID."""
    path = workdir / "worker.py"
    path.write_text(script)
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            python, path, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    try:
        yield CapProcess(process, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()
