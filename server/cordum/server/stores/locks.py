"""Named locks in Redis: one Lua script per change (acquire, release, renew), so every
decision about who holds a lock is atomic.

Keys (under the store's prefix; the layout is documented in lua/lock_common.lua):

  lock:<tenant>:<resource>  HASH  mode, fence, updated_ms, o:<owner> = "<count>|<expires ms>"
  locks:lex                 ZSET  "<tenant>:<resource>", score 0 (listing by prefix)
  locks:exp                 ZSET  the same members, score = lock expiry (index cleanup)
  locks:fence               STRING the fencing-token counter (only grows)

Tenants never contain `:`, so `<tenant>:<resource>` is unambiguous for any resource name.
Time comes from the Redis server (TIME), so gateways with skewed clocks agree on expiry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from cordum.server.stores import scripts

COMMON = "lock_common.lua"


@dataclass(frozen=True)
class LockOwner:
    count: int
    expires_ms: int


@dataclass(frozen=True)
class LockState:
    resource: str
    mode: str
    fencing_token: int
    updated_ms: int
    owners: dict[str, LockOwner] = field(default_factory=dict)

    @property
    def expires_ms(self) -> int:
        return max((o.expires_ms for o in self.owners.values()), default=0)


@dataclass(frozen=True)
class LockOutcome:
    # ok | held | full | not_held | missing | released
    status: str
    lock: LockState | None = None


@dataclass(frozen=True)
class LockPage:
    locks: list[LockState]
    # The last resource listed when more may follow ("" = the end).
    next_after: str


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _state(resource: str, reply: Sequence[object]) -> LockState:
    """From a script reply {status, mode, fence, updated_ms, now_ms, owner, count, exp, ...}."""
    owners = {}
    for i in range(5, len(reply), 3):
        owners[_s(reply[i])] = LockOwner(int(reply[i + 1]), int(reply[i + 2]))  # type: ignore[call-overload]
    return LockState(
        resource=resource,
        mode=_s(reply[1]),  # type: ignore[arg-type]
        fencing_token=int(reply[2]),  # type: ignore[call-overload]
        updated_ms=int(reply[3]),  # type: ignore[call-overload]
        owners=owners,
    )


def _from_hash(resource: str, raw: dict[bytes, bytes], now_ms: int) -> LockState | None:
    """A stored lock as readers see it: owners whose hold expired are left out."""
    owners = {}
    for name, value in raw.items():
        if name.startswith(b"o:"):
            count, _, expires = value.decode().partition("|")
            if int(expires) > now_ms:
                owners[name[2:].decode()] = LockOwner(int(count), int(expires))
    if not owners:
        return None
    return LockState(
        resource=resource,
        mode=_s(raw.get(b"mode")) or "exclusive",
        fencing_token=int(raw.get(b"fence") or 0),
        updated_ms=int(raw.get(b"updated_ms") or 0),
        owners=owners,
    )


def _server_ms(reply: Sequence[object]) -> int:
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000  # type: ignore[call-overload]


class LockStore:
    def __init__(self, redis: Redis, *, prefix: str = "", max_owners: int = 1000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_owners = max_owners
        self._acquire = scripts.load(redis, "lock_acquire.lua", COMMON)
        self._release = scripts.load(redis, "lock_release.lua", COMMON)
        self._renew = scripts.load(redis, "lock_renew.lua", COMMON)

    def key(self, tenant: str, resource: str) -> str:
        return f"{self.prefix}lock:{tenant}:{resource}"

    def _outcome(self, resource: str, reply: Sequence[object]) -> LockOutcome:
        status = _s(reply[0])  # type: ignore[arg-type]
        if status in ("missing", "released"):
            return LockOutcome(status)
        return LockOutcome(status, _state(resource, reply))

    async def acquire(
        self, tenant: str, resource: str, owner: str, mode: str, ttl_ms: int
    ) -> LockOutcome:
        reply = await self._acquire(
            args=[self.prefix, tenant, resource, owner, mode, ttl_ms, self.max_owners]
        )
        return self._outcome(resource, reply)

    async def release(self, tenant: str, resource: str, owner: str) -> LockOutcome:
        reply = await self._release(args=[self.prefix, tenant, resource, owner])
        return self._outcome(resource, reply)

    async def renew(self, tenant: str, resource: str, owner: str, ttl_ms: int) -> LockOutcome:
        reply = await self._renew(args=[self.prefix, tenant, resource, owner, ttl_ms])
        return self._outcome(resource, reply)

    async def get(self, tenant: str, resource: str) -> LockState | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self.key(tenant, resource))
        now, raw = await pipe.execute()
        return _from_hash(resource, raw, _server_ms(now))

    async def list(self, tenant: str, prefix: str, after: str, page_size: int) -> LockPage:
        """Live locks of `tenant` whose resource starts with `prefix`, in resource order,
        starting after the resource `after` ("" = from the start)."""
        base = f"{tenant}:"
        low = b"(" + (base + after).encode() if after else b"[" + (base + prefix).encode()
        # No UTF-8 text contains the byte 0xff, so this bounds every member with the prefix.
        high = b"[" + (base + prefix).encode() + b"\xff"
        found: list[LockState] = []
        last = ""
        while len(found) < page_size:
            batch = max(page_size - len(found), 10)
            members = await self.redis.zrangebylex(
                f"{self.prefix}locks:lex", low, high, start=0, num=batch
            )
            if not members:
                return LockPage(found, "")
            pipe = self.redis.pipeline(transaction=False)
            pipe.time()
            resources = [m.decode()[len(base) :] for m in members]
            for resource in resources:
                pipe.hgetall(self.key(tenant, resource))
            now, *raws = await pipe.execute()
            for resource, raw in zip(resources, raws, strict=True):
                last = resource
                state = _from_hash(resource, raw, _server_ms(now))
                if state is not None:  # expired ones leave the index at the next change
                    found.append(state)
                    if len(found) == page_size:
                        break
            if len(members) < batch and last == resources[-1]:
                return LockPage(found, "")
            low = b"(" + (base + last).encode()
        return LockPage(found, last)
