"""Scoped configuration: system → org → team → workflow → step, and the merge of them a job
or step runs with (its *effective* config).

Merge rules (`deep_merge`, applied in scope order, each later scope over the merge so far):

- objects merge key by key, recursively: a team that sets `retry.max_retries` keeps the
  org's `retry.backoff_ms`;
- everything else replaces: arrays are NOT concatenated (a team's
  `safety.denied_topics: [a]` replaces the org's list; write the whole list), and scalars
  replace, including `null`, which is stored like any value (it does not delete the key);
- a key absent from a later scope leaves the earlier value alone.
Upstream merged shallowly (a scope replaced whole top-level sections), so setting one nested
key silently dropped its siblings.

Lookups: `system` is always id `default`; the org is the job's tenant (empty → the caller's
tenant, else `default`); a step's document is `<workflow_id>/<step_id>` when the step
belongs to a workflow, else `<step_id>` (upstream keyed steps by step id alone, so every
workflow's `build` step shared one document). Missing documents are skipped and count as
revision 0 in `version` (`system:N|org:N|team:N|workflow:N|step:N`); `hash` is the SHA-256
of the canonical JSON of the merged data (keys sorted, compact, UTF-8).

Defaults (`config/system.yaml` at the top level, `pools.yaml` under `pools`,
`timeouts.yaml` under `timeouts`) go into the system document:

- on start, when the system document is absent;
- on start, when the files' hash differs from the one the document was loaded from AND the
  document has not been written through the API since (its origin is still `files`);
- when the files changed but the document was edited through the API, start keeps the
  stored document and logs a warning; `ReloadConfig` then applies the files deliberately:
  it always replaces the system document's data with the files' content (API edits of the
  system scope are overwritten; put per-org settings in org documents instead).
Upstream copied the files once and then ignored every later edit of them forever.

Tenancy: `system` is shared (read by every key, written by an admin key for all tenants);
`org/<tenant>` is that tenant's (another tenant's org document is NOT_FOUND). Team, workflow
and step documents written by a key bound to a tenant are that tenant's own (stored as
`<tenant>~<id>`; `~` is not an id character, so they never collide with shared ids), seen
and changed only by its keys; documents written by an all-tenant key (or without API keys)
are shared. A tenant's merge takes its own document of a scope id when it has one, else the
shared one; another tenant's documents never reach it. (Before, team/workflow/step ids were
one namespace: any tenant could read, or change, the config merged into another's jobs.)
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml

from cordum.server.config_files import load_pools, load_timeouts
from cordum.server.errors import CordumError, Violations, not_found
from cordum.server.jsonvalue import canonical_json, content_hash, finite, normalize
from cordum.server.safety.loader import load_yaml, yaml_error_text
from cordum.server.services.caller import Caller
from cordum.server.stores.config import ConfigStore, StoredConfig
from cordum.server.ttl_cache import TtlCache
from cordum.v1 import error_reason_pb2

logger = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("system", "org", "team", "workflow", "step")
SYSTEM_ID = "default"
FILES_AUTHOR = "config-files"
# (file name, key under which its content goes; "" = the top level)
DEFAULT_FILES: tuple[tuple[str, str], ...] = (
    ("system.yaml", ""),
    ("pools.yaml", "pools"),
    ("timeouts.yaml", "timeouts"),
)
MAX_DATA_BYTES = 1 << 20
MAX_META_ENTRIES = 64
MAX_META_CHARS = 1024
_SCOPE_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,200}$")
# Scopes whose documents a tenant may own (see the module doc).
TENANT_SCOPES: tuple[str, ...] = ("team", "workflow", "step")
_OWNED = "~"


def owned_id(tenant: str, scope_id: str) -> str:
    """Where a tenant's own team/workflow/step document is stored."""
    return f"{tenant}{_OWNED}{scope_id}"


# `ConfigService.effective_for_job`: (tenant, team, workflow, step) → (JSON, version, hash).
EffectiveConfigSource = Callable[[str, str, str, str], Awaitable[tuple[bytes, str, str]]]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: objects merge key by key, arrays and scalars replace."""
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = value
    return out


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Effective:
    version: str
    hash: str
    data: dict[str, Any]

    def to_json(self) -> bytes:
        """The form jobs carry in env CORDUM_EFFECTIVE_CONFIG (upstream's EffectiveSnapshot);
        the safety kernel reads its `data.safety` section."""
        return canonical_json({"version": self.version, "hash": self.hash, "data": self.data})


@dataclass(frozen=True)
class Defaults:
    data: dict[str, Any]
    files: list[str]
    sha256: str


@dataclass(frozen=True)
class Reloaded:
    files: list[str]
    document: StoredConfig


def read_defaults(config_dir: Path) -> Defaults:
    """The defaults the config/*.yaml files describe; every problem named by file and field."""
    problems = Violations()
    data: dict[str, Any] = {}
    files: list[str] = []
    hasher = hashlib.sha256()
    for name, section in DEFAULT_FILES:
        path = config_dir / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as error:
            problems.add(name, f"cannot read: {error.strerror or error}")
            continue
        files.append(str(path))
        hasher.update(name.encode() + b"\0" + raw + b"\0")
        try:
            content = load_yaml(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            text = yaml_error_text(error) if isinstance(error, yaml.YAMLError) else str(error)
            problems.add(name, f"not valid YAML: {text}")
            continue
        if content is None:
            content = {}
        if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
            problems.add(name, "must be a mapping with string keys")
            continue
        if not finite(content):
            problems.add(name, "numbers must be finite")
            continue
        if section == "pools":
            _validated(problems, name, lambda p=path: load_pools(p))
        elif section == "timeouts":
            _validated(problems, name, lambda p=path: load_timeouts(p))
        if section:
            if section in data:
                problems.add(f"system.yaml.{section}", f"set {section} in {name}, not here")
            data[section] = normalize(content)
        else:
            data.update(normalize(content))
    problems.raise_if_any()
    return Defaults(data=data, files=files, sha256=hasher.hexdigest() if files else "")


def _validated(problems: Violations, name: str, load: Callable[[], object]) -> None:
    try:
        load()
    except CordumError as error:
        for v in error.violations:
            problems.add(name if v.field.endswith(name) else f"{name}.{v.field}", v.description)


def _permission_denied(message: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.PERMISSION_DENIED, error_reason_pb2.ERROR_REASON_PERMISSION_DENIED, message
    )


class ConfigService:
    def __init__(
        self,
        store: ConfigStore,
        config_dir: Path,
        *,
        cache_ttl_s: float = 1.0,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`cache_ttl_s`: how long `effective_for_job` may serve a merge from memory; a
        write through this process clears it at once, other processes' writes show after
        at most this long."""
        self._store = store
        self._config_dir = config_dir
        # The scheduler asks for the same few scopes over and over.
        self._cache: TtlCache[tuple[str, ...], Effective] = TtlCache(cache_ttl_s, cache_size, clock)

    # -- defaults ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the system document in line with the files (rule in the module doc)."""
        defaults = read_defaults(self._config_dir)
        if not defaults.files:
            return

        def build(current: StoredConfig | None) -> StoredConfig | None:
            if current is None:
                return self._from_files(None, defaults)
            if current.files_sha256 == defaults.sha256:
                return None
            if current.origin != "files":
                logger.warning(
                    "config files changed but the system config was edited through the API "
                    "since they were loaded; keeping the stored document (revision %d). "
                    "Run ReloadConfig (cordumctl config reload) to apply the files.",
                    current.revision,
                    extra={"files": defaults.files},
                )
                return None
            return self._from_files(current, defaults)

        written = await self._store.update("system", SYSTEM_ID, build)
        if written is not None and written.files_sha256 == defaults.sha256:
            logger.info(
                "system config at revision %d from %s", written.revision, ", ".join(defaults.files)
            )
        self._cache.clear()

    async def reload(self, caller: Caller) -> Reloaded:
        """Re-read the files and make them the system document (always; see module doc)."""
        self._require_admin(caller)
        defaults = read_defaults(self._config_dir)
        if not defaults.files:
            raise CordumError(
                grpc.StatusCode.FAILED_PRECONDITION,
                error_reason_pb2.ERROR_REASON_CONFIG_NOT_FOUND,
                f"no config files (system.yaml, pools.yaml, timeouts.yaml) in {self._config_dir}",
            )
        written = await self._store.update(
            "system", SYSTEM_ID, lambda current: self._from_files(current, defaults, caller)
        )
        assert written is not None
        self._cache.clear()
        return Reloaded(files=defaults.files, document=written)

    @staticmethod
    def _from_files(
        current: StoredConfig | None, defaults: Defaults, caller: Caller | None = None
    ) -> StoredConfig:
        by = FILES_AUTHOR if caller is None or not caller.principal else caller.principal
        return StoredConfig(
            scope="system",
            scope_id=SYSTEM_ID,
            data=defaults.data,
            revision=(current.revision if current else 0) + 1,
            updated_at=now_rfc3339(),
            updated_by=by,
            meta=dict(current.meta) if current else {},
            origin="files",
            files_sha256=defaults.sha256,
        )

    # -- documents -------------------------------------------------------------------------

    async def get(self, scope: str, scope_id: str, caller: Caller) -> StoredConfig:
        scope, scope_id, stored_id = self._address(scope or "system", scope_id, caller)
        doc = await self._store.get(scope, stored_id)
        if doc is None:
            raise not_found(
                error_reason_pb2.ERROR_REASON_CONFIG_NOT_FOUND,
                f"config {scope}/{scope_id} not found",
            )
        return doc

    async def set(
        self,
        scope: str,
        scope_id: str,
        data: dict[str, Any] | None,
        meta: Mapping[str, str],
        caller: Caller,
        *,
        expected_revision: int | None = None,
    ) -> StoredConfig:
        problems = Violations()
        if not scope:
            problems.add("scope", f"required (one of: {', '.join(SCOPES)})")
        if data is None:
            problems.add("data", "required (an object; {} clears the document)")
        elif not finite(data):
            problems.add("data", "numbers must be finite")
        elif len(canonical_json(data)) > MAX_DATA_BYTES:
            problems.add("data", f"larger than {MAX_DATA_BYTES} bytes as JSON")
        if len(meta) > MAX_META_ENTRIES:
            problems.add("meta", f"at most {MAX_META_ENTRIES} entries")
        for key, value in meta.items():
            if not key or len(key) > MAX_META_CHARS or len(value) > MAX_META_CHARS:
                problems.add(f"meta.{key}", f"keys and values must be 1-{MAX_META_CHARS} chars")
        if expected_revision is not None and expected_revision < 0:
            problems.add("expected_revision", "must be >= 0 (0: the document must not exist)")
        stored_id = scope_id
        if scope:
            try:
                scope, scope_id, stored_id = self._address(scope, scope_id, caller)
            except CordumError as error:
                if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                problems.items.extend(error.violations)
        problems.raise_if_any()
        if scope == "system":
            self._require_admin(caller)
        assert data is not None
        new_data = normalize(data)

        def build(current: StoredConfig | None) -> StoredConfig:
            return StoredConfig(
                scope=scope,
                scope_id=scope_id,
                data=new_data,
                revision=(current.revision if current else 0) + 1,
                updated_at=now_rfc3339(),
                updated_by=caller.principal,
                meta=dict(meta),
                origin="api",
                files_sha256=current.files_sha256 if current else "",
            )

        written = await self._store.update(
            scope, stored_id, build, expected_revision=expected_revision
        )
        assert written is not None
        self._cache.clear()
        return written

    def _address(self, scope: str, scope_id: str, caller: Caller) -> tuple[str, str, str]:
        """(scope, scope id, the id the document is stored under), for this caller."""
        problems = Violations()
        if scope not in SCOPES:
            problems.add("scope", f"unknown scope {scope!r} (one of: {', '.join(SCOPES)})")
        if scope == "system":
            scope_id = scope_id or SYSTEM_ID
        elif scope == "org":
            scope_id = scope_id or caller.tenant or ""
        if not scope_id and scope in SCOPES:
            problems.add("scope_id", f"required for scope {scope}")
        elif scope_id and not _SCOPE_ID.match(scope_id):
            problems.add("scope_id", "must be 1-200 characters of A-Z a-z 0-9 . _ : @ / -")
        problems.raise_if_any()
        if scope == "org" and not caller.can_see(scope_id):
            # Another tenant's document is indistinguishable from a missing one.
            raise not_found(
                error_reason_pb2.ERROR_REASON_CONFIG_NOT_FOUND,
                f"config {scope}/{scope_id} not found",
            )
        if scope in TENANT_SCOPES and caller.tenant is not None:
            return scope, scope_id, owned_id(caller.tenant, scope_id)
        return scope, scope_id, scope_id

    @staticmethod
    def _require_admin(caller: Caller) -> None:
        if caller.role != "admin":
            raise _permission_denied("the system scope needs the admin role")
        caller.require_all_tenants("the system config")

    # -- effective config ----------------------------------------------------------------

    async def effective(
        self, org: str, team: str, workflow: str, step: str, caller: Caller | None = None
    ) -> Effective:
        """The merge for these scopes (missing ones skipped), always read fresh."""
        problems = Violations()
        if caller is not None:
            caller.check_tenant(org, "org_id")
        org = org or (caller.tenant if caller is not None else None) or "default"
        for name, value in (("org_id", org), ("team_id", team), ("workflow_id", workflow)):
            if value and not _SCOPE_ID.match(value):
                problems.add(name, "must be 1-200 characters of A-Z a-z 0-9 . _ : @ / -")
        if step and not _SCOPE_ID.match(step):
            problems.add("step_id", "must be 1-200 characters of A-Z a-z 0-9 . _ : @ / -")
        problems.raise_if_any()
        return await self._merge(org, team, workflow, step)

    async def effective_for_job(
        self, tenant: str, team: str = "", workflow: str = "", step: str = ""
    ) -> tuple[bytes, str, str]:
        """(JSON for env CORDUM_EFFECTIVE_CONFIG, version, hash), served from a short
        in-process cache. Ids that are not valid scope ids have no document: skipped."""
        key = (tenant or "default", team, workflow, step)
        cached = self._cache.get(key)
        if cached is None:
            cached = await self._merge(*(v if _SCOPE_ID.match(v) else "" for v in key))
            self._cache.put(key, cached)
        return cached.to_json(), cached.version, cached.hash

    async def _merge(self, org: str, team: str, workflow: str, step: str) -> Effective:
        step_id = f"{workflow}/{step}" if workflow and step else step
        wanted = [
            ("system", SYSTEM_ID),
            ("org", org),
            ("team", team),
            ("workflow", workflow),
            ("step", step_id),
        ]

        def own(scope: str, scope_id: str) -> tuple[str, str] | None:
            if scope in TENANT_SCOPES and org and scope_id:
                return scope, owned_id(org, scope_id)
            return None

        present = [(s, i) for s, i in wanted if i]
        present += [ref for ref in (own(s, i) for s, i in wanted) if ref is not None]
        docs = dict(zip(present, await self._store.get_many(present), strict=True))
        data: dict[str, Any] = {}
        parts = []
        for ref in wanted:
            own_ref = own(*ref)
            doc = (docs.get(own_ref) if own_ref else None) or docs.get(ref)
            parts.append(f"{ref[0]}:{doc.revision if doc else 0}")
            if doc is not None:
                data = deep_merge(data, doc.data)
        return Effective(version="|".join(parts), hash=content_hash(data), data=data)
