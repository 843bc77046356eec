"""`cordumctl workflow | run | config | policy | schema` against running apps.

cordumctl runs as a real subprocess (asyncio.create_subprocess_exec), so the in-process app
keeps serving on this test's event loop while the command talks to it. Policy
administration and config reload run against an app of their own (they change what a whole
namespace enforces)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordum.sdk import AsyncClient
from cordum.sdk.convert import run_status_name
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import run_pb2

from support.admin import own_app
from support.cli import Cli, Done, plain
from support.examples import HELLO, REVIEW, example_worker
from support.waiting import eventually


@pytest.fixture
def cli(cordum: App) -> Cli:
    return Cli(f"127.0.0.1:{cordum.grpc_port}")


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


@pytest_asyncio.fixture
async def worker(nats_url: str, redis_url: str) -> AsyncIterator[Worker]:
    async with example_worker(nats_url, redis_url) as running:
        yield running


def gated(wf_id: str) -> dict[str, Any]:
    return {
        "id": wf_id,
        "steps": {
            "first": {"type": "notify", "input": {"message": "hi"}},
            "gate": {"type": "approval", "depends_on": ["first"]},
            "last": {"type": "notify", "depends_on": ["gate"]},
        },
    }


def write(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else str(data))
    return str(path)


def ok(done: Done) -> Done:
    assert done.code == 0, (done.stdout, done.stderr)
    return done


def failed(done: Done) -> list[str]:
    """The stderr lines of a command that failed the cordumctl way: exit 1, one red line
    first (plus indented field violations), no traceback."""
    assert done.code == 1, (done.stdout, done.stderr)
    lines = done.errors()
    assert lines and lines[0].startswith("cordumctl: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines


async def status_of(client: AsyncClient, run_id: str, name: str) -> run_pb2.Run:
    async def get() -> run_pb2.Run:
        return await client.runs.get(run_id)

    return await eventually(
        get, until=lambda r: run_status_name(r.status) == name, what=f"{run_id} {name}"
    )


# -- workflow ---------------------------------------------------------------------------------


async def test_workflow_create_get_list_validate_delete(
    cli: Cli, prefix: str, tmp_path: Path
) -> None:
    created = ok(await cli("workflow", "create", "--file", str(HELLO)))
    assert created.stdout.startswith("workflow hello saved (revision ")
    assert created.stdout.rstrip().endswith(", 4 steps)")
    shown = ok(await cli("workflow", "get", "hello"))
    for text in ("Hello, workflows", "greet", "loud", "shout", "done", "job.echo", "notify"):
        assert text in shown.stdout
    as_json = ok(await cli("workflow", "get", "hello", "--json")).json()
    # protojson with the proto's field names, as the REST API has them.
    assert as_json["steps"]["shout"]["depends_on"] == ["loud"]
    assert as_json["input_schema"]["additionalProperties"] is False

    valid = ok(await cli("workflow", "validate", "-f", str(REVIEW)))
    assert valid.stdout.strip() == "workflow review is valid (6 steps)"

    mine = tmp_path / "mine.yaml"
    mine.write_text(
        f"id: cli-{prefix}\nsteps:\n  a: {{type: notify}}\n  b: {{type: delay, delay_sec: 1}}\n"
    )
    ok(await cli("workflow", "create", "-f", str(mine)))
    listed = ok(await cli("workflow", "list", "--json")).json()
    assert {f"cli-{prefix}", "hello"} <= {w["id"] for w in listed}
    assert f"cli-{prefix}" in ok(await cli("workflow", "list")).stdout
    assert ok(await cli("workflow", "delete", f"cli-{prefix}")).stdout.strip() == (
        f"workflow cli-{prefix} deleted"
    )
    missing = failed(await cli("workflow", "get", f"cli-{prefix}"))
    assert missing == [f"cordumctl: WORKFLOW_NOT_FOUND: workflow cli-{prefix} not found"]


async def test_a_bad_definition_is_refused_listing_every_field_violation(
    cli: Cli, prefix: str, tmp_path: Path
) -> None:
    bad = write(
        tmp_path / "bad.json",
        {
            "id": f"cli-bad-{prefix}",
            "steps": {
                "a": {"topic": "job.x", "depends_on": ["nowhere"]},
                "b": {"type": "teleport"},
                "c": {"type": "condition", "condition": "input.n >"},
            },
        },
    )
    refused = failed(await cli("workflow", "create", "--file", bad))
    assert refused[0].startswith(
        "cordumctl: WORKFLOW_INVALID: the workflow is invalid (3 problems): "
    )
    violations = dict(line.strip().split(": ", 1) for line in refused[1:])
    assert set(violations) == {"steps.a.depends_on[0]", "steps.b.type", "steps.c.condition"}
    assert violations["steps.a.depends_on[0]"] == "no step 'nowhere' in this workflow"
    assert all(line.startswith("  ") for line in refused[1:])

    checked = failed(await cli("workflow", "validate", "--file", bad))
    assert checked[0] == f"cordumctl: workflow cli-bad-{prefix} is invalid (3 problems)"
    assert {line.split(":")[0].strip() for line in checked[1:]} == set(violations)
    report = await cli("workflow", "validate", "--file", bad, "--json")
    assert report.code == 1 and report.json()["valid"] is False
    assert len(report.json()["problems"]) == 3

    # Problems found before the server is asked: one line each.
    unknown = write(tmp_path / "unknown.json", {"id": "x", "steps": {"a": {"dependson": []}}})
    assert "dependson" in failed(await cli("workflow", "create", "-f", unknown))[0]
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: [unclosed\n")
    line = failed(await cli("workflow", "create", "-f", str(broken)))
    assert line[0].startswith(f"cordumctl: --file: {broken}: not valid YAML") and len(line) == 1
    nowhere = failed(await cli("workflow", "create", "-f", str(tmp_path / "none.json")))
    assert nowhere == [
        f"cordumctl: --file: cannot read {tmp_path / 'none.json'}: No such file or directory"
    ]


# -- run --------------------------------------------------------------------------------------


async def test_run_start_wait_shows_the_steps_and_prints_the_output(
    cli: Cli, worker: Worker
) -> None:
    ok(await cli("workflow", "create", "--file", str(HELLO)))
    done = ok(await cli("run", "start", "hello", "--wait", "--timeout", "30"))
    assert done.json() == {"done": {"level": "INFO", "message": "shouted: Hello, world!"}}
    # The steps view went to stderr (its final state, as stderr is not a terminal here).
    view = plain(done.stderr)
    assert "workflow hello" in view and "SUCCEEDED" in view
    for step in ("greet", "loud", "shout", "done"):
        assert any(row.split()[:2] == [step, "SUCCEEDED"] for row in _rows(view)), view

    quiet = ok(
        await cli(
            "run", "start", "hello", "--input", '{"name": "Ada", "quiet": true}',
            "--wait", "--json", "--label", "via=cli",
        )
    )  # fmt: skip
    run = quiet.json()
    assert run["status"] == "RUN_STATUS_SUCCEEDED" and run["labels"] == {"via": "cli"}
    assert run["steps"]["shout"]["status"] == "STEP_STATUS_SKIPPED"
    assert run["steps"]["done"]["output"]["message"] == "said: Hello, Ada!"

    # The README's job example, against the same worker.
    job = ok(await cli("job", "submit", "--topic", "job.echo", "--prompt", "hi", "--wait"))
    assert job.json()["echo"]["prompt"] == "hi"


async def test_run_start_wait_of_a_failing_run_exits_1_naming_the_step(
    cli: Cli, worker: Worker, prefix: str, tmp_path: Path
) -> None:
    flow = write(
        tmp_path / "fail.json",
        {
            "id": f"cli-fail-{prefix}",
            "steps": {
                "explode": {
                    "topic": "job.fail",
                    "input": {"public": True, "message": "asked to fail"},
                }
            },
        },
    )
    ok(await cli("workflow", "create", "-f", flow))
    done = await cli("run", "start", f"cli-fail-{prefix}", "--wait", "--timeout", "30")
    assert done.code == 1 and done.stdout == ""
    # stderr: the steps view as the run ended, then the one red line.
    *view, last = plain(done.stderr).splitlines()
    assert last.startswith("cordumctl: run ")
    assert "ended FAILED: step explode" in last and last.endswith("asked to fail")
    explode = next(r for r in _rows("\n".join(view)) if r.split()[0] == "explode")
    assert explode.split()[1] == "FAILED" and "asked to fail" in explode


async def test_run_watch_is_a_live_view_of_the_steps(
    cli: Cli, client: AsyncClient, worker: Worker
) -> None:
    ok(await cli("workflow", "create", "--file", str(REVIEW)))
    run_id = ok(
        await cli("run", "start", "review", "--input", '{"items": ["a", "b", "c"], "seconds": 0.1}')
    ).stdout.strip()
    # As if on a terminal: the view is redrawn in place as the run moves on.
    watching = await cli.start("run", "watch", run_id, env={"TTY_COMPATIBLE": "1"})
    await status_of(client, run_id, "WAITING")
    await eventually(
        watching.so_far,
        until=lambda text: "awaiting approval" in text,
        within=15,
        what="the live view to show the approval request",
    )
    approved = ok(await cli("run", "approve", run_id, "sign_off", "--reason", "ok"))
    assert approved.stdout.startswith(f"step sign_off of run {run_id} approved; run now ")
    done = ok(await watching.finish())
    assert "\x1b[" in done.stdout  # drawn with cursor moves, not printed once
    frames = plain(done.stdout).split(f"run {run_id}  workflow review  ")
    assert len(frames) > 2, done.stdout
    first_waiting = next(i for i, f in enumerate(frames) if f.startswith("WAITING"))
    assert "awaiting approval" in frames[first_waiting]
    last = frames[-1]
    assert last.startswith("SUCCEEDED") and "awaiting approval" not in last
    rows = {row.split()[0]: row.split()[1] for row in _rows(last)}
    assert rows["check"] == rows["check[0]"] == rows["check[2]"] == "SUCCEEDED"
    assert rows["sign_off"] == rows["cool_off"] == rows["announce"] == "SUCCEEDED"
    job_row = next(r for r in _rows(last) if r.split()[0] == "check[1]")
    assert f"{run_id}:check[1]@" in job_row  # the step's job id

    # Not a terminal (a pipe): the final view, printed once.
    again = ok(await cli("run", "watch", run_id))
    assert "\x1b[" not in again.stdout
    assert again.stdout.count(f"run {run_id}") == 1 and "SUCCEEDED" in again.stdout
    lines = ok(await cli("run", "watch", run_id, "--json")).lines()
    updates = [json.loads(line) for line in lines]
    assert [int(u["event"]["seq"]) for u in updates] == list(range(1, len(updates) + 1))
    assert updates[-1]["run"]["status"] == "RUN_STATUS_SUCCEEDED"


async def test_run_get_list_timeline_reject_rerun_cancel_delete(
    cli: Cli, client: AsyncClient, prefix: str, tmp_path: Path
) -> None:
    wf_id = f"cli-runs-{prefix}"
    ok(await cli("workflow", "create", "-f", write(tmp_path / "gated.json", gated(wf_id))))
    first = ok(await cli("run", "start", wf_id, "--idempotency-key", f"k-{prefix}")).stdout.strip()
    replay = ok(await cli("run", "start", wf_id, "--idempotency-key", f"k-{prefix}", "--json"))
    assert replay.json()["run_id"] == first and replay.json()["idempotent_replay"] is True
    await status_of(client, first, "WAITING")

    shown = ok(await cli("run", "get", first))
    gate = next(r for r in _rows(shown.stdout) if r.split()[0] == "gate")
    assert "WAITING" in gate and "awaiting approval" in gate
    assert ok(await cli("run", "get", first, "--json")).json()["id"] == first
    listed = ok(await cli("run", "list", "--workflow", wf_id))
    assert first in listed.stdout and "WAITING" in listed.stdout
    assert [
        r["id"] for r in ok(await cli("run", "list", "--workflow", wf_id, "--json")).json()
    ] == [first]

    rejected = ok(await cli("run", "reject", first, "gate", "--reason", "not now"))
    assert rejected.stdout.strip() == f"step gate of run {first} rejected; run now FAILED"
    timeline = ok(await cli("run", "timeline", first)).stdout
    for kind in ("run_created", "step_waiting", "step_rejected"):
        assert kind in timeline
    events = ok(await cli("run", "timeline", first, "--json")).json()
    assert events[0]["type"] == "run_created" and events[0]["seq"] == "1"

    second = ok(await cli("run", "rerun", first, "--from-step", "gate")).stdout.strip()
    assert second != first
    await status_of(client, second, "WAITING")
    cancelled = ok(await cli("run", "cancel", second, "--reason", "enough"))
    assert cancelled.stdout.strip() == f"run {second} CANCELLED"
    dry = ok(await cli("run", "rerun", first, "--dry-run", "--wait", "--json")).json()
    assert dry["dry_run"] is True and dry["status"] == "RUN_STATUS_SUCCEEDED"

    assert ok(await cli("run", "delete", second)).stdout.strip() == f"run {second} deleted"
    assert failed(await cli("run", "get", second)) == [
        f"cordumctl: RUN_NOT_FOUND: run {second} not found"
    ]
    late = failed(await cli("run", "approve", first, "gate"))
    assert late[0].startswith("cordumctl: RUN_TERMINAL: ")


async def test_run_start_errors_are_one_line_with_field_violations(cli: Cli, prefix: str) -> None:
    ok(await cli("workflow", "create", "--file", str(HELLO)))
    assert failed(await cli("run", "start", "hello", "--input", "[1]")) == [
        "cordumctl: --input: expected a JSON object, got list"
    ]
    assert failed(await cli("run", "start", "hello", "--input", "{nope"))[0].startswith(
        "cordumctl: --input: not valid JSON"
    )
    schema = failed(await cli("run", "start", "hello", "--input", '{"name": 3, "x": 1}'))
    assert schema[0].startswith("cordumctl: SCHEMA_VALIDATION_FAILED: ")
    assert {line.split(":")[0].strip() for line in schema[1:]} == {"input", "input.name"}
    assert failed(await cli("run", "start", f"nope-{prefix}")) == [
        f"cordumctl: WORKFLOW_NOT_FOUND: workflow nope-{prefix} not found"
    ]
    labels = failed(await cli("run", "start", "hello", "--label", "novalue"))
    assert labels == ["cordumctl: --label: expected key=value, got 'novalue'"]


# -- config, policy, schema -------------------------------------------------------------------


async def test_config_get_set_effective(cli: Cli, prefix: str) -> None:
    org = f"org-{prefix}"
    assert ok(
        await cli("config", "set", "org", org, "--data", '{"a": {"b": 1}}')
    ).stdout.strip() == (f"org/{org} revision 1")
    got = ok(await cli("config", "get", "org", org))
    assert got.json() == {"a": {"b": 1}}
    assert f"org/{org} revision 1" in got.stderr
    doc = ok(await cli("config", "get", "org", org, "--json")).json()
    assert (doc["scope"], doc["revision"]) == ("org", "1")
    stale = failed(
        await cli("config", "set", "org", org, "--data", "{}", "--expected-revision", "7")
    )
    assert stale[0].startswith("cordumctl: REVISION_MISMATCH: ")
    ok(
        await cli(
            "config", "set", "org", org, "--data", '{"a": {"c": 2}}', "--expected-revision", "1",
            "--meta", "why=test",
        )
    )  # fmt: skip
    merged = ok(await cli("config", "effective", "--org", org))
    assert merged.json()["a"] == {"c": 2}
    assert "version " in merged.stderr and "hash " in merged.stderr
    bad = failed(await cli("config", "set", "galaxy", "x", "--data", "{}"))
    assert bad[0].startswith("cordumctl: ") and any("scope" in line for line in bad[1:])


async def test_policy_evaluate_simulate_explain(cli: Cli, prefix: str) -> None:
    denied = ok(await cli("policy", "evaluate", "--topic", f"job.t.deny.{prefix}"))
    assert denied.stdout.startswith("DENY  rule deny-rule  denied by the test policy")
    cel = ok(
        await cli(
            "policy", "simulate", "--topic", f"job.t.cel.{prefix}", "--label", "risk=high",
            "--json",
        )
    ).json()  # fmt: skip
    assert (cel["decision"], cel["rule_id"]) == ("DECISION_TYPE_DENY", "cel-rule")
    explained = ok(await cli("policy", "explain", "--topic", f"job.t.approve.{prefix}"))
    assert explained.stdout.startswith("REQUIRE_HUMAN  rule approve-rule")
    row = next(r for r in _rows(explained.stdout) if r.split()[0] == "approve-rule")
    assert "yes" in row.split()
    request = json.dumps({"topic": f"job.t.deny.{prefix}", "labels": {"a": "b"}})
    assert ok(await cli("policy", "simulate", "--request", request)).stdout.startswith("DENY")
    assert failed(await cli("policy", "evaluate")) == [
        "cordumctl: --topic: required (or a topic in --request)"
    ]
    assert "deny-rule" in ok(await cli("policy", "rules")).stdout
    assert ok(await cli("policy", "snapshots")).stdout.strip()


async def test_policy_administration(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str, tmp_path: Path
) -> None:
    bundle = f"secops/cli-{prefix}"
    topic = f"job.cli.{prefix}.run"
    deny = tmp_path / "deny.yaml"
    deny.write_text(
        f'rules:\n  - id: cli-deny\n    match: {{topics: ["job.cli.{prefix}.*"]}}\n'
        "    decision: deny\n    reason: blocked from the CLI\n"
    )
    async with own_app(nats_url, redis_url, config_dir, roles=["gateway", "safety"]) as app:
        cli = Cli(f"127.0.0.1:{app.grpc_port}")
        put = ok(await cli("policy", "bundle", "put", bundle, "--file", str(deny), "-m", "block"))
        assert put.stdout.strip() == f"bundle {bundle} saved (revision 1, enabled)"
        assert bundle in ok(await cli("policy", "bundles")).stdout
        assert ok(await cli("policy", "bundle", "get", bundle)).stdout == deny.read_text()
        would = ok(await cli("policy", "bundle", "simulate", bundle, "--topic", topic))
        assert would.stdout.startswith("DENY  rule cli-deny")
        assert ok(await cli("policy", "evaluate", "--topic", topic)).stdout.startswith("ALLOW")

        published = ok(await cli("policy", "publish", "-m", "ship it"))
        assert published.stdout.startswith("published version 1 (snapshot ")
        assert published.stdout.rstrip().endswith(f"): {bundle}")
        assert ok(await cli("policy", "evaluate", "--topic", topic)).stdout.startswith("DENY")

        ok(await cli("policy", "bundle", "put", bundle, "--file", str(deny), "--disable"))
        ok(await cli("policy", "publish"))
        assert ok(await cli("policy", "evaluate", "--topic", topic)).stdout.startswith("ALLOW")
        rolled = ok(await cli("policy", "rollback", "--version", "1", "-m", "undo"))
        assert rolled.stdout.startswith("rolled back to version 1: now version 3 (snapshot ")
        assert ok(await cli("policy", "evaluate", "--topic", topic)).stdout.startswith("DENY")
        versions = ok(await cli("policy", "versions", "--json")).json()
        assert [v["version"] for v in versions] == ["3", "2", "1"]
        audit = ok(await cli("policy", "audit", "--diff"))
        for action in ("bundle_put", "publish", "rollback"):
            assert action in audit.stdout
        assert "cli-deny" in audit.stdout  # the diff of the first put

        # The evaluations above were recorded; replay them with the bundle emptied.
        assert app.redis is not None
        decisions = f"{app.settings.namespace}policy:decisions"
        await eventually(
            lambda: app.redis.llen(decisions),  # type: ignore[union-attr]
            until=lambda n: n >= 4,
            what="the CLI's evaluations to be recorded",
        )
        allow = tmp_path / "allow.yaml"
        allow.write_text("rules: []\n")
        replay = ok(await cli("policy", "replay", "--bundle", f"{bundle}={allow}"))
        assert replay.stdout.startswith("replayed ")
        change = next(r for r in _rows(replay.stdout) if topic in r)
        assert "DENY" in change and "ALLOW" in change
        assert failed(await cli("policy", "replay", "--bundle", "no-equals")) == [
            "cordumctl: --bundle: expected id=file, got 'no-equals'"
        ]
        assert failed(await cli("policy", "rollback")) == [
            "cordumctl: --version or --snapshot: say which version to roll back to"
        ]
        broken = tmp_path / "broken.yaml"
        broken.write_text("rules:\n  - id: x\n    decision: maybe\n")
        refused = failed(await cli("policy", "bundle", "put", bundle, "-f", str(broken)))
        assert any(line.startswith("  content.rules[0]") for line in refused[1:]), refused

        assert ok(await cli("policy", "bundle", "delete", bundle)).stdout.strip() == (
            f"bundle {bundle} deleted"
        )
        gone = failed(await cli("policy", "bundle", "get", bundle))
        assert gone[0].startswith("cordumctl: POLICY_BUNDLE_NOT_FOUND: ")

        reloaded = ok(await cli("config", "reload"))
        assert reloaded.stdout.startswith("system/default revision ")
        assert "pools.yaml" in reloaded.stdout


async def test_schema_register_get_list_validate_delete(
    cli: Cli, prefix: str, tmp_path: Path
) -> None:
    schema_id = f"orders/{prefix}/v1"
    schema = tmp_path / "order.yaml"
    schema.write_text(
        "type: object\nrequired: [id]\ntitle: Order\n"
        "properties:\n  id: {type: string, minLength: 3}\n  qty: {type: integer}\n"
    )
    registered = ok(await cli("schema", "register", schema_id, "--file", str(schema)))
    assert registered.stdout.startswith(f"schema {schema_id} registered (sha256 ")
    assert ok(await cli("schema", "get", schema_id)).json()["required"] == ["id"]
    assert ok(await cli("schema", "get", schema_id, "--json")).json()["id"] == schema_id
    listed = ok(await cli("schema", "list"))
    assert schema_id in listed.stdout and "Order" in listed.stdout

    good = write(tmp_path / "good.json", {"id": "abc", "qty": 1})
    assert ok(await cli("schema", "validate", schema_id, "--file", good)).stdout.strip() == (
        f"{good} conforms to {schema_id}"
    )
    bad = write(tmp_path / "bad.json", {"id": "ab", "qty": "many"})
    lines = failed(await cli("schema", "validate", schema_id, "--file", bad))
    assert lines[0] == f"cordumctl: {bad} does not conform to {schema_id} (2 violations)"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["/id", "/qty"]
    report = await cli("schema", "validate", schema_id, "--file", bad, "--json")
    assert report.code == 1 and report.json()["valid"] is False

    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"type": "nope"}')
    refused = failed(await cli("schema", "register", f"{schema_id}-x", "-f", str(invalid)))
    assert refused[1:] and refused[1].strip().startswith("schema.type: ")
    assert ok(await cli("schema", "delete", schema_id)).stdout.strip() == (
        f"schema {schema_id} deleted"
    )
    assert failed(await cli("schema", "get", schema_id))[0].startswith(
        "cordumctl: SCHEMA_NOT_FOUND: "
    )


def _rows(table: str) -> list[str]:
    """The data rows of a rich table, cells separated by spaces (box characters removed)."""
    rows = []
    for line in plain(table).splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        rows.append(" ".join(c if c else "-" for c in cells))
    return rows
