"""Who is calling: the tenant and role every service call is scoped to."""

from __future__ import annotations

from dataclasses import dataclass

from cordum.server.errors import not_found
from cordum.v1 import error_reason_pb2


@dataclass(frozen=True)
class Caller:
    # None: no API keys are configured (loopback-only development), so nothing is scoped.
    tenant: str | None = None
    principal: str = ""
    role: str = "admin"

    def tenant_for(self, requested: str) -> str:
        """The tenant a new resource belongs to: the caller's own, else the requested one."""
        return self.tenant or requested or "default"

    def can_see(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


def hidden_job(job_id: str) -> Exception:
    # Another tenant's job is indistinguishable from a missing one.
    return not_found(error_reason_pb2.ERROR_REASON_JOB_NOT_FOUND, f"job {job_id} not found")
