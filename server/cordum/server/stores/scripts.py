"""Loads the Lua scripts under lua/ (each prefixed with its shared prelude)."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _read(name: str) -> str:
    return resources.files("cordum.server.stores").joinpath("lua", name).read_text()


def load(redis: Redis, name: str, prelude: str = "") -> AsyncScript:
    body = _read(name)
    if prelude:
        body = _read(prelude) + "\n" + body
    return redis.register_script(body)
