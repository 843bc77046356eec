"""Lua scripts under lua/ (each optionally prefixed with a shared prelude), called by SHA.

redis-py's own Script checks `SCRIPT EXISTS` before every pipeline that uses one: an extra
round trip on every hot-path call (measured: 3 of 9 round trips per job). These scripts go
straight to EVALSHA; a server that lost its scripts (restart, SCRIPT FLUSH) answers
NOSCRIPT, and only then is the script loaded and the failed call repeated — a call that
failed with NOSCRIPT did not run, so repeating it is safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError


def _read(name: str) -> str:
    return resources.files("cordum.server.stores").joinpath("lua", name).read_text()


class LuaScript:
    """Call as `await script(keys=..., args=..., client=pipe_or_None)`, like redis-py's."""

    def __init__(self, redis: Redis, body: str) -> None:
        self.redis = redis
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()  # Redis names scripts by SHA-1

    async def load(self) -> None:
        await self.redis.script_load(self.body)

    async def __call__(
        self,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        client: Redis | Pipeline | None = None,
    ) -> Any:
        target = client if client is not None else self.redis
        if isinstance(target, Pipeline):
            # Queued; `execute(pipe)` below repairs NOSCRIPT failures.
            return target.evalsha(self.sha, len(keys), *keys, *args)
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load()
            return await target.evalsha(self.sha, len(keys), *keys, *args)


def load(redis: Redis, name: str, prelude: str = "") -> LuaScript:
    body = _read(name)
    if prelude:
        body = _read(prelude) + "\n" + body
    return LuaScript(redis, body)


async def execute(pipe: Pipeline, scripts: Sequence[LuaScript]) -> list[Any]:
    """Execute a pipeline of script calls; reload and repeat the calls that hit NOSCRIPT.
    Any other error is raised (the first one), as `pipe.execute()` would."""
    stack = list(pipe.command_stack)
    replies = await pipe.execute(raise_on_error=False)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in scripts:
            await script.load()
        retry = scripts[0].redis.pipeline(transaction=False)
        for i in missing:
            args, options = stack[i]
            retry.execute_command(*args, **options)
        for i, reply in zip(missing, await retry.execute(raise_on_error=False), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
