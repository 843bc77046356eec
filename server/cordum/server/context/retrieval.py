"""Chunks and the retrieval that picks the ones relevant to a request (RAG mode).

Chunks keep upstream's layout (written by workers and upstream tools, never by us):
`mem:<memory_id>:chunks` is a SET of chunk keys, each `mem:<memory_id>:chunk:<n>` a JSON
string `{path, language, bytes, loc, content}`.

`Retriever` is the seam for an embedding backend; the default is `BM25Retriever`: Okapi BM25
(k1 = 1.2, b = 0.75, Lucene's non-negative idf) over the terms of each chunk's path and
content, computed per request over the memory's chunks (their number is capped by the engine),
so there is no index to keep in step with the writers. Terms are lower-cased words without
English stop words, lightly stemmed (`parsed`, `parses`, `parsing` → `pars`; `retries`,
`retry` → `retri`); an identifier also yields its parts (`parse_config`, `parseConfig` →
`parse`, `config`), so a question in prose finds code. Chunks sharing no term with the query
score 0 and are left out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Chunk:
    key: str
    path: str = ""
    language: str = ""
    bytes: int = 0
    loc: int = 0
    content: str = ""

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> Chunk | None:
        """The chunk stored at `key`, or None when it is not a JSON object."""
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None

        def text(name: str) -> str:
            value = doc.get(name)
            return value if isinstance(value, str) else ""

        def number(name: str) -> int:
            value = doc.get(name)
            return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0

        return cls(
            key=key,
            path=text("path"),
            language=text("language"),
            bytes=number("bytes"),
            loc=number("loc"),
            content=text("content"),
        )

    def message(self) -> str:
        """The system message that carries this chunk into a window (upstream's wording)."""
        if self.content:
            return f"Context from {self.path}:\n{self.content}"
        return (
            f"Context from {self.path}: language={self.language or 'unknown'}, "
            f"bytes={self.bytes}, loc={self.loc} (content not stored)"
        )

    def matches_path(self, file_path: str) -> bool:
        """Upstream's rule: either path contains the other."""
        return bool(file_path and self.path) and (file_path in self.path or self.path in file_path)


@dataclass(frozen=True)
class ScoredChunk:
    chunk: Chunk
    score: float
    # Picked because its path matches the request's `file_path` (ranked before the others).
    by_path: bool = False


class Retriever(Protocol):
    async def rank(self, query: str, chunks: Sequence[Chunk]) -> list[ScoredChunk]:
        """The chunks relevant to `query`, best first; irrelevant ones left out."""
        ...


_WORD = re.compile(r"\w+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# English stop words; a string split is easier to read than a list of 130 literals.
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just let me more most my no nor not now of off on once only or other our ours
    out over own same she should so some such than that the their theirs them then there these
    they this those through to too under until up very was we were what when where which while
    who whom why will with would yes you your yours yourself
    """.split()  # noqa: SIM905
)
_SUFFIXES = ("ing", "ed", "es", "e", "s")


def stem(word: str) -> str:
    """A light suffix strip, enough for `parsed`/`parse` and `retries`/`retry` to meet."""
    if word.endswith("y") and len(word) > 3:
        return word[:-1] + "i"
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


@functools.lru_cache(maxsize=65536)
def _word_terms(word: str) -> tuple[str, ...]:
    parts = [p for piece in word.split("_") for p in (_CAMEL.findall(piece) or [piece])]
    words = [p.lower() for p in parts] if len(parts) > 1 else []
    words.append(word.lower())
    return tuple(stem(w) for w in words if w not in STOP_WORDS)


def terms(text: str) -> list[str]:
    """Stemmed lower-case words (stop words left out), plus the parts of identifiers
    (snake_case, camelCase, digits)."""
    out: list[str] = []
    for word in _WORD.findall(text):
        # Words repeat (code above all): each distinct one is split and stemmed once.
        out.extend(_word_terms(word))
    return out


def bm25_scores(
    query: Sequence[str], docs: Sequence[Sequence[str]], *, k1: float = 1.2, b: float = 0.75
) -> list[float]:
    """Okapi BM25 of each document (a list of terms) for the query's distinct terms."""
    wanted = set(query)
    counts = [Counter(t for t in doc if t in wanted) for doc in docs]
    return _bm25(wanted, counts, [len(doc) for doc in docs], k1=k1, b=b)


def _query_counts(text: str, wanted: set[str]) -> tuple[Counter[str], int]:
    """(frequencies of the wanted terms, number of terms) of a text, without building its
    term list: each distinct word is split and stemmed once (cached), then weighed by its
    count. Several times faster than `terms` on code."""
    frequencies: Counter[str] = Counter()
    length = 0
    for word, n in Counter(_WORD.findall(text)).items():
        word_terms = _word_terms(word)
        length += n * len(word_terms)
        for term in word_terms:
            if term in wanted:
                frequencies[term] += n
    return frequencies, length


def _bm25(
    wanted: set[str],
    counts: Sequence[Counter[str]],
    lengths: Sequence[int],
    *,
    k1: float,
    b: float,
) -> list[float]:
    if not counts:
        return []
    n = len(counts)
    average = sum(lengths) / n or 1.0
    idf = {}
    for term in wanted:
        df = sum(1 for c in counts if term in c)
        idf[term] = math.log(1 + (n - df + 0.5) / (df + 0.5))
    scores = []
    for tf, length in zip(counts, lengths, strict=True):
        norm = k1 * (1 - b + b * length / average)
        scores.append(sum(idf[t] * f * (k1 + 1) / (f + norm) for t, f in tf.items()))
    return scores


class BM25Retriever:
    """Lexical retrieval over the chunks given (no index)."""

    def __init__(self, *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b

    def rank_sync(self, query: str, chunks: Sequence[Chunk]) -> list[ScoredChunk]:
        wanted = set(terms(query))
        if not wanted or not chunks:
            return []
        measured = [_query_counts(f"{c.path}\n{c.content}", wanted) for c in chunks]
        scores = _bm25(
            wanted, [m[0] for m in measured], [m[1] for m in measured], k1=self.k1, b=self.b
        )
        ranked = [ScoredChunk(c, s) for c, s in zip(chunks, scores, strict=True) if s > 0]
        # Ties: by key, so the same memory gives the same window.
        ranked.sort(key=lambda sc: (-sc.score, sc.chunk.key))
        return ranked

    async def rank(self, query: str, chunks: Sequence[Chunk]) -> list[ScoredChunk]:
        # Hundreds of chunks take milliseconds of pure Python: keep them off the event loop.
        return await asyncio.to_thread(self.rank_sync, query, chunks)
