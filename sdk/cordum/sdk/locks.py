"""``client.locks``: distributed locks with TTLs and fencing tokens.

A lock is exclusive (one owner, re-entrant) or shared (many owners). Each hold expires after
its TTL unless renewed; ``fencing_token`` grows with every new exclusive hold, so pass it
to the system the lock protects and have it refuse writes carrying an older token. A lock
held by someone else is :class:`~cordum.sdk.errors.FailedPrecondition` (``LOCK_HELD``)::

    async with client.locks.hold("reports/daily", ttl_ms=10_000) as held:
        await storage.write(report, fencing_token=held.fencing_token)

``hold`` acquires, renews in the background (every third of the TTL) while the block runs,
and releases at the end. When a renewal is refused (the hold expired: the process stalled
longer than the TTL, or someone released it) ``held.lost`` becomes true and ``held.check()``
raises why; the fencing token is what keeps a stale holder's writes out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Self, cast

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.errors import CordumError, FailedPrecondition, NotFound
from cordum.v1 import lock_pb2, lock_service_pb2, lock_service_pb2_grpc

__all__ = ["AsyncHeldLock", "AsyncLocksClient", "HeldLock", "LocksClient", "unique_owner"]

logger = logging.getLogger(__name__)

L = lock_service_pb2
Stub = lock_service_pb2_grpc.LockServiceStub

# The server's default TTL; `hold` needs it to pace renewals when none is given.
DEFAULT_TTL_MS = 30_000
# After a renewal that failed for a passing reason (server unreachable), try again this much
# sooner than the regular pace, so one hiccup does not cost the hold.
_RETRY_FRACTION = 6


def unique_owner() -> str:
    """An owner name no other holder uses: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _acquire_request(
    resource: str, owner: str, mode: str, ttl_ms: int | None, wait_ms: int | None
) -> L.AcquireLockRequest:
    return L.AcquireLockRequest(
        resource=resource, owner=owner, mode=mode, ttl_ms=ttl_ms or 0, wait_ms=wait_ms or 0
    )


def _list_request(prefix: str | None, page_size: int | None, token: str) -> L.ListLocksRequest:
    return L.ListLocksRequest(prefix=prefix or "", page_size=page_size or 0, page_token=token)


def _renew_interval(ttl_ms: int | None, renew_every: float | None) -> float:
    return renew_every if renew_every is not None else (ttl_ms or DEFAULT_TTL_MS) / 3000


def _lost(error: CordumError) -> bool:
    # The hold is gone for good (expired, released by someone): renewing again cannot help.
    return isinstance(error, NotFound | FailedPrecondition)


class _Held:
    """What both held-lock flavours share: how to acquire and renew, the lock as last seen
    and whether it was lost."""

    def __init__(
        self,
        resource: str,
        owner: str,
        *,
        mode: str,
        ttl_ms: int | None,
        wait_ms: int | None,
        renew_every: float | None,
    ) -> None:
        self.resource = resource
        self.owner = owner
        self.lock = lock_pb2.Lock()
        self.lost_error: CordumError | None = None
        self._mode, self._ttl_ms, self._wait_ms = mode, ttl_ms, wait_ms
        self._interval = _renew_interval(ttl_ms, renew_every)

    @property
    def fencing_token(self) -> int:
        """The token of this exclusive hold (0 for shared locks)."""
        return self.lock.fencing_token

    @property
    def lost(self) -> bool:
        return self.lost_error is not None

    def check(self) -> None:
        """Raise the error that ended the hold, if a renewal was refused."""
        if self.lost_error is not None:
            raise self.lost_error

    def _renew_failed(self, error: CordumError) -> bool:
        """Note a failed renewal; True when the hold is lost and renewing should stop."""
        if _lost(error):
            logger.warning("lock %s lost: %s", self.resource, error)
            self.lost_error = error
            return True
        logger.warning("renewing lock %s failed, retrying: %s", self.resource, error)
        return False


class AsyncHeldLock(_Held):
    """A lock held by :meth:`AsyncLocksClient.hold` (use it as ``async with``)."""

    def __init__(
        self,
        locks: AsyncLocksClient,
        resource: str,
        owner: str,
        *,
        mode: str,
        ttl_ms: int | None,
        wait_ms: int | None,
        renew_every: float | None,
    ) -> None:
        super().__init__(
            resource, owner, mode=mode, ttl_ms=ttl_ms, wait_ms=wait_ms, renew_every=renew_every
        )
        self._locks = locks
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self.lock = await self._locks.acquire(
            self.resource, self.owner, mode=self._mode, ttl_ms=self._ttl_ms, wait_ms=self._wait_ms
        )
        self._renewer = asyncio.create_task(self._renew(), name=f"lock-renew:{self.resource}")
        return self

    async def _renew(self) -> None:
        pause = self._interval
        while True:
            await asyncio.sleep(pause)
            try:
                self.lock = await self._locks.renew(self.resource, self.owner, ttl_ms=self._ttl_ms)
            except CordumError as error:
                if self._renew_failed(error):
                    return
                pause = self._interval / _RETRY_FRACTION
            else:
                pause = self._interval

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.lost:
            return  # nothing left to release
        try:
            await self._locks.release(self.resource, self.owner)
        except CordumError as error:
            if not _lost(error):
                raise
            # It expired between the last renewal and now: nothing to release.
            self.lost_error = error


class HeldLock(_Held):
    """A lock held by :meth:`LocksClient.hold` (use it as ``with``); renewed by a thread."""

    def __init__(
        self,
        locks: LocksClient,
        resource: str,
        owner: str,
        *,
        mode: str,
        ttl_ms: int | None,
        wait_ms: int | None,
        renew_every: float | None,
    ) -> None:
        super().__init__(
            resource, owner, mode=mode, ttl_ms=ttl_ms, wait_ms=wait_ms, renew_every=renew_every
        )
        self._locks = locks
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.lock = self._locks.acquire(
            self.resource, self.owner, mode=self._mode, ttl_ms=self._ttl_ms, wait_ms=self._wait_ms
        )
        self._renewer = threading.Thread(
            target=self._renew, name=f"lock-renew:{self.resource}", daemon=True
        )
        self._renewer.start()
        return self

    def _renew(self) -> None:
        pause = self._interval
        while not self._stop.wait(pause):
            try:
                self.lock = self._locks.renew(self.resource, self.owner, ttl_ms=self._ttl_ms)
            except CordumError as error:
                if self._renew_failed(error):
                    return
                pause = self._interval / _RETRY_FRACTION
            else:
                pause = self._interval

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost:
            return
        try:
            self._locks.release(self.resource, self.owner)
        except CordumError as error:
            if not _lost(error):
                raise
            self.lost_error = error


class AsyncLocksClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> lock_service_pb2_grpc.LockServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("lock_service_pb2_grpc.LockServiceAsyncStub", self._t.stub(Stub))

    async def acquire(
        self,
        resource: str,
        owner: str,
        *,
        mode: str = "exclusive",
        ttl_ms: int | None = None,
        wait_ms: int | None = None,
    ) -> lock_pb2.Lock:
        """Take a hold on ``resource`` for ``owner`` (``exclusive`` or ``shared``) for
        ``ttl_ms`` (server default 30 s). Held by someone else: ``FailedPrecondition``
        (``LOCK_HELD``) at once, or after waiting up to ``wait_ms`` for it."""
        request = _acquire_request(resource, owner, mode, ttl_ms, wait_ms)
        return await self._t.unary(self._stub.AcquireLock, request)

    async def renew(self, resource: str, owner: str, *, ttl_ms: int | None = None) -> lock_pb2.Lock:
        """Push the owner's expiry to now + ``ttl_ms``."""
        request = L.RenewLockRequest(resource=resource, owner=owner, ttl_ms=ttl_ms or 0)
        return await self._t.unary(self._stub.RenewLock, request)

    async def release(self, resource: str, owner: str) -> L.ReleaseLockResponse:
        """Drop one of the owner's holds; ``lock`` in the reply is absent once nobody holds
        it. Not the owner's: ``FailedPrecondition`` (``LOCK_NOT_HELD``)."""
        request = L.ReleaseLockRequest(resource=resource, owner=owner)
        return await self._t.unary(self._stub.ReleaseLock, request)

    async def get(self, resource: str) -> lock_pb2.Lock:
        """The lock as it is now; nobody holds it: ``NotFound`` (``LOCK_NOT_FOUND``)."""
        return await self._t.unary(self._stub.GetLock, L.GetLockRequest(resource=resource))

    async def list_page(
        self, *, prefix: str | None = None, page_size: int | None = None, page_token: str = ""
    ) -> L.ListLocksResponse:
        request = _list_request(prefix, page_size, page_token)
        return await self._t.unary(self._stub.ListLocks, request)

    def list(
        self,
        *,
        prefix: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[lock_pb2.Lock]:
        """Every held lock (whose resource starts with ``prefix``), in resource order."""

        async def fetch(token: str, size: int | None) -> L.ListLocksResponse:
            return await self.list_page(prefix=prefix, page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.locks, page_size=page_size, limit=limit)

    def hold(
        self,
        resource: str,
        *,
        owner: str | None = None,
        mode: str = "exclusive",
        ttl_ms: int | None = None,
        wait_ms: int | None = None,
        renew_every: float | None = None,
    ) -> AsyncHeldLock:
        """``async with`` it: acquire, renew every ``renew_every`` seconds (default a third
        of the TTL) while the block runs, release after. ``owner`` defaults to a name unique
        to this holder (:func:`unique_owner`)."""
        return AsyncHeldLock(
            self,
            resource,
            owner or unique_owner(),
            mode=mode,
            ttl_ms=ttl_ms,
            wait_ms=wait_ms,
            renew_every=renew_every,
        )


class LocksClient:
    """The blocking twin of :class:`AsyncLocksClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def acquire(
        self,
        resource: str,
        owner: str,
        *,
        mode: str = "exclusive",
        ttl_ms: int | None = None,
        wait_ms: int | None = None,
    ) -> lock_pb2.Lock:
        request = _acquire_request(resource, owner, mode, ttl_ms, wait_ms)
        return self._t.unary(self._stub.AcquireLock, request)

    def renew(self, resource: str, owner: str, *, ttl_ms: int | None = None) -> lock_pb2.Lock:
        request = L.RenewLockRequest(resource=resource, owner=owner, ttl_ms=ttl_ms or 0)
        return self._t.unary(self._stub.RenewLock, request)

    def release(self, resource: str, owner: str) -> L.ReleaseLockResponse:
        request = L.ReleaseLockRequest(resource=resource, owner=owner)
        return self._t.unary(self._stub.ReleaseLock, request)

    def get(self, resource: str) -> lock_pb2.Lock:
        return self._t.unary(self._stub.GetLock, L.GetLockRequest(resource=resource))

    def list_page(
        self, *, prefix: str | None = None, page_size: int | None = None, page_token: str = ""
    ) -> L.ListLocksResponse:
        return self._t.unary(self._stub.ListLocks, _list_request(prefix, page_size, page_token))

    def list(
        self,
        *,
        prefix: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[lock_pb2.Lock]:
        def fetch(token: str, size: int | None) -> L.ListLocksResponse:
            return self.list_page(prefix=prefix, page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.locks, page_size=page_size, limit=limit)

    def hold(
        self,
        resource: str,
        *,
        owner: str | None = None,
        mode: str = "exclusive",
        ttl_ms: int | None = None,
        wait_ms: int | None = None,
        renew_every: float | None = None,
    ) -> HeldLock:
        """``with`` it: as :meth:`AsyncLocksClient.hold`, renewing from a thread."""
        return HeldLock(
            self,
            resource,
            owner or unique_owner(),
            mode=mode,
            ttl_ms=ttl_ms,
            wait_ms=wait_ms,
            renew_every=renew_every,
        )
