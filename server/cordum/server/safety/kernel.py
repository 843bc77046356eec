"""The safety kernel: holds the enforced PolicySet, answers checks, hot-reloads the policy.

No gRPC here (the servicer and the in-process client both wrap this object). Checks are
synchronous and CPU-only; loading runs file reads and parsing (CEL compilation included)
in a worker thread so a large policy never stalls the event loop.

Decision cache (upstream §2.9, bounded): key = snapshot + sha256 of the deterministic
serialisation of the request with `job_id` cleared (kept when a CEL rule reads `job_id`,
since then the decision depends on it; upstream had no such case) and `input_content`
cleared (unseen by rules). Entries expire after `cache_ttl_s` and the least
recently used are evicted beyond `cache_size`. A hit gets the current job id as
`approval_ref` when approval is required. The cache is dropped whenever a new policy is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from cordum.agent.v1 import safety_pb2
from cordum.server.errors import CordumError, FieldViolation, unavailable
from cordum.server.safety.evaluate import Evaluation, evaluate
from cordum.server.safety.model import PolicySet, build_policy_set
from cordum.server.ttl_cache import TtlCache
from cordum.v1 import error_reason_pb2

logger = logging.getLogger(__name__)

ExtraSources = Callable[[], Awaitable[list[tuple[str, str]]]]
# Told about every decision `check` returns (e.g. the policy decision recorder). Runs on the
# hot path: it must not block, and its exceptions are logged, never raised.
CheckHook = Callable[[safety_pb2.PolicyCheckRequest, safety_pb2.PolicyCheckResponse], None]
DEFAULT_POLICY_PATH = "config/safety.yaml"
_FileSignature = tuple[int, int, int]


def cache_key(
    snapshot: str, request: safety_pb2.PolicyCheckRequest, *, keep_job_id: bool = False
) -> str:
    """`<snapshot>:<sha256 of the deterministic request bytes>`, without `job_id` (unless
    the policy reads it) and without `input_content`, which no rule can see (only its size,
    `input_size_bytes`, is a CEL variable) and which could be megabytes to hash per check."""
    drop_job_id = bool(request.job_id) and not keep_job_id
    if drop_job_id or request.input_content:
        clone = safety_pb2.PolicyCheckRequest()
        clone.CopyFrom(request)
        if drop_job_id:
            clone.job_id = ""
        clone.input_content = b""
        request = clone
    digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    return f"{snapshot}:{digest}"


class SafetyKernel:
    def __init__(
        self,
        policy_path: str | os.PathLike[str] | None = DEFAULT_POLICY_PATH,
        *,
        extra_sources: ExtraSources | None = None,
        on_check: CheckHook | None = None,
        on_decision: Callable[[int], None] | None = None,
        cache_ttl_s: float = 5.0,
        cache_size: int = 10_000,
        watch_interval_s: float = 30.0,
        full_check_every: int = 10,
        history_size: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`policy_path` None means no base file (extra sources only, or an empty policy).

        `cache_ttl_s` <= 0 disables the decision cache; `watch_interval_s` <= 0 disables the
        watcher `start()` would run. The watcher re-reads the file when its stat changes and,
        as a safety net for same-size edits within one mtime tick, every `full_check_every`
        polls.
        """
        self._path = Path(policy_path) if policy_path is not None else None
        self._extra_sources = extra_sources
        self.on_check = on_check
        # Told every check's DecisionType (the decision metrics); must not do I/O.
        self.on_decision = on_decision
        # Responses are stored without `approval_ref` (a hit gets the current job's).
        self._cache: TtlCache[str, safety_pb2.PolicyCheckResponse] | None = (
            TtlCache(cache_ttl_s, cache_size, clock) if cache_ttl_s > 0 else None
        )
        self._watch_interval_s = watch_interval_s
        self._full_check_every = max(1, full_check_every)
        self._history: deque[str] = deque(maxlen=history_size)
        self._policy_set: PolicySet | None = None
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._polls = 0
        # What the watcher last saw of the file (valid or not), to skip unchanged content.
        self._seen_signature: _FileSignature | None = None
        self._seen_digest: str | None = None
        # The extra sources the last load read, to skip unchanged polls.
        self._loaded_extras: list[tuple[str, str]] | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def policy_set(self) -> PolicySet | None:
        return self._policy_set

    @property
    def snapshot(self) -> str:
        return self._policy_set.snapshot if self._policy_set is not None else ""

    @property
    def cache(self) -> TtlCache[str, safety_pb2.PolicyCheckResponse] | None:
        return self._cache

    def snapshots(self) -> list[str]:
        """Installed snapshot ids, newest first (bounded, in-process, reset on restart)."""
        return list(self._history)

    @property
    def extra_sources(self) -> ExtraSources | None:
        return self._extra_sources

    @extra_sources.setter
    def extra_sources(self, sources: ExtraSources | None) -> None:
        """Replace the extra sources; they are read at the next `reload()`."""
        self._extra_sources = sources

    def _current(self) -> PolicySet:
        if self._policy_set is None:
            raise unavailable("safety policy not loaded")
        return self._policy_set

    # -- decisions -------------------------------------------------------------------------

    def check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        """The scheduler's check: evaluation through the decision cache, then `on_check`."""
        response = self._check(request)
        if self.on_decision is not None:
            self.on_decision(response.decision)
        hook = self.on_check
        if hook is not None:
            try:
                hook(request, response)
            except Exception:
                logger.exception("safety kernel on_check hook failed")
        return response

    def _check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        policy_set = self._current()
        if self._cache is None:
            return evaluate(policy_set, request).response
        keep_job_id = "job_id" in policy_set.policy.cel_needs
        key = cache_key(policy_set.snapshot, request, keep_job_id=keep_job_id)
        cached = self._cache.get(key)
        if cached is not None:
            response = safety_pb2.PolicyCheckResponse()
            response.CopyFrom(cached)
            if response.approval_required:
                response.approval_ref = request.job_id
            response.policy_snapshot = policy_set.snapshot
            return response
        response = evaluate(policy_set, request).response
        # Topic rejections carry no snapshot and are cheaper to recompute than to cache.
        if response.policy_snapshot:
            stored = safety_pb2.PolicyCheckResponse()
            stored.CopyFrom(response)
            stored.approval_ref = ""
            self._cache.put(key, stored)
        return response

    def evaluate(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        """Evaluation without the cache (the gateway's evaluate endpoint)."""
        return evaluate(self._current(), request).response

    def explain(self, request: safety_pb2.PolicyCheckRequest) -> Evaluation:
        """Evaluation with per-rule traces and override notes."""
        return evaluate(self._current(), request, explain=True)

    def simulate(
        self, request: safety_pb2.PolicyCheckRequest, policy_set: PolicySet | None = None
    ) -> safety_pb2.PolicyCheckResponse:
        """Evaluation against `policy_set` (a candidate) or the current policy; no cache."""
        return evaluate(policy_set or self._current(), request).response

    # -- loading ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the policy (raises CordumError naming the bad fields) and start the watcher."""
        async with self._reload_lock:
            self._install(await self._load())
        if self._watch_interval_s > 0 and self._watcher is None:
            self._stopping = False
            self._watcher = asyncio.create_task(
                self.run_watcher(self._watch_interval_s), name="safety-policy-watcher"
            )

    async def stop(self) -> None:
        self._stopping = True
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reload(self) -> bool:
        """Re-read every source; install the result only if its snapshot differs.

        A failing load is logged and the last good policy stays in force. Returns whether
        a new policy was installed.
        """
        async with self._reload_lock:
            try:
                policy_set = await self._load()
            except CordumError as error:
                logger.error(
                    "safety policy reload failed, keeping snapshot %s: %s", self.snapshot, error
                )
                return False
            except Exception:
                logger.exception("safety policy reload failed, keeping snapshot %s", self.snapshot)
                return False
            return self._install(policy_set)

    async def run_watcher(self, interval_s: float) -> None:
        """Poll for policy changes until `stop()` (hot reload); errors are logged, never fatal.

        The flag, not only the cancellation, ends the loop: redis-py can swallow a
        cancellation that lands inside a command (the extra sources read Redis), and the
        loop would then sleep on forever while `stop()` waits for it.
        """
        while not self._stopping:
            await asyncio.sleep(interval_s)
            try:
                await self.check_for_changes()
            except Exception:
                logger.exception("safety policy watcher poll failed")

    async def check_for_changes(self) -> bool:
        """One watcher poll: cheap stat, then content hash, then reload. Returns installed?"""
        self._polls += 1
        if self._extra_sources is not None:
            # Extra sources (bundles) are compared as read; unchanged ones leave the decision
            # to the file checks below, so nothing is re-parsed unless something changed.
            try:
                extras = list(await self._extra_sources())
            except Exception:
                return await self.reload()  # logs the failure, keeps the last good policy
            if extras != self._loaded_extras:
                return await self.reload()
        if self._path is None:
            return False
        signature = await asyncio.to_thread(_stat, self._path)
        if signature == self._seen_signature and self._polls % self._full_check_every:
            return False
        self._seen_signature = signature
        try:
            data = await asyncio.to_thread(self._path.read_bytes)
        except OSError:
            return await self.reload()  # logs the read error, keeps the last good policy
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._seen_digest:
            return False
        self._seen_digest = digest
        return await self.reload()

    async def _load(self) -> PolicySet:
        extras = list(await self._extra_sources()) if self._extra_sources is not None else []
        self._loaded_extras = extras
        return await asyncio.to_thread(self._build, extras)

    def _build(self, extras: list[tuple[str, str]]) -> PolicySet:
        base: tuple[str, str] | None = None
        if self._path is not None:
            signature = _stat(self._path)
            data = _read_policy_file(self._path)
            self._seen_signature = signature
            self._seen_digest = hashlib.sha256(data).hexdigest()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _file_error(self._path, f"not UTF-8: {error}") from None
            base = (f"file:{self._path}", text)
        return build_policy_set(base, extras)

    def _install(self, policy_set: PolicySet) -> bool:
        current = self._policy_set
        if current is not None and policy_set.snapshot == current.snapshot:
            return False
        self._policy_set = policy_set
        if policy_set.snapshot:
            self._history.appendleft(policy_set.snapshot)
        if self._cache is not None:
            self._cache.clear()
        logger.info(
            "safety policy installed",
            extra={
                "snapshot": policy_set.snapshot,
                "rules": len(policy_set.policy.rules),
                "sources": [s.name for s in policy_set.sources],
            },
        )
        return True


def _stat(path: Path) -> _FileSignature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_policy_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _file_error(path, f"cannot read: {error.strerror or error}") from None


def _file_error(path: Path, description: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.FAILED_PRECONDITION,
        error_reason_pb2.ERROR_REASON_POLICY_INVALID,
        f"safety policy file {path}: {description}",
        [FieldViolation("policy_path", description)],
        metadata={"source": f"file:{path}"},
    )
