"""Policy administration: draft bundles, immutable published versions, rollback, audit.

Model (differs from upstream on purpose):

- A bundle is a DRAFT. `PutPolicyBundle` validates and stores it; nothing it says is
  enforced until `PublishPolicy` (upstream: a PUT was live at the next kernel reload, and a
  missing `enabled` meant enabled).
- `PublishPolicy` creates version N+1, an immutable copy of the bundles (content included,
  disabled ones kept with `enabled: false`) and the snapshot id the kernel will report for
  it. Without `bundle_ids` the version is exactly the current drafts; with `bundle_ids`,
  the current version with just those bundles brought up to their drafts (a bundle whose
  draft was deleted is removed). Publish does not flip `enabled` (upstream forced it on).
- `RollbackPolicy` to version K (or the newest version with a snapshot id) publishes a copy
  of K as version N+1 (`rollback_of` = K). Drafts are left alone.
- The kernel enforces the base file plus the enabled bundles of the current version. After
  a publish or rollback this process reloads its kernel before answering, and an event on
  `<ns>cordum.policy.events` makes every other kernel reload at once.
- Every change (bundle put/delete, publish, rollback) appends an audit entry: who (the
  caller's principal, else `author`), when, what (bundle ids changed, a unified diff of
  their YAML), and for publish/rollback the snapshot before/after and the version.
- Bundle ids are any `a/b/c` path of `[A-Za-z0-9._-]` segments (upstream required
  `secops/`); `~` in a URL stands for `/`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.errors import CordumError, Violations, invalid_field, not_found
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.services.caller import Caller
from cordum.server.services.policy_bundles import (
    Source,
    build_candidate,
    bundle_id_from_url,
    bundle_source,
    check_bundle_id,
    check_content,
    decode_number_token,
    decode_token,
    diff_bundles,
    encode_token,
    page_size,
    rule_views,
    sha256_text,
    unpublishable,
)
from cordum.server.services.policy_recorder import PolicyEvent, PolicyEvents
from cordum.server.stores.policy import PolicyStore
from cordum.v1 import error_reason_pb2, policy_pb2

logger = logging.getLogger(__name__)

_ATTEMPTS = 10


@dataclass(frozen=True)
class Published:
    snapshot_before: str
    snapshot_after: str
    published: list[str]
    version: policy_pb2.PolicyVersion


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def _conflict(what: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.ABORTED,
        error_reason_pb2.ERROR_REASON_REVISION_MISMATCH,
        f"{what} is being changed concurrently; try again",
    )


def _no_room(limit: int) -> CordumError:
    return CordumError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        error_reason_pb2.ERROR_REASON_INVALID_ARGUMENT,
        f"too many policy bundles (at most {limit}); delete unused drafts first",
    )


def _bundle_missing(bundle_id: str) -> CordumError:
    return not_found(
        error_reason_pb2.ERROR_REASON_POLICY_BUNDLE_NOT_FOUND,
        f"policy bundle {bundle_id} not found",
    )


def _version_missing(what: str) -> CordumError:
    return not_found(
        error_reason_pb2.ERROR_REASON_POLICY_VERSION_NOT_FOUND, f"policy version {what} not found"
    )


def actor(caller: Caller, author: str) -> str:
    return caller.principal or author.strip() or "anonymous"


class PolicyAdmin:
    def __init__(self, store: PolicyStore, kernel: SafetyKernel, events: PolicyEvents) -> None:
        """`kernel` is this process's kernel: its base file is the base of every version
        and it is reloaded before publish/rollback return (read-your-writes)."""
        self._store = store
        self._kernel = kernel
        self._events = events

    @property
    def kernel(self) -> SafetyKernel:
        return self._kernel

    def base(self) -> Source | None:
        """The base file as the kernel last loaded it (`file:<path>`, yaml)."""
        policy_set = self._kernel.policy_set
        if policy_set is None:
            return None
        for source in policy_set.sources:
            if source.name.startswith("file:"):
                return source.name, source.text
        return None

    # -- drafts ----------------------------------------------------------------------------

    async def get_bundle(self, raw_id: str) -> policy_pb2.PolicyBundle:
        bundle_id = self._bundle_id(raw_id)
        draft = await self._store.get_draft(bundle_id)
        if draft is None:
            raise _bundle_missing(bundle_id)
        return draft.bundle

    async def list_bundles(
        self, size: int, token: str
    ) -> tuple[list[policy_pb2.PolicyBundle], str]:
        problems = Violations()
        limit = page_size("page_size", size, problems, 100, 500)
        after = decode_token("page_token", token, problems)
        problems.raise_if_any()
        ids = await self._store.draft_ids(after, limit + 1)
        more = len(ids) > limit
        ids = ids[:limit]
        return await self._store.drafts(ids), encode_token(ids[-1]) if more and ids else ""

    async def put_bundle(
        self,
        raw_id: str,
        content: str,
        enabled: bool | None,
        author: str,
        message: str,
        caller: Caller,
    ) -> policy_pb2.PolicyBundle:
        bundle_id = bundle_id_from_url(raw_id)
        problems = Violations()
        check_bundle_id("bundle_id", bundle_id, problems)
        check_content("content", content, problems)
        problems.raise_if_any()
        who = actor(caller, author)
        for _ in range(_ATTEMPTS):
            draft = await self._store.get_draft(bundle_id)
            old = draft.bundle if draft is not None else None
            flag = enabled if enabled is not None else (old.enabled if old is not None else True)
            if old is not None and (old.content, old.enabled) == (content, flag):
                return old  # nothing changed: no new revision, no audit entry
            now = _now()
            new = policy_pb2.PolicyBundle(
                id=bundle_id,
                content=content,
                enabled=flag,
                author=author.strip() or caller.principal,
                message=message,
                created_at=old.created_at if old is not None else now,
                updated_at=now,
                sha256=sha256_text(content),
                source=bundle_source(bundle_id),
                revision=(old.revision if old is not None else 0) + 1,
            )
            diff, _ = diff_bundles([old] if old is not None else [], [new])
            entry = self._audit("bundle_put", who, caller, [bundle_id], message, diff=diff)
            result = await self._store.write_draft(
                bundle_id, draft.raw if draft else b"", new, entry
            )
            if result == 1:
                return new
            if result == -1:
                raise _no_room(self._store.limits.max_bundles)
        raise _conflict(f"policy bundle {bundle_id}")

    async def delete_bundle(self, raw_id: str, caller: Caller, author: str = "") -> None:
        bundle_id = self._bundle_id(raw_id)
        for _ in range(_ATTEMPTS):
            draft = await self._store.get_draft(bundle_id)
            if draft is None:
                raise _bundle_missing(bundle_id)
            diff, _ = diff_bundles([draft.bundle], [])
            who = actor(caller, author)
            entry = self._audit("bundle_delete", who, caller, [bundle_id], "", diff=diff)
            if await self._store.write_draft(bundle_id, draft.raw, None, entry) == 1:
                return
        raise _conflict(f"policy bundle {bundle_id}")

    @staticmethod
    def _bundle_id(raw_id: str) -> str:
        bundle_id = bundle_id_from_url(raw_id)
        problems = Violations()
        check_bundle_id("bundle_id", bundle_id, problems)
        problems.raise_if_any()
        return bundle_id

    # -- versions --------------------------------------------------------------------------

    async def published_bundles(self) -> list[policy_pb2.PolicyBundle]:
        current = await self._store.current()
        return list(current.bundles) if current is not None else []

    async def publish(
        self, raw_ids: Sequence[str], author: str, message: str, note: str, caller: Caller
    ) -> Published:
        ids = sorted({bundle_id_from_url(i) for i in raw_ids})
        problems = Violations()
        for i, bundle_id in enumerate(ids):
            check_bundle_id(f"bundle_ids[{i}]", bundle_id, problems)
        problems.raise_if_any()
        who = actor(caller, author)
        for _ in range(_ATTEMPTS):
            current = await self._store.current()
            published = {b.id: b for b in current.bundles} if current is not None else {}
            if ids:
                drafts = {b.id: b for b in await self._store.drafts(ids)}
                bundles = dict(published)
                for bundle_id in ids:
                    if bundle_id in drafts:
                        bundles[bundle_id] = drafts[bundle_id]
                    elif bundle_id in published:
                        del bundles[bundle_id]  # the draft was deleted: publish the deletion
                    else:
                        raise _bundle_missing(bundle_id)
            else:
                bundles = {b.id: b for b in await self._store.drafts(await self._store.draft_ids())}
                if not bundles and current is None:
                    raise CordumError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        error_reason_pb2.ERROR_REASON_POLICY_BUNDLE_NOT_FOUND,
                        "no policy bundles to publish",
                    )
            result = await self._commit(
                "publish", current, list(bundles.values()), who, message, note, caller
            )
            if result is not None:
                version, before, diff_ids = result
                return Published(before, version.snapshot, diff_ids or ids, version)
        raise _conflict("the published policy")

    async def rollback(
        self, number: int, snapshot_id: str, author: str, message: str, note: str, caller: Caller
    ) -> tuple[Published, int]:
        if number < 0:
            raise invalid_field("version", "must be > 0")
        if not number and not snapshot_id.strip():
            raise invalid_field("version", "give the version number or its snapshot_id")
        target_number = number
        if snapshot_id.strip():
            by_snapshot = await self._store.version_for_snapshot(snapshot_id.strip())
            if not by_snapshot:
                raise _version_missing(f"with snapshot {snapshot_id.strip()}")
            if number and number != by_snapshot:
                raise invalid_field(
                    "snapshot_id", f"belongs to version {by_snapshot}, not version {number}"
                )
            target_number = by_snapshot
        target = await self._store.get_version(target_number)
        if target is None:
            raise _version_missing(str(target_number))
        who = actor(caller, author)
        for _ in range(_ATTEMPTS):
            current = await self._store.current()
            if current is not None and current.version == target.version:
                raise CordumError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    error_reason_pb2.ERROR_REASON_POLICY_VERSION_CURRENT,
                    f"version {target.version} is already the current version",
                )
            result = await self._commit(
                "rollback",
                current,
                list(target.bundles),
                who,
                message,
                note,
                caller,
                rollback_of=target.version,
            )
            if result is not None:
                version, before, diff_ids = result
                return Published(before, version.snapshot, diff_ids, version), target.version
        raise _conflict("the published policy")

    async def _commit(
        self,
        action: str,
        current: policy_pb2.PolicyVersion | None,
        bundles: list[policy_pb2.PolicyBundle],
        who: str,
        message: str,
        note: str,
        caller: Caller,
        *,
        rollback_of: int = 0,
    ) -> tuple[policy_pb2.PolicyVersion, str, list[str]] | None:
        """Write version N+1 over `current`; None when another publish got there first."""
        try:
            candidate = build_candidate(self.base(), bundles)
        except CordumError as error:
            raise unpublishable(error) from None
        based_on = current.version if current is not None else 0
        diff, changed = diff_bundles(current.bundles if current is not None else [], bundles)
        before = self._kernel.snapshot
        version = policy_pb2.PolicyVersion(
            version=based_on + 1,
            snapshot=candidate.snapshot,
            bundles=sorted(bundles, key=lambda b: b.id),
            published_at=_now(),
            published_by=who,
            message=message,
            note=note,
            rollback_of=rollback_of,
        )
        entry = self._audit(
            action,
            who,
            caller,
            changed,
            message,
            before=before,
            after=candidate.snapshot,
            version=version.version,
            diff=diff,
        )
        if not await self._store.publish(based_on, version, entry):
            return None
        await self._announce(PolicyEvent(action, version.version, version.snapshot))
        return version, before, changed

    async def _announce(self, event: PolicyEvent) -> None:
        try:
            await self._events.publish(event)
        except Exception:  # the watchers of the other replicas still pick it up
            logger.exception("announcing policy %s v%d failed", event.action, event.version)
        await self._kernel.reload()

    async def list_versions(
        self, size: int, token: str
    ) -> tuple[list[policy_pb2.PolicyVersion], str]:
        problems = Violations()
        limit = page_size("page_size", size, problems, 50, 500)
        before = decode_number_token("page_token", token, problems)
        problems.raise_if_any()
        versions, next_before = await self._store.list_versions(before, limit)
        return versions, encode_token(str(next_before)) if next_before else ""

    async def get_version(self, number: int) -> policy_pb2.PolicyVersion:
        if number <= 0:
            raise invalid_field("version", "must be > 0")
        version = await self._store.get_version(number)
        if version is None:
            raise _version_missing(str(number))
        return version

    # -- audit, snapshots, rules -----------------------------------------------------------

    async def list_audit(
        self, size: int, token: str
    ) -> tuple[list[policy_pb2.PolicyAuditEntry], str]:
        problems = Violations()
        limit = page_size("page_size", size, problems, 100, 1000)
        before = decode_number_token("page_token", token, problems)
        problems.raise_if_any()
        entries, next_before = await self._store.list_audit(before, limit)
        return entries, encode_token(str(next_before)) if next_before else ""

    def snapshots(self) -> list[str]:
        return self._kernel.snapshots()

    async def rules(
        self, include_disabled: bool
    ) -> tuple[list[policy_pb2.PolicyRuleView], list[policy_pb2.PolicyBundleError]]:
        """The rules of what is enforced: the base file and the current version's bundles
        (its disabled bundles too with `include_disabled`)."""
        sources: list[tuple[str, str, bool]] = []
        base = self.base()
        if base is not None:
            sources.append((base[0], base[1], True))
        for bundle in sorted(await self.published_bundles(), key=lambda b: b.id):
            if bundle.enabled or include_disabled:
                sources.append((bundle.id, bundle.content, bundle.enabled))
        return rule_views(sources)

    @staticmethod
    def _audit(
        action: str,
        who: str,
        caller: Caller,
        bundle_ids: Sequence[str],
        message: str,
        *,
        before: str = "",
        after: str = "",
        version: int = 0,
        diff: str = "",
    ) -> policy_pb2.PolicyAuditEntry:
        created = _now()
        stamp = datetime.fromtimestamp(created.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return policy_pb2.PolicyAuditEntry(
            id=f"{stamp}-{uuid.uuid4().hex[:12]}",
            action=action,
            actor_id=who,
            role=caller.role,
            bundle_ids=list(bundle_ids),
            message=message,
            snapshot_before=before,
            snapshot_after=after,
            version=version,
            created_at=created,
            diff=diff,
        )
