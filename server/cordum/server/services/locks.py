"""Distributed locks: exclusive (one owner, re-entrant) or shared (many owners), with TTLs
and fencing tokens.

Semantics:
- A lock is named by its resource within the caller's tenant: another tenant's lock of the
  same name is a different lock, and invisible (NOT_FOUND).
- Exclusive: one owner, re-entrant (each acquire adds a hold; each release removes one).
  Shared: any number of owners (at most `max_owners`). A sole shared owner may upgrade to
  exclusive; an exclusive owner asking for `shared` re-enters its exclusive hold.
- Every owner's hold expires on its own (`ttl_ms`, default 30 s); renew sets the caller's
  expiry to now + ttl_ms. A lock is gone when its last owner released or expired.
- Fencing token: each new exclusive hold (first acquire, or a shared→exclusive upgrade) takes
  the next value of one namespace-wide counter, so a resource's token strictly increases and
  never goes back, also after release or expiry. Re-entering keeps the token (the outer
  hold's token must stay valid). Shared locks carry token 0.
- Errors: held by someone else → FAILED_PRECONDITION LOCK_HELD (acquire); the caller holds
  no hold → FAILED_PRECONDITION LOCK_NOT_HELD (release and renew alike); nobody holds the
  lock → NOT_FOUND LOCK_NOT_FOUND (get, release, renew).
- `wait_ms` on acquire polls with exponential backoff (10 ms doubling to 250 ms, jittered)
  until the lock is granted or the wait is over; then LOCK_HELD as without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import random
import time

from cordum.server.errors import CordumError, Violations, failed_precondition, not_found
from cordum.server.services.caller import Caller
from cordum.server.stores.locks import LockOutcome, LockPage, LockState, LockStore
from cordum.v1 import error_reason_pb2

R = error_reason_pb2

DEFAULT_TTL_MS = 30_000
MAX_TTL_MS = 24 * 3600 * 1000
MAX_WAIT_MS = 300_000
MAX_NAME = 256
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MODES = ("exclusive", "shared")


def _check_name(problems: Violations, field: str, value: str) -> str:
    value = value.strip()
    if not value:
        problems.add(field, "required")
    elif len(value) > MAX_NAME:
        problems.add(field, f"at most {MAX_NAME} characters")
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        problems.add(field, "must not contain control characters")
    return value


def _check_ttl(problems: Violations, ttl_ms: int) -> int:
    if ttl_ms < 0 or ttl_ms > MAX_TTL_MS:
        problems.add("ttl_ms", f"must be between 0 (default {DEFAULT_TTL_MS}) and {MAX_TTL_MS}")
    return ttl_ms or DEFAULT_TTL_MS


def _missing(resource: str) -> CordumError:
    return not_found(R.ERROR_REASON_LOCK_NOT_FOUND, f"lock {resource!r} not found")


def _not_held(resource: str, owner: str) -> CordumError:
    return failed_precondition(
        R.ERROR_REASON_LOCK_NOT_HELD, f"lock {resource!r} is not held by {owner!r}"
    )


def _held(resource: str, lock: LockState | None, full: bool) -> CordumError:
    error = failed_precondition(
        R.ERROR_REASON_LOCK_HELD,
        f"lock {resource!r} has its maximum number of shared owners"
        if full
        else f"lock {resource!r} is held by someone else",
    )
    if lock is not None:
        error.metadata.update(
            {"resource": resource, "mode": lock.mode, "expires_ms": str(lock.expires_ms)}
        )
    return error


def _query_hash(prefix: str) -> str:
    return hashlib.sha256(prefix.encode()).hexdigest()[:12]


class LockService:
    def __init__(self, store: LockStore) -> None:
        self._store = store

    async def acquire(
        self,
        resource: str,
        owner: str,
        mode: str,
        ttl_ms: int,
        wait_ms: int,
        caller: Caller,
    ) -> LockState:
        problems = Violations()
        resource = _check_name(problems, "resource", resource)
        owner = _check_name(problems, "owner", owner)
        mode = mode.strip().lower() or "exclusive"
        if mode not in MODES:
            problems.add("mode", "must be exclusive or shared")
        ttl_ms = _check_ttl(problems, ttl_ms)
        if wait_ms < 0 or wait_ms > MAX_WAIT_MS:
            problems.add("wait_ms", f"must be between 0 and {MAX_WAIT_MS}")
        problems.raise_if_any()
        tenant = caller.tenant_for("")
        deadline = time.monotonic() + wait_ms / 1000
        pause = 0.01
        while True:
            outcome = await self._store.acquire(tenant, resource, owner, mode, ttl_ms)
            if outcome.status == "ok":
                assert outcome.lock is not None
                return outcome.lock
            left = deadline - time.monotonic()
            if left <= 0:
                raise _held(resource, outcome.lock, outcome.status == "full")
            await asyncio.sleep(min(left, pause * random.uniform(0.5, 1.0)))
            pause = min(pause * 2, 0.25)

    async def release(self, resource: str, owner: str, caller: Caller) -> LockState | None:
        """The lock after the release; None when nobody holds it any more."""
        problems = Violations()
        resource = _check_name(problems, "resource", resource)
        owner = _check_name(problems, "owner", owner)
        problems.raise_if_any()
        outcome = await self._store.release(caller.tenant_for(""), resource, owner)
        return self._changed(resource, owner, outcome)

    async def renew(self, resource: str, owner: str, ttl_ms: int, caller: Caller) -> LockState:
        problems = Violations()
        resource = _check_name(problems, "resource", resource)
        owner = _check_name(problems, "owner", owner)
        ttl_ms = _check_ttl(problems, ttl_ms)
        problems.raise_if_any()
        outcome = await self._store.renew(caller.tenant_for(""), resource, owner, ttl_ms)
        lock = self._changed(resource, owner, outcome)
        assert lock is not None
        return lock

    @staticmethod
    def _changed(resource: str, owner: str, outcome: LockOutcome) -> LockState | None:
        if outcome.status == "missing":
            raise _missing(resource)
        if outcome.status == "not_held":
            raise _not_held(resource, owner)
        return outcome.lock

    async def get(self, resource: str, caller: Caller) -> LockState:
        problems = Violations()
        resource = _check_name(problems, "resource", resource)
        problems.raise_if_any()
        lock = await self._store.get(caller.tenant_for(""), resource)
        if lock is None:
            raise _missing(resource)
        return lock

    async def list(self, prefix: str, page_size: int, page_token: str, caller: Caller) -> LockPage:
        problems = Violations()
        if page_size < 0:
            problems.add("page_size", "must not be negative")
        if len(prefix) > MAX_NAME:
            problems.add("prefix", f"at most {MAX_NAME} characters")
        after = ""
        if page_token:
            try:
                raw = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after, query = str(raw["a"]), str(raw["q"])
            except (binascii.Error, ValueError, KeyError, TypeError):
                problems.add("page_token", "not a token from a previous ListLocks")
            else:
                if query != _query_hash(prefix) or not after.startswith(prefix):
                    problems.add("page_token", "the token belongs to a different prefix")
        problems.raise_if_any()
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        page = await self._store.list(caller.tenant_for(""), prefix, after, size)
        token = ""
        if page.next_after:
            raw_token = json.dumps({"a": page.next_after, "q": _query_hash(prefix)})
            token = base64.urlsafe_b64encode(raw_token.encode()).decode()
        return LockPage(page.locks, token)
