"""Running `cordumctl` as a real subprocess (asyncio.create_subprocess_exec), so the
in-process app keeps serving on the test's event loop while the command talks to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Done:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def errors(self) -> list[str]:
        return self.stderr.splitlines()


@dataclass
class Running:
    """A cordumctl still running, its stdout read as it comes (for live output)."""

    proc: asyncio.subprocess.Process
    seen: bytearray = field(default_factory=bytearray)
    seen_err: bytearray = field(default_factory=bytearray)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        # Both pipes are drained as the command writes, so neither ever fills up.
        async def read(stream: asyncio.StreamReader | None, into: bytearray) -> None:
            assert stream is not None
            while chunk := await stream.read(4096):
                into.extend(chunk)

        self._readers = [
            asyncio.create_task(read(self.proc.stdout, self.seen)),
            asyncio.create_task(read(self.proc.stderr, self.seen_err)),
        ]

    async def so_far(self) -> str:
        """Its stdout so far, without escape sequences."""
        return plain(self.seen.decode(errors="replace"))

    async def finish(self) -> Done:
        async with asyncio.timeout(60):
            await asyncio.gather(*self._readers)
            await self.proc.wait()
        assert self.proc.returncode is not None
        return Done(self.proc.returncode, self.seen.decode(), self.seen_err.decode())


@dataclass(frozen=True)
class Cli:
    target: str

    async def start(self, *args: str, env: Mapping[str, str] | None = None) -> Running:
        environment = {
            **os.environ,
            "CORDUM_TARGET": self.target,
            # Wide enough that rich tables never fold an id.
            "COLUMNS": "250",
            # Lines reach the pipe as they are printed (for tests that read as it runs).
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        environment.pop("CORDUM_API_KEY", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cordum.sdk.cli.main",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        running = Running(proc)
        running.start_reading()
        return running

    async def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Done:
        return await (await self.start(*args, env=env)).finish()
