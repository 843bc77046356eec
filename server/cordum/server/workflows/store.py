"""Workflow definitions and runs in Redis.

Every run update is ONE compare-and-set Lua call: the run's version is checked, then the new
Run bytes, status indexes, timeline events and the run's timer are written together, so a
concurrent writer (another engine, the gateway approving or cancelling) can never interleave;
the loser reloads and recomputes. Keys (under the store's prefix):

  wf:def:<id>                 HASH  data (Workflow bytes), rev, tenant, updated_ms
  wf:defs:t:<tenant>          ZSET  workflow id -> updated ms (listing)
  wf:run:<id>                 HASH  data (Run bytes), ver (CAS), seq (timeline length), status,
                                    tenant, wf, def (the Workflow the run started with), defkey
                                    (<workflow>@<revision>#<hash>), idem, created_ms, updated_ms;
                                    TTL = run TTL once terminal, none while active
  wf:run:<id>:tl              LIST  RunEvent bytes, the newest `timeline_limit`; same TTL
  wf:runs:t:<tenant>          ZSET  run id -> updated ms         (listing)
  wf:runs:t:<tenant>:s:<S>    ZSET  same, per RunStatus name     (listing by status)
  wf:runs:t:<tenant>:w:<wf>   ZSET  same, per workflow           (listing by workflow)
  wf:runs:active              ZSET  non-terminal run ids -> updated ms (the reconciler)
  wf:timers                   ZSET  run id -> when it next needs a pass (delays, retry
                                    backoff, step and run timeouts, "advance now")
  wf:idem:<tenant>:<wf>:<key> STRING "<run id>|<request hash>"; TTL (idempotent starts)
  wf:tenants                  SET   tenants with runs (index trimming)
Listing indexes are trimmed by the reconciler to the run TTL, so nothing grows unbounded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from cordum.server.stores.page_tokens import decode_token, encode_token
from cordum.server.workflows.definition import definition_key
from cordum.v1 import run_pb2, workflow_pb2

TERMINAL_RUN = frozenset(
    {
        run_pb2.RUN_STATUS_SUCCEEDED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CANCELLED,
        run_pb2.RUN_STATUS_TIMED_OUT,
    }
)


def _script(redis: Redis, name: str) -> AsyncScript:
    lua = resources.files("cordum.server.workflows").joinpath("lua")
    body = lua.joinpath("wf_common.lua").read_text() + "\n" + lua.joinpath(name).read_text()
    return redis.register_script(body)


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def status_name(status: int) -> str:
    return run_pb2.RunStatus.Name(status)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StoreLimits:
    run_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    timeline_limit: int = 2000


@dataclass
class StoredRun:
    run: run_pb2.Run
    ver: str
    seq: int
    def_key: str


@dataclass(frozen=True)
class CreateOutcome:
    status: str  # ok | replay | exists
    run_id: str
    request_hash: str = ""


@dataclass(frozen=True)
class Page:
    ids: list[str]
    next_token: str


class WorkflowStore:
    def __init__(self, redis: Redis, *, prefix: str = "", limits: StoreLimits | None = None):
        self.redis = redis
        self.prefix = prefix
        self.limits = limits or StoreLimits()
        self._create = _script(redis, "wf_run_create.lua")
        self._save = _script(redis, "wf_run_save.lua")
        self._timer = _script(redis, "wf_run_timer.lua")
        self._claim = _script(redis, "wf_timers_claim.lua")
        self._delete_run = _script(redis, "wf_run_delete.lua")
        self._timeline = _script(redis, "wf_timeline.lua")
        self._def_save = _script(redis, "wf_def_save.lua")
        self._def_delete = _script(redis, "wf_def_delete.lua")
        # Told the new status name after each write that started a run or changed its status
        # (the run metrics); must not do I/O.
        self.on_status: Callable[[str], None] | None = None

    # -- keys -------------------------------------------------------------------------

    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}wf:run:{run_id}"

    def def_key(self, workflow_id: str) -> str:
        return f"{self.prefix}wf:def:{workflow_id}"

    def idempotency_key(self, tenant: str, workflow_id: str, key: str) -> str:
        return f"{self.prefix}wf:idem:{tenant}:{workflow_id}:{key}"

    # -- definitions ------------------------------------------------------------------

    async def get_workflow(self, workflow_id: str) -> tuple[workflow_pb2.Workflow, str] | None:
        """The definition and its tenant."""
        data, tenant = await self.redis.hmget(self.def_key(workflow_id), ["data", "tenant"])
        if data is None:
            return None
        return workflow_pb2.Workflow.FromString(data), _s(tenant)

    async def get_workflows(
        self, workflow_ids: Sequence[str]
    ) -> list[tuple[workflow_pb2.Workflow, str] | None]:
        pipe = self.redis.pipeline(transaction=False)
        for workflow_id in workflow_ids:
            pipe.hmget(self.def_key(workflow_id), ["data", "tenant"])
        return [
            (workflow_pb2.Workflow.FromString(data), _s(tenant)) if data is not None else None
            for data, tenant in await pipe.execute()
        ]

    async def save_workflow(
        self, wf: workflow_pb2.Workflow, tenant: str, expected_rev: int, now_ms: int
    ) -> bool:
        """Write `wf` (its `revision` already bumped) if the stored revision is still
        `expected_rev` (0 = it must not exist yet)."""
        reply = await self._def_save(
            args=[self.prefix, wf.id, expected_rev, wf.SerializeToString(), tenant, now_ms]
        )
        return _s(reply[0]) == "ok"

    async def delete_workflow(self, workflow_id: str) -> bool:
        return bool(await self._def_delete(args=[self.prefix, workflow_id]))

    async def list_workflows(self, tenant: str, page_size: int, page_token: str) -> Page:
        return await self._page(
            f"{self.prefix}wf:defs:t:{tenant}", page_size, page_token, f"wf|{tenant}"
        )

    # -- runs -------------------------------------------------------------------------

    async def create_run(
        self,
        run: run_pb2.Run,
        definition: workflow_pb2.Workflow,
        events: Sequence[run_pb2.RunEvent],
        *,
        now_ms: int,
        wake_ms: int,
        idempotency: tuple[str, str] | None = None,
    ) -> CreateOutcome:
        """Store a new run. `idempotency` = (key name, request hash): when the key already
        holds a run, nothing is written and that run's id comes back as a replay."""
        idem_key, request_hash = idempotency or ("", "")
        reply = await self._create(
            args=[
                self.prefix,
                run.id,
                run.SerializeToString(),
                status_name(run.status),
                run.tenant_id,
                run.workflow_id,
                now_ms,
                definition.SerializeToString(),
                definition_key(definition),
                idem_key,
                f"{run.id}|{request_hash}",
                self.limits.idempotency_ttl_s,
                wake_ms,
                self.limits.timeline_limit,
                len(events),
                *[e.SerializeToString() for e in events],
            ]
        )
        kind = _s(reply[0])
        if kind == "replay":
            run_id, _, stored_hash = _s(reply[1]).partition("|")
            return CreateOutcome("replay", run_id, stored_hash)
        if kind == "ok" and self.on_status is not None:
            self.on_status(status_name(run.status))
        return CreateOutcome(kind, run.id)

    async def load_run(self, run_id: str) -> StoredRun | None:
        raw = await self.redis.hmget(self.run_key(run_id), ["data", "ver", "seq", "defkey"])
        return stored_from_reply(raw)

    async def load_runs(self, run_ids: Sequence[str]) -> list[StoredRun | None]:
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.run_key(run_id), ["data", "ver", "seq", "defkey"])
        return [stored_from_reply(raw) for raw in await pipe.execute()]

    async def load_definition(self, run_id: str) -> workflow_pb2.Workflow | None:
        data = await self.redis.hget(self.run_key(run_id), "def")
        return workflow_pb2.Workflow.FromString(data) if data is not None else None

    async def save_run(
        self,
        stored: StoredRun,
        run: run_pb2.Run,
        events: Sequence[run_pb2.RunEvent],
        *,
        now_ms: int,
        wake_ms: int,
    ) -> str | None:
        """CAS write; the new version, or None when someone else wrote first (or the run is
        gone)."""
        reply = await self._save(
            args=[
                self.prefix,
                run.id,
                stored.ver,
                run.SerializeToString(),
                status_name(run.status),
                now_ms,
                1 if run.status in TERMINAL_RUN else 0,
                self.limits.run_ttl_s,
                wake_ms,
                self.limits.timeline_limit,
                len(events),
                *[e.SerializeToString() for e in events],
            ]
        )
        if _s(reply[0]) != "ok":
            return None
        # Compared with what Redis held: callers often change `stored.run` in place.
        status = status_name(run.status)
        if self.on_status is not None and _s(reply[2]) != status:
            self.on_status(status)
        return str(reply[1])

    async def set_timer(self, run_id: str, ver: str, wake_ms: int) -> bool:
        return bool(await self._timer(args=[self.prefix, run_id, ver, wake_ms]))

    async def wake(self, run_id: str, at_ms: int) -> None:
        """Ask for a pass at `at_ms` (only ever earlier than what is already set)."""
        await self.redis.zadd(f"{self.prefix}wf:timers", {run_id: at_ms}, lt=True)

    async def claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[str]:
        ids = await self._claim(args=[self.prefix, now_ms, limit, lease_ms])
        return [_s(i) for i in ids]

    async def delete_run(self, run_id: str) -> bool:
        reply = await self._delete_run(args=[self.prefix, run_id])
        return _s(reply[0]) == "ok"

    async def timeline(
        self, run_id: str, from_seq: int, count: int
    ) -> tuple[list[run_pb2.RunEvent], int] | None:
        """Events with seq >= from_seq (at most `count`), and the run's last seq; None when
        the run does not exist."""
        reply = await self._timeline(args=[self.prefix, run_id, max(from_seq, 1), count])
        if not reply:
            return None
        return [run_pb2.RunEvent.FromString(e) for e in reply[1:]], int(reply[0])

    async def active_runs(self, limit: int, offset: int = 0) -> list[str]:
        ids = await self.redis.zrange(f"{self.prefix}wf:runs:active", offset, offset + limit - 1)
        return [_s(i) for i in ids]

    async def list_runs(
        self,
        *,
        tenant: str,
        status: str,
        workflow_id: str,
        after_ms: int,
        before_ms: int,
        page_size: int,
        page_token: str,
    ) -> Page:
        base = f"{self.prefix}wf:runs:t:{tenant}"
        if status:
            key = f"{base}:s:{status}"
        elif workflow_id:
            key = f"{base}:w:{workflow_id}"
        else:
            key = base
        query = f"runs|{tenant}|{status}|{workflow_id}|{after_ms}|{before_ms}"
        return await self._page(key, page_size, page_token, query, after_ms, before_ms)

    async def trim_indexes(self, older_than_ms: int) -> int:
        """Drop index entries of runs that expired (older than the run TTL)."""
        tenants = [_s(t) for t in await self.redis.smembers(f"{self.prefix}wf:tenants")]
        removed = 0
        for tenant in tenants:
            base = f"{self.prefix}wf:runs:t:{tenant}"
            keys = [base]
            async for key in self.redis.scan_iter(match=f"{base}:*", count=500):
                keys.append(_s(key))
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.zremrangebyscore(key, "-inf", older_than_ms)
            removed += sum(int(n) for n in await pipe.execute())
        return removed

    async def _page(
        self,
        key: str,
        page_size: int,
        page_token: str,
        query: str,
        after_ms: int = 0,
        before_ms: int = 0,
    ) -> Page:
        """Ids newest-updated first; ties by id descending, so pages never skip or repeat
        (upstream's second-resolution cursors skipped runs sharing a timestamp)."""
        cursor = decode_token(page_token, query)
        high: float | str = before_ms if before_ms else "+inf"
        if cursor is not None:
            high = cursor[0] if high == "+inf" else min(float(high), cursor[0])
        low: float | str = after_ms if after_ms else "-inf"
        rows = await self.redis.zrevrangebyscore(
            key, high, low, start=0, num=page_size + 1 + _SLACK, withscores=True
        )
        picked: list[tuple[str, float]] = []
        for member, score in rows:
            mid = _s(member)
            if cursor is not None and (score, mid) >= cursor:
                continue
            picked.append((mid, score))
        picked.sort(key=lambda r: (r[1], r[0]), reverse=True)
        page = picked[:page_size]
        token = ""
        if len(picked) > page_size and page:
            token = encode_token((page[-1][1], page[-1][0]), query)
        return Page([mid for mid, _ in page], token)


# Entries sharing the cursor's score are re-read and filtered; this much slack covers them.
_SLACK = 64


def stored_from_reply(raw: Sequence[bytes | None]) -> StoredRun | None:
    data, ver, seq, defkey = raw
    if data is None:
        return None
    return StoredRun(run_pb2.Run.FromString(data), _s(ver), int(seq or 0), _s(defkey))


def request_hash(value: object) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
