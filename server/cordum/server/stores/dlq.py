"""Reading and managing the dead-letter entries the job scripts write (jobs_common.lua
`dlq_add`, in the same script call as the terminal transition).

Keys (under the store's prefix):

  dlq:<job_id>         HASH  job_id, topic, tenant, trace_id, attempts, last_state, status
                             (JobStatus name), reason_code, reason, created_ms; and, once
                             retried, retries (count) and retry_job_ids (newest ids,
                             space-separated)
  dlq:idx              ZSET  job_id -> created ms (every tenant), bounded by dlq_max
  dlq:idx:t:<tenant>   ZSET  job_id -> created ms (one tenant)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from cordum.server.stores import scripts


@dataclass(frozen=True)
class DLQRecord:
    job_id: str
    topic: str
    tenant: str
    trace_id: str
    attempts: int
    last_state: str
    status: str
    reason_code: str
    reason: str
    created_ms: int
    retries: int = 0
    retry_job_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DLQPage:
    entries: list[DLQRecord]
    # (created ms, job id) of the last entry listed when more may follow.
    next_after: tuple[int, str] | None


def _record(raw: dict[bytes, bytes]) -> DLQRecord | None:
    if not raw or b"job_id" not in raw:
        return None
    f = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    return DLQRecord(
        job_id=f["job_id"],
        topic=f.get("topic", ""),
        tenant=f.get("tenant", ""),
        trace_id=f.get("trace_id", ""),
        attempts=int(f.get("attempts") or 0),
        last_state=f.get("last_state", ""),
        status=f.get("status", ""),
        reason_code=f.get("reason_code", ""),
        reason=f.get("reason", ""),
        created_ms=int(f.get("created_ms") or 0),
        retries=int(f.get("retries") or 0),
        retry_job_ids=f.get("retry_job_ids", "").split(),
    )


class DLQStore:
    def __init__(self, redis: Redis, *, prefix: str = "", keep_retry_ids: int = 50) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keep_retry_ids = keep_retry_ids
        self._delete = scripts.load(redis, "dlq_delete.lua")
        self._link = scripts.load(redis, "dlq_link_retry.lua")

    def key(self, job_id: str) -> str:
        return f"{self.prefix}dlq:{job_id}"

    def _index(self, tenant: str | None) -> str:
        return f"{self.prefix}dlq:idx" + (f":t:{tenant}" if tenant is not None else "")

    async def get(self, job_id: str) -> DLQRecord | None:
        return _record(await self.redis.hgetall(self.key(job_id)))

    async def delete(self, job_id: str, tenant: str | None) -> bool:
        return bool(await self._delete(args=[self.prefix, job_id, tenant or ""]))

    async def link_retry(self, job_id: str, retry_job_id: str) -> int:
        """Record `retry_job_id` on the entry; the new retry count (0: the entry is gone)."""
        return int(await self._link(args=[self.prefix, job_id, retry_job_id, self.keep_retry_ids]))

    async def list(
        self,
        tenant: str | None,
        *,
        topic: str,
        reason_code: str,
        page_size: int,
        after: tuple[int, str] | None,
        scan_limit: int = 5000,
    ) -> DLQPage:
        """Newest first; `tenant` None lists every tenant's entries. Filters are applied to
        the entries as read, scanning at most `scan_limit` index members per page."""
        index = self._index(tenant)
        found: list[DLQRecord] = []
        high: float | str = after[0] if after else "+inf"
        offset, batch, scanned = 0, max(page_size * 2, 50), 0
        # The last position looked at, so a page cut short by the scan limit can go on.
        seen: tuple[int, str] | None = None
        exhausted = False
        while len(found) < page_size:
            if scanned >= scan_limit:
                break
            rows = await self.redis.zrevrangebyscore(
                index, high, "-inf", start=offset, num=batch, withscores=True
            )
            offset += len(rows)
            scanned += len(rows)
            listed = [
                (int(score), member.decode())
                for member, score in rows
                if after is None or (int(score), member.decode()) < after
            ]
            pipe = self.redis.pipeline(transaction=False)
            for _, job_id in listed:
                pipe.hgetall(self.key(job_id))
            for position, raw in zip(listed, await pipe.execute(), strict=True):
                seen = position
                record = _record(raw)
                if record is None:
                    continue  # deleted between the two reads
                if topic and record.topic != topic:
                    continue
                if reason_code and record.reason_code != reason_code:
                    continue
                found.append(record)
                if len(found) == page_size:
                    break
            if len(rows) < batch:
                exhausted = True
                break
        if len(found) == page_size:
            return DLQPage(found, (found[-1].created_ms, found[-1].job_id))
        return DLQPage(found, None if exhausted or seen is None else seen)
