"""Opening the NATS and Redis connections a process shares (once, at the composition root)."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client as NATS
from redis.asyncio import BlockingConnectionPool, Redis

logger = logging.getLogger(__name__)


class ConnectError(Exception):
    """A dependency could not be reached at start-up; str() is one clear line."""


def redact_url(url: str) -> str:
    """Hide credentials embedded in a URL (NATS/Redis URLs may carry them)."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, ""))
    return url


async def open_redis(url: str, *, timeout_s: float = 10.0, max_connections: int = 64) -> Redis:
    # A blocking pool waits for a free connection under bursts instead of failing the call
    # (redis-py's default pool raises MaxConnectionsError past its limit).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, health_check_interval=30
    )
    client = Redis.from_pool(pool)  # closes the pool with the client
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.ping()
            return client
        except Exception as exc:  # any connection error: retry until the deadline
            if time.monotonic() >= deadline:
                await client.aclose()
                raise ConnectError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
            await asyncio.sleep(0.1)


async def open_nats(url: str, *, name: str, timeout_s: float = 10.0, no_echo: bool = False) -> NATS:
    """`no_echo`: the server never delivers this connection's own messages back to it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await nats.connect(
                servers=[url],
                name=name,
                no_echo=no_echo,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                # Without these callbacks nats-py logs every disconnect as an error.
                error_cb=_log_nats_error,
                disconnected_cb=_log_disconnect,
                reconnected_cb=_log_reconnect,
            )
        except Exception as exc:
            if time.monotonic() >= deadline:
                raise ConnectError(f"cannot reach NATS at {redact_url(url)}: {exc}") from exc
            await asyncio.sleep(0.1)


async def _log_nats_error(exc: Exception) -> None:
    logger.warning("nats error: %s", exc)


async def _log_disconnect() -> None:
    logger.warning("nats disconnected")


async def _log_reconnect() -> None:
    logger.info("nats reconnected")
