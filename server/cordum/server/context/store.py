"""A memory in Redis, under upstream's keys.

- `mem:<id>:events`: LIST of JSON `{role, content, ts}`, written by UpdateMemory (append,
  trim and TTL in one Lua call); the newest 2 x `context_history_turns` entries are kept.
- `mem:<id>:summary`: STRING, plain text: the running summary (UpdateMemory), or written by
  other tools; as long as the summary budget.
- `mem:<id>:chunks`: SET of chunk keys, written by workers and upstream tools; reads take at
  most `context_max_chunks` members.
- `mem:<id>:chunk:<n>`: STRING, JSON `{path, language, bytes, loc, content}`, written by
  workers and upstream tools; reads skip chunks over 256 KiB.

The keys are NOT under the server's namespace prefix: workers and upstream's tools address
them by memory id alone. Every write refreshes the TTL (`context_memory_ttl_s`, default 30
days) of all of them, chunks included (upstream's writers set none), so an idle memory ends.

A chunk set may only point at its own memory's chunks: members that are not
`mem:<id>:chunk:<something without a colon>` are ignored (upstream read whatever key a
member named, so a set could pull `ctx:<another job>` into a window).

Round trips: BuildWindow reads 1 (CHAT), 3 (RAG with chunks); UpdateMemory writes 1 (the Lua
append), then 1 or 2 to refresh TTLs, and 2 more when the summary is rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from cordum.server.context.model import Message
from cordum.server.context.retrieval import Chunk
from cordum.server.stores import scripts

MAX_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class MemoryKeys:
    memory_id: str

    @property
    def events(self) -> str:
        return f"mem:{self.memory_id}:events"

    @property
    def summary(self) -> str:
        return f"mem:{self.memory_id}:summary"

    @property
    def chunks(self) -> str:
        return f"mem:{self.memory_id}:chunks"

    def is_chunk(self, key: str) -> bool:
        prefix = f"mem:{self.memory_id}:chunk:"
        return key.startswith(prefix) and len(key) > len(prefix) and ":" not in key[len(prefix) :]


@dataclass(frozen=True)
class MemorySnapshot:
    # The newest messages read, oldest first.
    history: list[Message] = field(default_factory=list)
    # How many the memory holds.
    history_total: int = 0
    summary: str = ""
    chunks: list[Chunk] = field(default_factory=list)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def parse_event(raw: bytes | str) -> Message | None:
    """A history entry; None for one that is not JSON or has no content (upstream skips
    empty content too)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    content = doc.get("content")
    if not isinstance(content, str) or not content:
        return None
    role = doc.get("role")
    return Message(role if isinstance(role, str) and role else "user", content)


def _chunk_order(key: str) -> tuple[int, int, str]:
    tail = key.rsplit(":", 1)[-1]
    return (0, int(tail), key) if tail.isdigit() else (1, 0, key)


class MemoryStore:
    def __init__(self, redis: Redis, *, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.redis = redis
        self.max_chunk_bytes = max_chunk_bytes
        self._append = scripts.load(redis, "memory_append.lua")

    async def read(
        self, memory_id: str, *, history_limit: int, rag: bool, max_chunks: int
    ) -> MemorySnapshot:
        keys = MemoryKeys(memory_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(keys.events)
        # Never `LRANGE key -0 -1`: that is the whole list.
        pipe.lrange(keys.events, -max(history_limit, 1), -1)
        if rag:
            pipe.get(keys.summary)
        replies = await pipe.execute()
        total = int(replies[0])
        raw_events = replies[1]
        history = [m for m in (parse_event(r) for r in raw_events) if m is not None]
        # Entries read but unusable are not history either.
        total -= len(raw_events) - len(history)
        if not rag:
            return MemorySnapshot(history=history, history_total=total)
        chunk_keys = await self.chunk_keys(memory_id, max_chunks)
        return MemorySnapshot(
            history=history,
            history_total=total,
            summary=_text(replies[2]).strip(),
            chunks=await self.chunks(chunk_keys),
        )

    async def chunk_keys(self, memory_id: str, limit: int) -> list[str]:
        """The memory's chunk keys (at most `limit`; beyond it, an arbitrary subset), in
        chunk-number order, only those that belong to the memory."""
        keys = MemoryKeys(memory_id)
        if limit <= 0:
            return []
        size = await self.redis.scard(keys.chunks)
        if size == 0:
            return []
        members: list[str] = []
        if size <= limit:
            members = [_text(m) for m in await self.redis.smembers(keys.chunks)]
        else:
            cursor = 0
            while True:
                cursor, batch = await self.redis.sscan(keys.chunks, cursor, count=limit)
                members.extend(_text(m) for m in batch)
                if cursor == 0 or len(members) >= limit:
                    break
            members = members[:limit]
        return sorted((m for m in members if keys.is_chunk(m)), key=_chunk_order)

    async def chunks(self, chunk_keys: Sequence[str]) -> list[Chunk]:
        """The chunks stored at these keys; missing, oversized and malformed ones left out."""
        if not chunk_keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in chunk_keys:
            pipe.strlen(key)
            pipe.getrange(key, 0, self.max_chunk_bytes - 1)
        replies = await pipe.execute(raise_on_error=False)
        out: list[Chunk] = []
        for i, key in enumerate(chunk_keys):
            size, raw = replies[2 * i], replies[2 * i + 1]
            if isinstance(size, Exception) or isinstance(raw, Exception) or not raw:
                continue  # another type at that key, or gone
            if size > self.max_chunk_bytes:
                continue
            chunk = Chunk.from_json(key, raw)
            if chunk is not None:
                out.append(chunk)
        return out

    async def append(
        self, memory_id: str, entries: Sequence[Message], *, keep: int, ttl_s: int, now: int
    ) -> tuple[int, int]:
        """Append entries to the history, trim it to `keep`, refresh its TTL: atomically.
        Returns the history's length and its size in bytes."""
        encoded = [
            json.dumps(
                {"role": m.role, "content": m.content, "ts": now},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for m in entries
        ]
        length, size = await self._append(
            keys=[MemoryKeys(memory_id).events], args=[keep, ttl_s, *encoded]
        )
        return int(length), int(size)

    async def touch(self, memory_id: str, *, ttl_s: int, max_chunks: int) -> None:
        """Refresh the TTL of the summary, the chunk set and its chunks."""
        keys = MemoryKeys(memory_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(keys.summary, ttl_s)
        pipe.expire(keys.chunks, ttl_s)
        _, has_chunks = await pipe.execute()
        if not has_chunks:
            return
        chunk_keys = await self.chunk_keys(memory_id, max_chunks)
        if chunk_keys:
            pipe = self.redis.pipeline(transaction=False)
            for key in chunk_keys:
                pipe.expire(key, ttl_s)
            await pipe.execute()

    async def history_and_summary(self, memory_id: str) -> tuple[list[Message], str]:
        keys = MemoryKeys(memory_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(keys.events, 0, -1)
        pipe.get(keys.summary)
        raw_events, summary = await pipe.execute()
        history = [m for m in (parse_event(r) for r in raw_events) if m is not None]
        return history, _text(summary).strip()

    async def write_summary(self, memory_id: str, text: str, *, ttl_s: int) -> None:
        await self.redis.set(MemoryKeys(memory_id).summary, text, ex=ttl_s)
