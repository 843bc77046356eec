"""Reading what job pointers point at: `ctx:` (a job's input), `res:` (its result), `art:`
(an artifact) and `mem:` (memory: chat events, chunks, summaries) keys, tenant-checked.

Pointer or key: `redis://ctx:<job_id>` and `ctx:<job_id>` are the same (surrounding quotes
and spaces are dropped, as upstream does). Who may read what:
- `ctx:<job_id>`, `res:<job_id>`: the job must exist and belong to the caller's tenant.
- `art:<id>`: the artifact's tenant (as for GetArtifact).
- `mem:<...>`: memory belongs to a job. A job's memory id is `mem:<job_id>` unless it was
  given one, and memory keys are `<memory id>[:<part>]` — also `mem:<memory id>:<part>`,
  the context engine's form, so `mem:mem:<job_id>:events`. The reader takes the job ids the
  key can name (the text after `mem:` or `mem:mem:`, cut at each `:`, longest first) and
  allows the read when one of those jobs is the caller tenant's and its memory id is the
  one the key names. Memory under an explicitly chosen id (not `mem:<job_id>`) is readable
  only by unscoped callers (no API keys configured) until memory ids carry their owner.
Anything else (including a job or memory of another tenant) is NOT_FOUND MEMORY_NOT_FOUND.

What comes back: strings as `base64` (always), `text` (when UTF-8) and `json` (when it
parses); lists, sets and hashes as `length` (all entries) and `items` (each entry JSON-
decoded when it parses, else its text, else `{"base64": ...}`; a hash as an object). At most
`max_bytes` of data are returned: a string's `size_bytes` is its full size (a shorter
`base64` means it was cut; `text`/`json` are only given for whole values), a collection's
`length` is its full count and its `size_bytes` what `items` hold (fewer items: it was cut;
at most `max_items` entries are read). Sets and hashes come sorted. Artifacts read like
strings (`redis_type` empty). Other Redis types (sorted sets, streams) are refused.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from cordum.server.errors import CordumError, Violations, not_found
from cordum.server.services.artifacts import ArtifactService
from cordum.server.services.caller import Caller
from cordum.server.services.job_validation import ID_RE
from cordum.server.stores.jobs import JobRecord, JobStore, record_from_hash
from cordum.v1 import error_reason_pb2

R = error_reason_pb2

MAX_KEY = 1024
MAX_ITEMS = 1000
MAX_CANDIDATES = 16
KINDS = {"ctx:": "context", "res:": "result", "art:": "artifact", "mem:": "memory"}


@dataclass
class MemoryRead:
    pointer: str
    key: str
    kind: str
    size_bytes: int = 0
    raw: bytes | None = None
    text: str | None = None
    json: Any = None
    has_json: bool = False
    redis_type: str = ""
    length: int = 0
    items: Any = None


def _missing(key: str) -> CordumError:
    return not_found(R.ERROR_REASON_MEMORY_NOT_FOUND, f"{key} not found")


def _decode(raw: bytes) -> tuple[str | None, Any, bool]:
    """(text, json, parsed) of a value: text when UTF-8, JSON when it parses."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None, None, False
    try:
        return text, json.loads(text), True
    except ValueError:
        return text, None, False


def _item(raw: bytes) -> Any:
    text, value, parsed = _decode(raw)
    if parsed:
        return value
    if text is not None:
        return text
    return {"base64": base64.b64encode(raw).decode()}


def owner_candidates(key: str) -> list[str]:
    """The job ids a `mem:` key can belong to, longest first."""
    rest = key.removeprefix("mem:")
    bases = [rest, rest.removeprefix("mem:")] if rest.startswith("mem:") else [rest]
    out: list[str] = []
    for base in bases:
        parts = base.split(":")
        for i in range(len(parts), 0, -1):
            candidate = ":".join(parts[:i])
            if ID_RE.match(candidate) and candidate not in out:
                out.append(candidate)
    return out[:MAX_CANDIDATES]


def _names_memory(key: str, memory_id: str) -> bool:
    for base in (memory_id, f"mem:{memory_id}"):
        if key == base or key.startswith(base + ":"):
            return True
    return False


class MemoryService:
    def __init__(
        self,
        redis: Redis,
        jobs: JobStore,
        artifacts: ArtifactService,
        *,
        max_bytes: int = 1024 * 1024,
        max_items: int = MAX_ITEMS,
    ) -> None:
        self._redis = redis
        self._jobs = jobs
        self._artifacts = artifacts
        self.max_bytes = max_bytes
        self.max_items = max_items

    @staticmethod
    def parse(ptr: str, key: str) -> tuple[str, str, str]:
        """(field, pointer, key) of the request; INVALID_ARGUMENT naming the field."""
        field = "ptr" if ptr.strip() else "key"
        value = (ptr if field == "ptr" else key).strip().strip("\"'").strip()
        problems = Violations()
        if not value:
            problems.add("ptr", "required (a `redis://` pointer, or give `key`)")
        elif "://" in value and not value.startswith("redis://"):
            problems.add(field, "unsupported pointer scheme: only redis:// pointers")
        else:
            value = value.removeprefix("redis://")
            if len(value) > MAX_KEY:
                problems.add(field, f"at most {MAX_KEY} characters")
            elif value[:4] not in KINDS:
                problems.add(field, "must be a ctx:, res:, art: or mem: key or pointer")
            elif len(value) == 4:
                problems.add(field, f"missing the id after {value}")
        problems.raise_if_any()
        return field, f"redis://{value}", value

    async def read(self, ptr: str, key: str, caller: Caller) -> MemoryRead:
        field, pointer, key = self.parse(ptr, key)
        kind = KINDS[key[:4]]
        out = MemoryRead(pointer=pointer, key=key, kind=kind)
        if kind == "artifact":
            return await self._read_artifact(out, field, caller)
        if kind in ("context", "result"):
            job_id = key[4:]
            if not ID_RE.match(job_id):
                problems = Violations()
                problems.add(field, "not a job id after the prefix")
                problems.raise_if_any()
            (record,) = await self._records([job_id])
            if record is None or not caller.can_see(record.tenant):
                raise _missing(key)
        elif caller.tenant is not None and not await self._owns_memory(key, caller):
            raise _missing(key)
        await self._read_key(out, field)
        return out

    async def _owns_memory(self, key: str, caller: Caller) -> bool:
        for record in await self._records(owner_candidates(key)):
            if (
                record is not None
                and caller.can_see(record.tenant)
                and _names_memory(key, record.job.memory_id or f"mem:{record.job.id}")
            ):
                return True
        return False

    async def _records(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self._jobs.job_key(job_id))
        # An id may name a job's own sub-key (`<id>:events` is a list): no job then.
        replies = await pipe.execute(raise_on_error=False)
        return [record_from_hash(r) if isinstance(r, dict) else None for r in replies]

    async def _read_artifact(self, out: MemoryRead, field: str, caller: Caller) -> MemoryRead:
        try:
            meta = await self._artifacts.metadata(out.pointer, caller)
        except CordumError as error:
            if error.reason == R.ERROR_REASON_ARTIFACT_NOT_FOUND:
                raise _missing(out.key) from None
            if error.reason == R.ERROR_REASON_INVALID_ARGUMENT:
                problems = Violations()
                problems.add(field, "not an artifact key `art:<32 hex>`")
                problems.raise_if_any()
            raise
        raw = await self._artifacts.read_prefix(meta, min(meta.size, self.max_bytes))
        self._string(out, raw, meta.size)
        out.redis_type = ""
        return out

    def _string(self, out: MemoryRead, raw: bytes, size: int) -> None:
        out.redis_type = "string"
        out.size_bytes = size
        out.raw = raw
        if len(raw) == size:
            out.text, out.json, out.has_json = _decode(raw)

    async def _read_key(self, out: MemoryRead, field: str) -> None:
        key, cap = out.key, self.max_bytes
        kind = (await self._redis.type(key)).decode()
        if kind == "none":
            raise _missing(key)
        if kind == "string":
            pipe = self._redis.pipeline(transaction=False)
            pipe.strlen(key)
            pipe.getrange(key, 0, cap - 1)
            size, raw = await pipe.execute()
            self._string(out, raw, int(size))
            return
        if kind not in ("list", "set", "hash"):
            problems = Violations()
            problems.add(field, f"unsupported redis type {kind} (string, list, set or hash)")
            problems.raise_if_any()
        out.redis_type = kind
        if kind == "list":
            pipe = self._redis.pipeline(transaction=False)
            pipe.llen(key)
            pipe.lrange(key, 0, self.max_items - 1)
            length, raws = await pipe.execute()
            kept = self._take([(None, raw) for raw in raws], out)
            out.length, out.items = int(length), [value for _, value in kept]
        elif kind == "set":
            members: list[bytes] = []
            async for member in self._redis.sscan_iter(key, count=200):
                members.append(member)
                if len(members) >= self.max_items:
                    break
            kept = self._take([(None, raw) for raw in sorted(members)], out)
            out.length, out.items = int(await self._redis.scard(key)), [v for _, v in kept]
        else:
            pairs: list[tuple[bytes | None, bytes]] = []
            async for name, raw in self._redis.hscan_iter(key, count=200):
                pairs.append((name, raw))
                if len(pairs) >= self.max_items:
                    break
            kept = self._take(sorted(pairs), out)
            out.length = int(await self._redis.hlen(key))
            out.items = {(name or b"").decode(errors="replace"): v for name, v in kept}

    def _take(
        self, entries: list[tuple[bytes | None, bytes]], out: MemoryRead
    ) -> list[tuple[bytes | None, Any]]:
        """Decoded entries, in order, while they fit in max_bytes; size_bytes = what was kept."""
        kept: list[tuple[bytes | None, Any]] = []
        used = 0
        for name, raw in entries:
            size = len(raw) + len(name or b"")
            if used + size > self.max_bytes:
                break
            used += size
            kept.append((name, _item(raw)))
        out.size_bytes = used
        return kept
