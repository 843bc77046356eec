"""Who is calling: the tenant and role every service call is scoped to.

Tenancy rules every service follows (README "Security"):

- a resource belongs to one tenant; a caller bound to a tenant sees only that tenant's
  resources: another tenant's job, run, workflow, lock, artifact, DLQ entry or config
  document is NOT_FOUND (`can_see`), never PERMISSION_DENIED, so ids leak nothing;
- lists show the caller's tenant only (`tenant_for("")`);
- a request that names a tenant (`tenant_id`, `org_id`, `tenant`) must name the caller's
  own or leave it empty (`check_tenant`: PERMISSION_DENIED naming the field);
- a caller for every tenant (`tenant is None`: a `*` key, or no keys configured at all) sees
  everything, may name any tenant, and creates in `default` when it names none.
"""

from __future__ import annotations

from dataclasses import dataclass

from cordum.server.errors import not_found, permission_denied
from cordum.v1 import error_reason_pb2

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Caller:
    # None: every tenant (a `*` key, or no API keys configured), so nothing is scoped.
    tenant: str | None = None
    principal: str = ""
    role: str = "admin"

    @property
    def all_tenants(self) -> bool:
        return self.tenant is None

    def tenant_for(self, requested: str) -> str:
        """The tenant a new resource belongs to: the caller's own, else the requested one."""
        return self.tenant or requested or DEFAULT_TENANT

    def can_see(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant

    def check_tenant(self, requested: str, field_name: str = "tenant_id") -> None:
        """Refuse a request naming a tenant that is not the caller's."""
        if requested and self.tenant is not None and requested != self.tenant:
            raise permission_denied(
                f"{requested!r} is not your tenant (your API key belongs to {self.tenant!r})",
                field_name,
            )

    def require_all_tenants(self, what: str) -> None:
        """Refuse a change to something every tenant shares to a key bound to one tenant."""
        if self.tenant is not None:
            raise permission_denied(
                f"{what} is shared by every tenant: it needs an admin key for all tenants "
                f"(tenant `*`), not one bound to {self.tenant!r}"
            )


def hidden_job(job_id: str) -> Exception:
    # Another tenant's job is indistinguishable from a missing one.
    return not_found(error_reason_pb2.ERROR_REASON_JOB_NOT_FOUND, f"job {job_id} not found")
