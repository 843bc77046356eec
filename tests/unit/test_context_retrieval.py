"""Chunks and BM25 retrieval."""

from __future__ import annotations

import json

import pytest

from cordum.server.context.retrieval import BM25Retriever, Chunk, bm25_scores, stem, terms
from cordum.server.context.store import MemoryKeys

CHUNKS = [
    Chunk("mem:m:chunk:0", "src/config.py", "python", content="def parse_config(path): ..."),
    Chunk("mem:m:chunk:1", "src/retry.py", "python", content="def backoff(attempt): sleep"),
    Chunk("mem:m:chunk:2", "README.md", "markdown", content="Install with pip. Run the tests."),
    Chunk("mem:m:chunk:3", "src/net.py", "python", content="class HTTPServer: listens on a port"),
]


def ranked_keys(query: str, chunks: list[Chunk] = CHUNKS) -> list[str]:
    return [s.chunk.key for s in BM25Retriever().rank_sync(query, chunks)]


def test_terms_split_identifiers_stem_and_drop_stop_words() -> None:
    assert terms("The parseConfig of HTTPServer") == [
        "pars",
        "config",
        "parseconfig",
        "http",
        "server",
        "httpserver",
    ]
    assert terms("parse_config") == ["pars", "config", "parse_config"]
    assert stem("parsed") == stem("parses") == stem("parsing") == stem("parse") == "pars"
    assert stem("retries") == stem("retry") == "retri"


def test_the_relevant_chunk_ranks_first() -> None:
    assert ranked_keys("how is the config parsed?")[0] == "mem:m:chunk:0"
    assert ranked_keys("what does the http server listen on")[0] == "mem:m:chunk:3"
    assert ranked_keys("backoff between attempts")[0] == "mem:m:chunk:1"


def test_chunks_sharing_no_term_are_left_out() -> None:
    assert ranked_keys("backoff") == ["mem:m:chunk:1"]
    assert ranked_keys("the of and") == []
    assert ranked_keys("anything", []) == []


def test_rarer_terms_weigh_more() -> None:
    docs = [["common", "rare"], ["common"], ["common"], ["common"]]
    scores = bm25_scores(["common", "rare"], docs)
    assert scores[0] > scores[1] == scores[2] == scores[3] > 0


def test_longer_documents_are_normalised() -> None:
    short, long_ = ["config", "x"], ["config"] + ["filler"] * 50
    scores = bm25_scores(["config"], [short, long_])
    assert scores[0] > scores[1]


def test_ties_rank_by_key() -> None:
    chunks = [Chunk("mem:m:chunk:b", content="deploy"), Chunk("mem:m:chunk:a", content="deploy")]
    assert ranked_keys("deploy", chunks) == ["mem:m:chunk:a", "mem:m:chunk:b"]


async def test_the_async_rank_matches() -> None:
    ranked = await BM25Retriever().rank("config parsing", CHUNKS)
    assert ranked[0].chunk.key == "mem:m:chunk:0"


def test_chunk_json_and_message() -> None:
    raw = json.dumps({"path": "a.py", "language": "python", "bytes": 10, "loc": 2, "content": "x"})
    chunk = Chunk.from_json("mem:m:chunk:0", raw)
    assert chunk == Chunk("mem:m:chunk:0", "a.py", "python", 10, 2, "x")
    assert chunk.message() == "Context from a.py:\nx"
    meta = Chunk.from_json("k", json.dumps({"path": "b.bin", "bytes": 5}))
    assert meta is not None
    assert meta.message() == (
        "Context from b.bin: language=unknown, bytes=5, loc=0 (content not stored)"
    )
    assert Chunk.from_json("k", "not json") is None
    assert Chunk.from_json("k", "[1]") is None


@pytest.mark.parametrize(
    ("path", "file_path", "matches"),
    [
        ("src/a.py", "a.py", True),
        ("a.py", "/repo/src/a.py", True),
        ("src/b.py", "a.py", False),
        ("", "a.py", False),
        ("a.py", "", False),
    ],
)
def test_path_matching_is_upstreams(path: str, file_path: str, matches: bool) -> None:
    assert Chunk("k", path).matches_path(file_path) is matches


@pytest.mark.parametrize(
    ("member", "belongs"),
    [
        ("mem:m:chunk:0", True),
        ("mem:m:chunk:abc", True),
        ("mem:m:chunk:", False),
        ("mem:m:events", False),
        ("mem:m:chunk:0:events", False),
        ("mem:other:chunk:0", False),
        ("ctx:job-1", False),
    ],
)
def test_a_chunk_set_may_only_name_its_own_chunks(member: str, belongs: bool) -> None:
    assert MemoryKeys("m").is_chunk(member) is belongs
