"""The context engine: BuildWindow and UpdateMemory (upstream's `cordum.v1.ContextEngine`).

Modes:
- RAW (and UNSPECIFIED): the user message only; no memory is read or written.
- CHAT: history, then the user message.
- RAG: the running summary, the chunks retrieved for the user message, history, then the
  user message.

BuildWindow: the user message comes from `logical_payload` (payload.py); the window is
assembled within `max_input_tokens` (default 8,000) counted with the model's tokenizer
(tokens.py, window.py); `output_tokens` echoes `max_output_tokens` (default 1,024). A
history longer than the budget could hold is never read whole: at most
`max_input_tokens / 5` of its newest entries are (a message costs at least 5 tokens).
RAG retrieval: every chunk whose path contains the payload's `file_path` or is contained in it
(upstream's rule) comes first, then the best `context_rag_top_k` (default 8) of the others by
the `Retriever` (BM25 by default) for the user message; at most `context_max_chunks` (500)
chunks of a memory are considered.

UpdateMemory (CHAT and RAG; RAW and UNSPECIFIED keep no memory, as upstream): appends the user
message and the trimmed `model_response` (empty ones are not stored; each capped at 64 Ki
characters) to the history, trims it to `context_history_turns` turns (2 entries a turn) and
refreshes every key's TTL, then rebuilds the running summary when the history holds more than
`context_summary_trigger_tokens` (summary.py). Concurrent updates of one memory both land
(the append is atomic); their summaries race and the last one written wins, which loses
nothing the next update does not rebuild.

Where upstream swallowed problems, we report them: a CHAT/RAG update without a memory id is
INVALID_ARGUMENT (it would be lost), a window whose user message alone exceeds the budget is
INVALID_ARGUMENT (upstream sent it over budget), Redis failures are UNAVAILABLE.

Memory ids: 1 to 200 characters of `A-Z a-z 0-9 . _ : @ / + = -` (the gateway's default is
`mem:<job_id>`, so keys read `mem:mem:<job_id>:events`, as upstream); no spaces, control
characters or glob characters. A caller bound to one tenant may only use its own jobs'
memory (owners.py); another tenant's is NOT_FOUND (MEMORY_NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from cordum.server.context.model import Message, Mode
from cordum.server.context.payload import parse_payload
from cordum.server.context.retrieval import BM25Retriever, Retriever, ScoredChunk
from cordum.server.context.store import MemoryStore
from cordum.server.context.summary import summarize
from cordum.server.context.tokens import TokenCounter, Tokenizers
from cordum.server.context.window import Candidates, OverBudget, assemble
from cordum.server.errors import Violations, invalid_field, not_found, unavailable
from cordum.server.metrics import Metrics
from cordum.server.services.caller import Caller
from cordum.v1 import error_reason_pb2

logger = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_TOKENS = 8000
DEFAULT_MAX_OUTPUT_TOKENS = 1024
MAX_MESSAGE_CHARS = 64 * 1024
TRUNCATED = "\n[truncated]"
# The least a window message costs (4 tokens of framing and at least 1 of content).
MIN_MESSAGE_TOKENS = 5
_MEMORY_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")

# Whether a caller bound to one tenant may use a memory id (owners.py).
Owners = Callable[[str, Caller], Awaitable[bool]]


@dataclass(frozen=True)
class ContextLimits:
    memory_ttl_s: int = 30 * 24 * 3600
    history_turns: int = 200
    max_chunks: int = 500
    rag_top_k: int = 8
    summary_trigger_tokens: int = 2000
    summary_max_tokens: int = 300


@dataclass(frozen=True)
class WindowRequest:
    memory_id: str = ""
    mode: int = Mode.UNSPECIFIED
    model: str = ""
    logical_payload: bytes = b""
    max_input_tokens: int = 0
    max_output_tokens: int = 0


@dataclass(frozen=True)
class BuiltWindow:
    messages: list[Message] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    dropped_messages: int = 0
    tokenizer: str = ""


@dataclass(frozen=True)
class MemoryUpdate:
    memory_id: str = ""
    logical_payload: bytes = b""
    model_response: str = ""
    mode: int = Mode.UNSPECIFIED


def check_memory_id(memory_id: str, problems: Violations) -> None:
    if memory_id and not _MEMORY_ID.fullmatch(memory_id):
        problems.add(
            "memory_id",
            "must be 1-200 characters of letters, digits and . _ : @ / + = -",
        )


def check_mode(mode: int, problems: Violations) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        problems.add("mode", f"unknown context mode {mode}")
        return Mode.UNSPECIFIED


def clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - len(TRUNCATED)] + TRUNCATED


@asynccontextmanager
async def _memory_io() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as error:
        raise unavailable(f"memory store unavailable: {error}") from error


class ContextEngine:
    def __init__(
        self,
        store: MemoryStore,
        *,
        limits: ContextLimits | None = None,
        tokenizers: Tokenizers | None = None,
        retriever: Retriever | None = None,
        owners: Owners | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._owners = owners
        self.limits = limits or ContextLimits()
        self.tokenizers = tokenizers or Tokenizers()
        self.retriever: Retriever = retriever or BM25Retriever()
        self._clock = clock

    async def counter(self, model: str) -> TokenCounter:
        if not self.tokenizers.loaded:
            # The first load parses the BPE file (~0.3 s): not on the event loop.
            return await asyncio.to_thread(self.tokenizers.for_model, model)
        return self.tokenizers.for_model(model)

    async def _check_owner(self, memory_id: str, caller: Caller) -> None:
        if not memory_id or caller.tenant is None:
            return
        if self._owners is None or not await self._owners(memory_id, caller):
            # Another tenant's memory is indistinguishable from a missing one.
            raise not_found(
                error_reason_pb2.ERROR_REASON_MEMORY_NOT_FOUND, f"memory {memory_id} not found"
            )

    async def build_window(self, request: WindowRequest, caller: Caller) -> BuiltWindow:
        problems = Violations()
        check_memory_id(request.memory_id, problems)
        mode = check_mode(request.mode, problems)
        if request.max_input_tokens < 0:
            problems.add("max_input_tokens", "must not be negative (0 means 8000)")
        if request.max_output_tokens < 0:
            problems.add("max_output_tokens", "must not be negative (0 means 1024)")
        problems.raise_if_any()
        budget = request.max_input_tokens or DEFAULT_MAX_INPUT_TOKENS
        payload = parse_payload(request.logical_payload)
        counter = await self.counter(request.model)

        candidates = Candidates(user=payload.message)
        if mode in (Mode.CHAT, Mode.RAG) and request.memory_id:
            await self._check_owner(request.memory_id, caller)
            rag = mode is Mode.RAG
            history_limit = min(2 * self.limits.history_turns, budget // MIN_MESSAGE_TOKENS + 1)
            async with _memory_io():
                memory = await self.store.read(
                    request.memory_id,
                    history_limit=history_limit,
                    rag=rag,
                    max_chunks=self.limits.max_chunks,
                )
            chunks: list[ScoredChunk] = []
            if rag and memory.chunks:
                by_path = [c for c in memory.chunks if c.matches_path(payload.file_path)]
                others = [c for c in memory.chunks if not c.matches_path(payload.file_path)]
                ranked = await self.retriever.rank(payload.message, others)
                chunks = [ScoredChunk(c, 0.0, by_path=True) for c in by_path]
                chunks += ranked[: self.limits.rag_top_k]
            candidates = Candidates(
                user=payload.message,
                history=memory.history,
                history_total=memory.history_total,
                summary=memory.summary if rag else "",
                chunks=chunks,
            )
        try:
            window = await asyncio.to_thread(assemble, candidates, counter, budget)
        except OverBudget as error:
            raise invalid_field(
                "logical_payload",
                f"the current message alone needs {error.needed} tokens ({counter.name}), "
                f"more than max_input_tokens ({budget})",
            ) from None
        logger.debug(
            "context window built",
            extra={
                "memory_id": request.memory_id,
                "mode": mode.name,
                "tokenizer": counter.name,
                "input_tokens": window.input_tokens,
                "dropped": window.dropped,
                "principal": caller.principal,
            },
        )
        if self.metrics is not None:
            self.metrics.context_builds.labels(mode.name).inc()
            self.metrics.context_tokens.labels(mode.name).observe(window.input_tokens)
            if window.dropped:
                self.metrics.context_dropped.labels(mode.name).inc(window.dropped)
        return BuiltWindow(
            messages=window.messages,
            input_tokens=window.input_tokens,
            output_tokens=request.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS,
            dropped_messages=window.dropped,
            tokenizer=counter.name,
        )

    async def update_memory(self, update: MemoryUpdate, caller: Caller) -> None:
        problems = Violations()
        check_memory_id(update.memory_id, problems)
        mode = check_mode(update.mode, problems)
        if mode in (Mode.CHAT, Mode.RAG) and not update.memory_id:
            problems.add("memory_id", "required to update memory in CHAT and RAG modes")
        problems.raise_if_any()
        if mode not in (Mode.CHAT, Mode.RAG):
            return  # RAW keeps no memory (upstream's rule)
        payload = parse_payload(update.logical_payload)
        entries = [
            Message(role, clip(content))
            for role, content in (
                ("user", payload.message),
                ("assistant", update.model_response.strip()),
            )
            if content
        ]
        if not entries:
            return
        await self._check_owner(update.memory_id, caller)
        limits = self.limits
        async with _memory_io():
            _, size = await self.store.append(
                update.memory_id,
                entries,
                keep=2 * limits.history_turns,
                ttl_s=limits.memory_ttl_s,
                now=int(self._clock()),
            )
            await self.store.touch(
                update.memory_id, ttl_s=limits.memory_ttl_s, max_chunks=limits.max_chunks
            )
            # A token is at least one byte: a history this small cannot be over the trigger.
            if size > limits.summary_trigger_tokens:
                await self._refresh_summary(update.memory_id)
        if self.metrics is not None:
            self.metrics.context_memory_updates.labels(mode.name).inc()

    async def _refresh_summary(self, memory_id: str) -> None:
        history, previous = await self.store.history_and_summary(memory_id)
        counter = await self.counter("")
        limits = self.limits

        def build() -> str | None:
            tokens = sum(counter.tokens(m.content) for m in history)
            if tokens <= limits.summary_trigger_tokens:
                return None
            return summarize(
                previous, history, max_tokens=limits.summary_max_tokens, count=counter.tokens
            )

        text = await asyncio.to_thread(build)
        if text and text != previous:
            await self.store.write_summary(memory_id, text, ttl_s=limits.memory_ttl_s)
