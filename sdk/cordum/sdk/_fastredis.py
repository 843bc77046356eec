"""A lean, pipelined Redis connection for hot paths (the worker runtime, the job store).

redis-py's asyncio client costs ~60-120 µs of CPU per round trip on the 2-core dev machine
(a pool guarded by an asyncio.Condition, a Python RESP encoder, retry wrappers, per-command
response callbacks); this connection costs ~15 µs: hiredis packs the commands and parses the
replies, and replies are matched to requests in order on one connection.

It only sends batches of commands and returns their replies, like
`pipeline.execute(raise_on_error=False)`: a Redis error comes back as a `ReplyError` in the
reply list. No pub/sub, transactions, RESP3 or cluster. A batch is never re-sent on its own:
when the connection drops, the batch in flight fails with `ConnectionError` (it may or may
not have run), and the next batch connects again.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["FastRedis", "ReplyError"]

ReplyError = hiredis.ReplyError


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # (future, number of replies expected, replies so far), in send order.
        self._pending: deque[tuple[asyncio.Future[list[Any]], int, list[Any]]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both can write().
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        pending, self._pending = self._pending, deque()
        for future, _, _ in pending:
            if not future.done():
                future.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                assert self.transport is not None
                self.transport.close()
                self.connection_lost(exc)
                return
            if reply is False:
                return
            if not pending:  # nothing asked for it: the stream is out of step
                assert self.transport is not None
                self.transport.close()
                return
            future, expected, replies = pending[0]
            replies.append(reply)
            if len(replies) == expected:
                pending.popleft()
                # A caller that gave up (timeout, cancel) still had its replies consumed.
                if not future.done():
                    future.set_result(replies)

    @property
    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()

    def send(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future[list[Any]]:
        assert self.transport is not None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not commands:
            future.set_result([])
            return future
        self._pending.append((future, len(commands), []))
        self.transport.write(b"".join([hiredis.pack_command(tuple(c)) for c in commands]))
        return future


class FastRedis:
    """One lazily opened connection; `execute()` sends a batch and returns its replies."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        path: str | None = None,
        ssl: ssl_module.SSLContext | bool | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self._path, self._ssl = path, ssl
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str) -> FastRedis:
        """`redis://[[user]:password@]host[:port][/db]`, `rediss://...` or `unix:///path`."""
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            return cls(path=parts.path, username=username, password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        db = parts.path.strip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(db) if db else 0,
            username=username,
            password=password,
            ssl=True if parts.scheme == "rediss" else None,
        )

    @classmethod
    def like(cls, kwargs: dict[str, Any], *, tls: bool = False) -> FastRedis:
        """The server a redis-py pool connects to (its `connection_kwargs`)."""
        return cls(
            host=kwargs.get("host", "127.0.0.1"),
            port=int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            path=kwargs.get("path"),
            ssl=True if tls else None,
        )

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands in one write; their replies, in order (errors as ReplyError)."""
        protocol = self._protocol
        if protocol is None or not protocol.usable:
            protocol = await self._connect()
        return await protocol.send(commands)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.usable:
                return self._protocol
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout):
                if self._path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, self._host, self._port, ssl=self._ssl
                    )
                hello: list[list[Any]] = []
                if self._password:
                    hello.append(
                        ["AUTH", self._username, self._password]
                        if self._username
                        else ["AUTH", self._password]
                    )
                if self._db:
                    hello.append(["SELECT", self._db])
                for reply in await protocol.send(hello):
                    if isinstance(reply, ReplyError):
                        assert protocol.transport is not None
                        protocol.transport.close()
                        raise ConnectionError(f"Redis refused the connection setup: {reply}")
            self._protocol = protocol
            return protocol

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
