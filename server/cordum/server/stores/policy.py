"""Policy bundles, published versions, the audit log and recorded decisions, in Redis.

Keys (under the store's prefix):

  policy:bundle:<id>    STRING  draft bundle (cordum.v1.PolicyBundle bytes)
  policy:bundles        ZSET    draft ids, score 0, listed in id order; bounded (max_bundles)
  policy:version:<n>    STRING  published version n (cordum.v1.PolicyVersion bytes); written
                                once (SET NX), never changed; the oldest beyond
                                `max_versions` are deleted
  policy:versions       ZSET    n → n
  policy:current        STRING  the enforced version number (always the newest: a rollback
                                publishes a copy as a new version)
  policy:snapshots      HASH    kernel snapshot id → newest version with that snapshot
  policy:audit          ZSET    seq → cordum.v1.PolicyAuditEntry bytes, newest `max_audit`
  policy:audit:seq      STRING  the audit sequence
  policy:decisions      LIST    recorded kernel decisions, newest first, `max_decisions`

Every change is one Lua call: a bundle write compares-and-sets the bundle's stored bytes and
appends its audit entry; a publish compares-and-sets `policy:current`, writes the version
and appends its audit entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from cordum.agent.v1 import safety_pb2
from cordum.server.stores import scripts
from cordum.v1 import policy_pb2


@dataclass(frozen=True)
class StoreLimits:
    max_bundles: int = 500
    max_versions: int = 500
    max_audit: int = 1000
    max_decisions: int = 10_000


@dataclass(frozen=True)
class Draft:
    """A stored draft with the exact bytes it was read as (for compare-and-set)."""

    bundle: policy_pb2.PolicyBundle
    raw: bytes


@dataclass(frozen=True)
class Recorded:
    """One recorded kernel decision: the request and what was decided."""

    job_id: str
    checked_ms: int
    decision: int
    rule_id: str
    snapshot: str
    request: safety_pb2.PolicyCheckRequest


def encode_recorded(
    checked_ms: int,
    request_bytes: bytes,
    job_id: str,
    decision: int,
    rule_id: str,
    snapshot: str,
) -> bytes:
    """`<compact JSON header>\\n<PolicyCheckRequest bytes>` (the header has no newline)."""
    header = {"j": job_id, "t": checked_ms, "d": decision, "r": rule_id, "s": snapshot}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + request_bytes


def decode_recorded(raw: bytes) -> Recorded:
    head, _, body = raw.partition(b"\n")
    header = json.loads(head)
    return Recorded(
        job_id=str(header.get("j", "")),
        checked_ms=int(header.get("t", 0)),
        decision=int(header.get("d", 0)),
        rule_id=str(header.get("r", "")),
        snapshot=str(header.get("s", "")),
        request=safety_pb2.PolicyCheckRequest.FromString(body),
    )


class PolicyStore:
    def __init__(self, redis: Redis, *, prefix: str = "", limits: StoreLimits | None = None):
        self.redis = redis
        self.prefix = prefix
        self.limits = limits or StoreLimits()
        p = prefix
        self._bundles = f"{p}policy:bundles"
        self._versions = f"{p}policy:versions"
        self._current = f"{p}policy:current"
        self._snapshots = f"{p}policy:snapshots"
        self._audit = f"{p}policy:audit"
        self._audit_seq = f"{p}policy:audit:seq"
        self.decisions_key = f"{p}policy:decisions"
        self._bundle_write = scripts.load(redis, "policy_bundle_write.lua")
        self._publish = scripts.load(redis, "policy_publish.lua")

    def bundle_key(self, bundle_id: str) -> str:
        return f"{self.prefix}policy:bundle:{bundle_id}"

    def version_key(self, number: int) -> str:
        return f"{self.prefix}policy:version:{number}"

    # -- drafts ----------------------------------------------------------------------------

    async def get_draft(self, bundle_id: str) -> Draft | None:
        raw = await self.redis.get(self.bundle_key(bundle_id))
        return Draft(policy_pb2.PolicyBundle.FromString(raw), raw) if raw else None

    async def draft_ids(self, after: str = "", limit: int = 0) -> list[str]:
        start = b"(" + after.encode() if after else b"-"
        if limit > 0:
            ids = await self.redis.zrangebylex(self._bundles, start, b"+", start=0, num=limit)
        else:
            ids = await self.redis.zrangebylex(self._bundles, start, b"+")
        return [i.decode() for i in ids]

    async def drafts(self, ids: Sequence[str]) -> list[policy_pb2.PolicyBundle]:
        if not ids:
            return []
        raws = await self.redis.mget([self.bundle_key(i) for i in ids])
        return [policy_pb2.PolicyBundle.FromString(r) for r in raws if r]

    async def write_draft(
        self,
        bundle_id: str,
        read: bytes,
        new: policy_pb2.PolicyBundle | None,
        audit: policy_pb2.PolicyAuditEntry,
    ) -> int:
        """1 written, 0 the draft changed since `read`, -1 too many bundles."""
        lim = self.limits
        result = await self._bundle_write(
            keys=[self.bundle_key(bundle_id), self._bundles, self._audit, self._audit_seq],
            args=[
                bundle_id,
                read,
                new.SerializeToString(deterministic=True) if new is not None else b"",
                audit.SerializeToString(deterministic=True),
                lim.max_audit,
                lim.max_bundles,
            ],
        )
        return int(result)

    # -- versions --------------------------------------------------------------------------

    async def current_number(self) -> int:
        raw = await self.redis.get(self._current)
        return int(raw) if raw else 0

    async def get_version(self, number: int) -> policy_pb2.PolicyVersion | None:
        raw = await self.redis.get(self.version_key(number))
        return policy_pb2.PolicyVersion.FromString(raw) if raw else None

    async def current(self) -> policy_pb2.PolicyVersion | None:
        number = await self.current_number()
        return await self.get_version(number) if number else None

    async def version_for_snapshot(self, snapshot: str) -> int:
        """The newest version with this snapshot id (or with it as its `cfg:` part), or 0."""
        exact = await self.redis.hget(self._snapshots, snapshot)
        if exact:
            return int(exact)
        best = 0
        for key, value in (await self.redis.hgetall(self._snapshots)).items():
            if key.decode().rsplit("|", 1)[-1] == snapshot:
                best = max(best, int(value))
        return best

    async def publish(
        self,
        based_on: int,
        version: policy_pb2.PolicyVersion,
        audit: policy_pb2.PolicyAuditEntry,
    ) -> bool:
        """Make `version` current if the current version is still `based_on` (0 = none)."""
        ok = await self._publish(
            keys=[
                self._current,
                self.version_key(version.version),
                self._versions,
                self._snapshots,
                self._audit,
                self._audit_seq,
            ],
            args=[
                str(based_on) if based_on else "",
                version.version,
                version.SerializeToString(deterministic=True),
                version.snapshot,
                audit.SerializeToString(deterministic=True),
                self.limits.max_audit,
            ],
        )
        if ok:
            await self._trim_versions()
        return bool(ok)

    async def _trim_versions(self) -> None:
        excess = await self.redis.zcard(self._versions) - self.limits.max_versions
        if excess <= 0:
            return
        old = {int(n) for n in await self.redis.zrange(self._versions, 0, excess - 1)}
        stale = [k for k, v in (await self.redis.hgetall(self._snapshots)).items() if int(v) in old]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*[self.version_key(n) for n in old])
        pipe.zrem(self._versions, *[str(n) for n in old])
        if stale:
            pipe.hdel(self._snapshots, *stale)
        await pipe.execute()

    async def list_versions(
        self, before: int, limit: int
    ) -> tuple[list[policy_pb2.PolicyVersion], int]:
        """Newest first, numbers below `before` (0 = from the newest); (page, next before)."""
        top = f"({before}" if before else "+inf"
        numbers = await self.redis.zrevrangebyscore(
            self._versions, top, "-inf", start=0, num=limit + 1
        )
        more = len(numbers) > limit
        numbers = [int(n) for n in numbers[:limit]]
        if not numbers:
            return [], 0
        raws = await self.redis.mget([self.version_key(n) for n in numbers])
        versions = [policy_pb2.PolicyVersion.FromString(r) for r in raws if r]
        return versions, numbers[-1] if more else 0

    # -- audit -----------------------------------------------------------------------------

    async def list_audit(
        self, before: int, limit: int
    ) -> tuple[list[policy_pb2.PolicyAuditEntry], int]:
        """Newest first, sequence numbers below `before` (0 = newest); (page, next before)."""
        top = f"({before}" if before else "+inf"
        rows = await self.redis.zrevrangebyscore(
            self._audit, top, "-inf", start=0, num=limit + 1, withscores=True
        )
        more = len(rows) > limit
        rows = rows[:limit]
        entries = [policy_pb2.PolicyAuditEntry.FromString(raw) for raw, _ in rows]
        return entries, int(rows[-1][1]) if more and rows else 0

    # -- recorded decisions ----------------------------------------------------------------

    async def append_decisions(self, entries: Sequence[bytes]) -> None:
        """One round trip: push (oldest first, so the newest ends up at the head) and trim."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.decisions_key, *entries)
        pipe.ltrim(self.decisions_key, 0, self.limits.max_decisions - 1)
        await pipe.execute()

    async def recent_decisions(self, limit: int) -> list[Recorded]:
        raws = await self.redis.lrange(self.decisions_key, 0, limit - 1)
        return [decode_recorded(r) for r in raws]

    async def decision_count(self) -> int:
        return int(await self.redis.llen(self.decisions_key))
