"""Helpers for the context engine tests: calls, and memory written the way upstream's
workers and tools write it (straight to Redis)."""

from __future__ import annotations

import json
from typing import Any

import grpc
from redis.asyncio import Redis

from cordum.v1 import context_pb2, context_service_pb2, context_service_pb2_grpc

C = context_service_pb2
RAW, CHAT, RAG = (
    context_pb2.CONTEXT_MODE_RAW,
    context_pb2.CONTEXT_MODE_CHAT,
    context_pb2.CONTEXT_MODE_RAG,
)


def engine(channel: grpc.aio.Channel) -> context_service_pb2_grpc.ContextEngineStub:
    return context_service_pb2_grpc.ContextEngineStub(channel)


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def roles_and_text(reply: C.BuildWindowResponse) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in reply.messages]


async def write_chunk(redis: Redis, memory_id: str, n: int | str, **doc: Any) -> str:
    """A chunk in upstream's layout: `mem:<id>:chunk:<n>` JSON, listed in `mem:<id>:chunks`."""
    key = f"mem:{memory_id}:chunk:{n}"
    await redis.set(key, json.dumps(doc))
    await redis.sadd(f"mem:{memory_id}:chunks", key)
    return key


async def write_history(redis: Redis, memory_id: str, messages: list[tuple[str, str]]) -> None:
    """History entries as upstream's engine wrote them (`{role, content, ts}`), no TTL."""
    await redis.rpush(
        f"mem:{memory_id}:events",
        *[json.dumps({"role": r, "content": c, "ts": 1_700_000_000}) for r, c in messages],
    )


async def history(redis: Redis, memory_id: str) -> list[tuple[str, str]]:
    raw = await redis.lrange(f"mem:{memory_id}:events", 0, -1)
    return [(e["role"], e["content"]) for e in map(json.loads, raw)]
