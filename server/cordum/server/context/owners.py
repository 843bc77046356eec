"""Which tenant a memory belongs to, for callers bound to one tenant.

Memory keys carry no tenant (upstream's layout, written by workers), so ownership comes from
the jobs, as for the memory pointer reader (services/memory.py): a job's memory id is its
`memory_id`, else `mem:<job_id>`. A tenant-bound caller may use memory id M only when the job
`M` without its `mem:` prefix (or `M` itself) is the caller tenant's and its memory id is M.
Memory under an explicitly chosen id is usable only by callers for every tenant, until memory
ids carry their owner.
"""

from __future__ import annotations

from cordum.server.services.caller import Caller
from cordum.server.stores.jobs import JobStore


class JobMemoryOwners:
    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    async def __call__(self, memory_id: str, caller: Caller) -> bool:
        candidates = list(dict.fromkeys([memory_id.removeprefix("mem:"), memory_id]))
        for record in await self._jobs.get_many(candidates):
            if (
                record is not None
                and caller.can_see(record.tenant)
                and (record.job.memory_id or f"mem:{record.job.id}") == memory_id
            ):
                return True
        return False
