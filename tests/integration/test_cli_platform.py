"""`cordumctl lock | artifact | dlq | memory | context` against the session app, each with its
tables, its --json output and a failure path (one red line, exit 1, no traceback).

cordumctl runs as a real subprocess, so the in-process app keeps serving on this test's
event loop while the command talks to it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordum.sdk import AsyncClient, NotFound
from cordum.sdk.convert import state_name
from cordum.server.app import App
from cordum.v1 import dlq_pb2

from support.cli import Cli, Done
from support.jobs import make_worker
from support.waiting import eventually


@pytest.fixture
def cli(cordum: App) -> Cli:
    return Cli(f"127.0.0.1:{cordum.grpc_port}")


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


def ok(done: Done) -> Done:
    assert done.code == 0, (done.stdout, done.stderr)
    return done


def failed(done: Done) -> list[str]:
    """The stderr lines of a command that failed the cordumctl way."""
    assert done.code == 1, (done.stdout, done.stderr)
    lines = done.errors()
    assert lines and lines[0].startswith("cordumctl: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines


# -- lock -------------------------------------------------------------------------------------


async def test_lock_commands(cli: Cli, client: AsyncClient, prefix: str) -> None:
    resource = f"cli/{prefix}/db"
    got = ok(await cli("lock", "acquire", resource, "--owner", "alice", "--ttl-ms", "60000"))
    assert got.stdout.startswith(f"lock {resource} acquired by alice (exclusive, fencing token ")
    token = (await client.locks.get(resource)).fencing_token

    # Held by someone else: the server's reason, one line, exit 1.
    held = failed(await cli("lock", "acquire", resource, "--owner", "bob"))
    assert held == [f"cordumctl: LOCK_HELD: lock '{resource}' is held by someone else"]

    shown = ok(await cli("lock", "get", resource)).stdout
    for text in ("exclusive", "alice", str(token)):
        assert text in shown
    as_json = ok(await cli("lock", "get", resource, "--json")).json()
    assert (as_json["owners"], as_json["fencing_token"]) == ({"alice": 1}, str(token))

    renewed = ok(await cli("lock", "renew", resource, "--owner", "alice", "--json")).json()
    assert renewed["resource"] == resource
    not_held = failed(await cli("lock", "renew", resource, "--owner", "bob"))
    assert not_held[0].startswith("cordumctl: LOCK_NOT_HELD: ")

    # The default owner is the same in every run by this user on this host.
    ok(await cli("lock", "acquire", f"cli/{prefix}/shared", "--shared"))
    listed = ok(await cli("lock", "list", "--prefix", f"cli/{prefix}/", "--json")).json()
    assert [(x["resource"], x["mode"]) for x in listed] == [
        (resource, "exclusive"),
        (f"cli/{prefix}/shared", "shared"),
    ]
    table = ok(await cli("lock", "list", "--prefix", f"cli/{prefix}/")).stdout
    assert resource in table and "shared" in table
    assert ok(await cli("lock", "release", f"cli/{prefix}/shared")).stdout.strip() == (
        f"lock cli/{prefix}/shared released"
    )

    released = ok(await cli("lock", "release", resource, "--owner", "alice")).stdout
    assert released.strip() == f"lock {resource} released"
    missing = failed(await cli("lock", "get", resource))
    assert missing == [f"cordumctl: LOCK_NOT_FOUND: lock '{resource}' not found"]
    bad = failed(await cli("lock", "acquire", resource, "--ttl-ms", "-5"))
    assert bad[1].strip().startswith("ttl_ms: ")


# -- artifact ---------------------------------------------------------------------------------


async def test_artifact_commands(cli: Cli, prefix: str, tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    data = b"".join(f"{n},{n * n}\n".encode() for n in range(60_000))  # ~700 KB: chunks
    source.write_bytes(data)
    put = ok(await cli("artifact", "put", str(source), "--label", f"t={prefix}"))
    ptr = put.stdout.strip()
    assert ptr.startswith("redis://art:")

    head = ok(await cli("artifact", "head", ptr, "--json")).json()
    meta = head["metadata"]
    assert (meta["content_type"], meta["size_bytes"]) == ("text/csv", str(len(data)))
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    shown = ok(await cli("artifact", "head", ptr)).stdout
    assert "text/csv" in shown and f"{len(data)} bytes" in shown and f"t={prefix}" in shown

    target = tmp_path / "back.csv"
    got = ok(await cli("artifact", "get", ptr, "-o", str(target)))
    assert target.read_bytes() == data and "text/csv" in got.stdout
    to_stdout = await cli("artifact", "get", ptr)
    assert to_stdout.code == 0 and to_stdout.stdout.encode() == data

    piped = ok(await cli("artifact", "put", str(source), "--retention", "audit", "--json"))
    assert piped.json()["metadata"]["retention"] == "audit"
    listed = ok(await cli("artifact", "list", "--json", "--limit", "500")).json()
    assert ptr in [a["artifact_ptr"] for a in listed]
    assert ptr in ok(await cli("artifact", "list", "--limit", "500")).stdout

    assert ok(await cli("artifact", "delete", ptr)).stdout.strip() == f"artifact {ptr} deleted"
    missing = failed(await cli("artifact", "get", ptr, "-o", str(tmp_path / "gone.csv")))
    assert missing == [f"cordumctl: ARTIFACT_NOT_FOUND: artifact {ptr} not found"]
    assert not (tmp_path / "gone.csv").exists() and not (tmp_path / "gone.csv.part").exists()
    bad = failed(await cli("artifact", "put", str(source), "--retention", "forever"))
    assert bad[1].strip().startswith("header.retention: must be one of")
    unreadable = failed(await cli("artifact", "put", str(tmp_path / "nope.bin")))
    assert unreadable == [
        f"cordumctl: {tmp_path / 'nope.bin'}: cannot read: No such file or directory"
    ]


# -- dlq --------------------------------------------------------------------------------------


async def denied(client: AsyncClient, topic: str) -> str:
    submitted = await client.jobs.submit(topic=topic, prompt="x")

    async def entry() -> dlq_pb2.DLQEntry | None:
        try:
            return await client.dlq.get(submitted.job_id)
        except NotFound:
            return None

    await eventually(entry, within=20.0, what=f"dlq entry of {submitted.job_id}")
    return submitted.job_id


async def test_dlq_commands(cli: Cli, client: AsyncClient, prefix: str) -> None:
    topic = f"job.t.deny.{prefix}"
    job_id = await denied(client, topic)

    listed = ok(await cli("dlq", "list", "--topic", topic, "--json")).json()
    assert [(e["job_id"], e["reason_code"]) for e in listed] == [(job_id, "safety_denied")]
    table = ok(await cli("dlq", "list", "--topic", topic)).stdout
    for text in (job_id, "DENIED", "safety_denied", "denied by the test policy"):
        assert text in table
    none = ok(await cli("dlq", "list", "--topic", topic, "--reason-code", "other", "--json"))
    assert none.json() == []

    shown = ok(await cli("dlq", "get", job_id)).stdout
    assert topic in shown and "denied by the test policy" in shown
    assert ok(await cli("dlq", "get", job_id, "--json")).json()["status"] == "JOB_STATUS_DENIED"

    retry_id = ok(await cli("dlq", "retry", job_id)).stdout.strip()
    assert retry_id == f"{job_id}-retry-1"
    assert (await client.jobs.get(retry_id)).parent_job_id == job_id
    again = ok(await cli("dlq", "retry", job_id, "--json")).json()
    assert again["job_id"] == f"{job_id}-retry-2"
    assert retry_id in ok(await cli("dlq", "get", job_id)).stdout

    assert ok(await cli("dlq", "delete", job_id)).stdout.strip() == f"dlq entry {job_id} deleted"
    missing = failed(await cli("dlq", "get", job_id))
    assert missing == [f"cordumctl: DLQ_ENTRY_NOT_FOUND: dlq entry {job_id} not found"]
    bad = failed(await cli("dlq", "retry", "has spaces"))
    assert bad[1].strip().startswith("job_id: ")


# -- memory -----------------------------------------------------------------------------------


async def test_memory_get(
    cli: Cli, client: AsyncClient, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.mem.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def answer(ctx: Any, data: Any) -> Any:
        return {"answer": 42}

    async with worker:
        outcome = await client.jobs.run(topic=topic, input={"q": "life"}, timeout=20)
    assert state_name(outcome.job.state) == "SUCCEEDED"
    job_id = outcome.job.id

    result = ok(await cli("memory", "get", f"redis://res:{job_id}"))
    assert result.json() == {"answer": 42}
    assert result.errors()[0].startswith(f"res:{job_id} (result, string, ")
    assert ok(await cli("memory", "get", f"ctx:{job_id}")).json() == {"q": "life"}
    raw = ok(await cli("memory", "get", f"ctx:{job_id}", "--json")).json()
    assert (raw["kind"], raw["json"]) == ("context", {"q": "life"})

    await client.context.update_memory(f"m-{prefix}", "hello", model_response="hi there")
    events = ok(await cli("memory", "get", f"mem:m-{prefix}:events")).json()
    assert [e["content"] for e in events] == ["hello", "hi there"]
    assert "2 entries" in ok(await cli("memory", "get", f"mem:m-{prefix}:events")).stderr

    missing = failed(await cli("memory", "get", f"redis://res:never-{prefix}"))
    assert missing[0].startswith("cordumctl: MEMORY_NOT_FOUND: ")
    bad = failed(await cli("memory", "get", "nonsense"))
    assert bad[1].strip().startswith("key: ")


# -- context ----------------------------------------------------------------------------------


async def test_context_build_and_update(cli: Cli, prefix: str, tmp_path: Path) -> None:
    memory_id = f"cli-{prefix}"
    updated = ok(
        await cli(
            "context", "update", memory_id, "-p", '{"prompt": "capital of France?"}', "-r", "Paris"
        )
    )
    assert updated.stdout.strip() == f"memory {memory_id} updated"
    question = tmp_path / "q.json"
    question.write_text('{"prompt": "and Spain?"}')
    table = ok(await cli("context", "build", memory_id, "-p", f"@{question}")).stdout
    for text in ("capital of France?", "Paris", "and Spain?", "input tokens", "left out"):
        assert text in table

    window = ok(
        await cli(
            "context", "build", memory_id, "-p", "and Spain?", "--max-output-tokens", "64", "--json"
        )
    ).json()
    assert [(m["role"], m["content"]) for m in window["messages"]] == [
        ("user", "capital of France?"),
        ("assistant", "Paris"),
        ("user", "and Spain?"),
    ]
    assert window["output_tokens"] == 64
    raw = ok(await cli("context", "build", memory_id, "-p", "solo", "--mode", "raw", "--json"))
    assert [m["content"] for m in raw.json()["messages"]] == ["solo"]

    mode = failed(await cli("context", "build", memory_id, "-p", "x", "--mode", "telepathy"))
    assert mode == ["cordumctl: --mode: unknown context mode 'telepathy' (one of: raw, chat, rag)"]
    bad = failed(await cli("context", "build", "has space", "-p", "x", "--max-input-tokens", "-1"))
    assert {line.strip().split(":")[0] for line in bad[1:]} == {"memory_id", "max_input_tokens"}
