"""Waiting by polling a condition with a deadline (never by a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    until: Callable[[T], bool] = bool,
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Call `probe` until `until(result)` holds; return that result or fail at the deadline."""
    deadline = time.monotonic() + within
    last: T | None = None
    while True:
        last = await probe()
        if until(last):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)
