"""The OpenAPI document through Envoy: served without a key at GET /api/v1/openapi.json, one
operation per google.api.http binding, and true to what the REST API does. Every answer is
checked against it with schemathesis' checks (no 5xx; status, content type and body, SSE
events included): for valid input that succeeds on every operation, and for generated input,
both what the document allows and what it rules out.

The stack is this module's own (its own namespace, API keys on), because generated requests
publish policies, change config and delete things.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
import pytest_asyncio
import requests
import schemathesis
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.schemas import APIOperation

from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.stack.envoy_config import API_PACKAGE, OPENAPI_PATH, packaged_descriptor
from cordum.v1 import job_service_pb2 as J
from cordum.v1 import job_service_pb2_grpc

from support.admin import field_violations, rest_reason, rest_violations
from support.auth import key_of, keyed_app, md
from support.cordum import start_envoy_for
from support.jobs import make_worker
from support.openapi import CHECKS, REQUEST_TIMEOUT_S, DocumentedApi, poll

# Generated requests per operation while the budget lasts, one each after it is spent, so
# every operation is exercised and the test stays well under a minute on 2 loaded CPUs.
# CORDUM_FUZZ_EXAMPLES / CORDUM_FUZZ_BUDGET_S raise both for a longer hunt.
EXAMPLES = int(os.environ.get("CORDUM_FUZZ_EXAMPLES", "4"))
BUDGET_S = float(os.environ.get("CORDUM_FUZZ_BUDGET_S", "25"))
# Server-streaming operations (SSE) may never end: each is read for this long, then cut.
STREAM_READ_S = 0.5
ADMIN = {"X-API-Key": key_of("platform")}


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    # No rate limit: a 429 would only hide what the input does.
    async with keyed_app(nats_url, redis_url, config_dir, rate_limit_rps=0) as running:
        yield running


@pytest.fixture(scope="module")
def rest(app: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service, url = start_envoy_for(app, tmp_path_factory.mktemp("envoy-openapi"))
    try:
        yield url
    finally:
        service.stop()


@pytest_asyncio.fixture
async def http(rest: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=rest, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


# -- the served document -----------------------------------------------------------------


def descriptor_bindings(descriptor: Path) -> set[tuple[str, str]]:
    """(verb, OpenAPI path) of every google.api.http binding of the API in the descriptor."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    bindings = set()
    for f in fds.file:
        if f.package != API_PACKAGE:
            continue
        for service in f.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                for binding in [rule, *rule.additional_bindings]:
                    verb = binding.WhichOneof("pattern")
                    assert verb in {"get", "put", "post", "delete", "patch"}, method.name
                    template = getattr(binding, verb)
                    # {name=segments/*} is the OpenAPI variable {name}.
                    bindings.add((verb, re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", template)))
    return bindings


async def test_document_is_served_without_a_key(http: httpx.AsyncClient) -> None:
    response = await http.get(OPENAPI_PATH)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    # Byte for byte the file `make proto` wrote next to the descriptor Envoy loads.
    assert response.content == packaged_descriptor().with_name("openapi.json").read_bytes()
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    # The API itself does need a key here.
    refused = await http.get("/api/v1/status")
    assert refused.status_code == 401, refused.text
    assert (await http.get("/api/v1/status", headers=ADMIN)).status_code == 200


async def test_document_paths_are_the_descriptor_http_bindings(http: httpx.AsyncClient) -> None:
    document = (await http.get(OPENAPI_PATH)).json()
    documented = {(verb, path) for path, item in document["paths"].items() for verb in item}
    expected = descriptor_bindings(packaged_descriptor())
    assert documented == expected
    assert {path for _, path in expected} == set(document["paths"])
    assert OPENAPI_PATH not in document["paths"]  # served by Envoy, not an RPC


async def test_only_get_serves_the_document(http: httpx.AsyncClient) -> None:
    response = await http.post(OPENAPI_PATH, json={}, headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["code"] == 404


# -- what schemathesis found ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/jobs", {"prompt": "p", "topic": "job.t.x", "labels": {"a": {}}}, "labels.a"),
        ("/api/v1/jobs:submitAndWait", {"job": {"labels": {"a": {"b": "c"}}}}, "job.labels.a"),
        ("/api/v1/artifacts:upload", [{"header": {"labels": {"a": {}}}}], "header.labels.a"),
        (
            "/api/v1/workflows",
            {"id": "w", "steps": {"s": {"route_labels": {"a": {}}}}},
            "workflow.steps.s.route_labels.a",
        ),
    ],
)
async def test_an_object_as_a_map_string_value_is_a_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: Any, field: str
) -> None:
    """Negative-mode schemathesis: Envoy's transcoder turns such a value into bytes protobuf
    cannot parse, which grpc.aio answered UNKNOWN, a 500."""
    response = await http.post(path, json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert rest_reason(response.json()) == "INVALID_ARGUMENT"
    assert list(rest_violations(response.json())) == [field]
    # The key is still checked first.
    assert (await http.post(path, json=body)).status_code == 401


async def test_undecodable_native_request_is_invalid_argument_and_writes_nothing(
    app: App, prefix: str
) -> None:
    topic = f"job.t.undecodable.{prefix}"
    entry = b"\x0a\x01a" + b"\x12\x01\xff"  # labels {"a": <not UTF-8>}
    raw = J.SubmitJobRequest(prompt="p", topic=topic).SerializeToString()
    raw += b"\xa2\x01" + bytes([len(entry)]) + entry
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        submit = channel.unary_unary(
            "/cordum.v1.JobService/SubmitJob",
            request_serializer=lambda b: b,
            response_deserializer=J.SubmitJobResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await submit(raw, metadata=md("platform"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(raised.value)) == ["labels.a"]
        listed = await job_service_pb2_grpc.JobServiceStub(channel).ListJobs(
            J.ListJobsRequest(topic=topic), metadata=md("platform"), timeout=10
        )
    assert not listed.jobs


# -- every operation, with input that succeeds ------------------------------------------


def deny_policy(rule_id: str, glob: str) -> str:
    return (
        f'rules:\n  - id: {rule_id}\n    match: {{topics: ["{glob}"]}}\n'
        "    decision: deny\n    reason: no\n"
    )


def walk_jobs(api: DocumentedApi, prefix: str) -> None:
    topic = f"job.t.oa.{prefix}"
    submitted = api.json("POST /api/v1/jobs", body={"prompt": "hi", "topic": topic})
    job_id = submitted["job_id"]

    def job() -> Any:
        return api.json("GET /api/v1/jobs/{job_id}", path={"job_id": job_id})

    done = poll(job, lambda j: j["state"] == "JOB_STATE_SUCCEEDED")
    api.json("GET /api/v1/jobs/{job_id}/result", path={"job_id": job_id})
    api.json("GET /api/v1/jobs/{job_id}/decisions", path={"job_id": job_id})
    api.json("GET /api/v1/traces/{trace_id}", path={"trace_id": done["trace_id"]})
    api.json("GET /api/v1/jobs", query={"topic": topic, "page_size": 10})
    # A finished job's watch sends its state and ends.
    assert api.events("GET /api/v1/jobs/{job_id}:watch", path={"job_id": job_id})
    api.json("GET /api/v1/memory", query={"ptr": f"redis://ctx:{job_id}"})
    # Never ends; read for a while, it starts with a `stream_start` event.
    assert api.events("GET /api/v1/events", query={"topic": topic})
    api.json("POST /api/v1/jobs:batchSubmit", body={"jobs": [{"prompt": "b", "topic": topic}]})
    api.json(
        "POST /api/v1/jobs:submitAndWait",
        body={"job": {"prompt": "w", "topic": topic}, "timeout_ms": 15_000},
    )
    idle = api.json("POST /api/v1/jobs", body={"prompt": "x", "topic": f"job.t.idle.{prefix}"})
    api.json(
        "POST /api/v1/jobs/{job_id}/cancel", path={"job_id": idle["job_id"]}, body={"reason": "r"}
    )

    approve_topic = f"job.t.approve.{prefix}"
    held = [
        api.json("POST /api/v1/jobs", body={"prompt": p, "topic": approve_topic})["job_id"]
        for p in ("a", "r")
    ]
    poll(
        lambda: api.json("GET /api/v1/approvals", query={"page_size": 100}),
        lambda page: set(held) <= {a["job"]["id"] for a in page["approvals"]},
    )
    api.json(
        "POST /api/v1/approvals/{job_id}/approve", path={"job_id": held[0]}, body={"reason": "ok"}
    )
    api.json(
        "POST /api/v1/approvals/{job_id}/reject", path={"job_id": held[1]}, body={"reason": "no"}
    )

    denied = api.json("POST /api/v1/jobs", body={"prompt": "d", "topic": f"job.t.deny.{prefix}"})
    denied_id = denied["job_id"]
    poll(
        lambda: api.json("GET /api/v1/dlq", query={"topic": f"job.t.deny.{prefix}"}),
        lambda page: bool(page["entries"]),
    )
    api.json("GET /api/v1/dlq/page", query={"page_size": 1})
    api.json("GET /api/v1/dlq/{job_id}", path={"job_id": denied_id})
    api.json("POST /api/v1/jobs/{job_id}/remediate", path={"job_id": denied_id}, body={})
    api.json("POST /api/v1/dlq/{job_id}/retry", path={"job_id": denied_id}, body={})
    api.json("DELETE /api/v1/dlq/{job_id}", path={"job_id": denied_id})


def walk_workflows(api: DocumentedApi, prefix: str) -> None:
    workflow_id = f"oa-{prefix}"
    definition = {
        "id": workflow_id,
        "name": "OpenAPI walk",
        "steps": {
            "ok": {"type": "approval"},
            "tell": {"type": "notify", "depends_on": ["ok"], "input": {"message": "hi"}},
        },
    }
    api.json("POST /api/v1/workflows:validate", body=definition)
    api.json("POST /api/v1/workflows", body=definition)
    api.json("GET /api/v1/workflows/{workflow_id}", path={"workflow_id": workflow_id})
    api.json("GET /api/v1/workflows", query={"page_size": 100})
    wf = {"workflow_id": workflow_id}

    def start() -> str:
        started = api.json(
            "POST /api/v1/workflows/{workflow_id}/runs",
            path=wf,
            body={"who": "ann"},
            headers={"Idempotency-Key": f"oa-{prefix}-{time.monotonic_ns()}"},
        )
        run_id: str = started["run_id"]
        poll(
            lambda: api.json("GET /api/v1/workflow-runs/{run_id}", path={"run_id": run_id}),
            lambda run: run["status"] == "RUN_STATUS_WAITING",
        )
        return run_id

    approved, rejected, cancelled = start(), start(), start()
    step = {**wf, "step_id": "ok"}
    api.json(
        "POST /api/v1/workflows/{workflow_id}/runs/{run_id}/steps/{step_id}/approve",
        path={**step, "run_id": approved},
        body={"approved": True},
    )
    api.json(
        "POST /api/v1/workflows/{workflow_id}/runs/{run_id}/steps/{step_id}/reject",
        path={**step, "run_id": rejected},
        body={"reason": "no"},
    )
    api.json(
        "POST /api/v1/workflows/{workflow_id}/runs/{run_id}/cancel",
        path={**wf, "run_id": cancelled},
        body={"reason": "stop"},
    )
    finished = poll(
        lambda: api.json("GET /api/v1/workflow-runs/{run_id}", path={"run_id": approved}),
        lambda run: run["status"] == "RUN_STATUS_SUCCEEDED",
    )
    assert finished["steps"]["tell"]["output"] == {"message": "hi"}
    run = {"run_id": approved}
    api.json("GET /api/v1/workflow-runs/{run_id}/timeline", path=run)
    assert api.events("GET /api/v1/workflow-runs/{run_id}:watch", path=run)
    api.json("GET /api/v1/workflow-runs", query={"page_size": 100})
    api.json("GET /api/v1/workflows/{workflow_id}/runs", path=wf)
    again = api.json("POST /api/v1/workflow-runs/{run_id}/rerun", path=run, body={})["run_id"]
    poll(
        lambda: api.json("GET /api/v1/workflow-runs/{run_id}", path={"run_id": again}),
        lambda run: run["status"] == "RUN_STATUS_WAITING",
    )
    api.json("POST /api/v1/workflow-runs/{run_id}/cancel", path={"run_id": again}, body={})
    api.json("DELETE /api/v1/workflow-runs/{run_id}", path={"run_id": rejected})
    api.json("DELETE /api/v1/workflows/{workflow_id}", path=wf)


def walk_storage(api: DocumentedApi, prefix: str) -> None:
    content = base64.b64encode(b"\x00openapi " + prefix.encode()).decode()
    put = api.json(
        "POST /api/v1/artifacts", body={"content_base64": content, "labels": {"p": prefix}}
    )
    # Pointers hold `/`: sent %-encoded (schemathesis leaves path values as they are).
    ptr = {"artifact_ptr": quote(put["artifact_ptr"], safe="")}
    api.json("GET /api/v1/artifacts/{artifact_ptr}", path=ptr)
    events = api.events("GET /api/v1/artifacts/{artifact_ptr}:download", path=ptr)
    assert "metadata" in events[0]
    api.json("GET /api/v1/artifacts", query={"page_size": 500})
    header = {"header": {"content_type": "text/plain", "labels": {"p": prefix}}}
    uploaded = api.json(
        "POST /api/v1/artifacts:upload", body=[header, {"chunk": content}, {"end": {}}]
    )
    api.json(
        "DELETE /api/v1/artifacts/{artifact_ptr}",
        path={"artifact_ptr": quote(uploaded["artifact_ptr"], safe="")},
    )

    schema_id = f"oa/{prefix}"
    number = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    api.json("POST /api/v1/schemas", body={"id": schema_id, "schema": number})
    sid = {"schema_id": quote(schema_id, safe="")}
    api.json("GET /api/v1/schemas/{schema_id}", path=sid)
    api.json("GET /api/v1/schemas", query={"page_size": 1000})
    api.json("POST /api/v1/schemas/{schema_id}:validate", path=sid, body={"document": {"n": -1}})
    api.json("DELETE /api/v1/schemas/{schema_id}", path=sid)

    resource = f"oa/{prefix}"
    lock = {"resource": resource, "owner": "a"}
    api.json("POST /api/v1/locks/acquire", body={**lock, "ttl_ms": 60_000})
    api.json("GET /api/v1/locks", query={"resource": resource})
    api.json("GET /api/v1/locks/{resource}", path={"resource": quote(resource, safe="")})
    api.json("GET /api/v1/locks:list", query={"prefix": "oa/"})
    api.json("POST /api/v1/locks/renew", body={**lock, "ttl_ms": 5000})
    api.json("POST /api/v1/locks/release", body=lock)

    scope = {"scope": "org", "scope_id": f"oa-{prefix}"}
    api.json("POST /api/v1/config", body={**scope, "data": {"limits": {"a": 1}}})
    api.json("GET /api/v1/config", query=scope)
    api.json("GET /api/v1/config/effective", query={"org_id": f"oa-{prefix}"})
    api.json("POST /api/v1/config:reload", body={})

    memory = f"oa-{prefix}"
    payload = base64.b64encode(json.dumps({"prompt": "Hi, I am Ada."}).encode()).decode()
    chat = {"memory_id": memory, "mode": "CONTEXT_MODE_CHAT", "logical_payload": payload}
    api.json("POST /api/v1/context/memory", body={**chat, "model_response": "Hello Ada."})
    api.json("POST /api/v1/context/window", body={**chat, "max_input_tokens": 1000})
    api.json("GET /api/v1/status")
    api.json("GET /api/v1/workers")


def walk_policy(api: DocumentedApi, prefix: str) -> None:
    bundle_id = f"oa/{prefix}"
    bundle = {"bundle_id": quote(bundle_id, safe="")}
    topic = f"job.oa.{prefix}.x"
    content = deny_policy("oa-deny", f"job.oa.{prefix}.*")
    api.json("PUT /api/v1/policy/bundles/{bundle_id}", path=bundle, body={"content": content})
    api.json("GET /api/v1/policy/bundles/{bundle_id}", path=bundle)
    api.json("GET /api/v1/policy/bundles")
    check = {"topic": topic, "job_id": "j-1", "meta": {"actor_type": "human"}}
    api.json(
        "POST /api/v1/policy/bundles/{bundle_id}/simulate",
        path=bundle,
        body={"request": {"topic": topic}},
    )
    api.json("POST /api/v1/policy:replay", body={"bundles": {bundle_id: content}})
    first = api.json("POST /api/v1/policy/publish", body={"message": "one"})
    assert api.json("POST /api/v1/policy/evaluate", body=check)["decision"] == "DECISION_TYPE_DENY"
    api.json("POST /api/v1/policy/simulate", body=check)
    api.json("POST /api/v1/policy/explain", body=check)
    api.json("DELETE /api/v1/policy/bundles/{bundle_id}", path=bundle)
    api.json("POST /api/v1/policy/publish", body={"message": "two"})
    version = first["version"]["version"]
    api.json("POST /api/v1/policy/rollback", body={"version": version, "message": "undo"})
    api.json("GET /api/v1/policy/versions")
    api.json("GET /api/v1/policy/versions/{version}", path={"version": version})
    api.json("GET /api/v1/policy/snapshots")
    api.json("GET /api/v1/policy/rules", query={"include_disabled": True})
    api.json("GET /api/v1/policy/audit")


def walk_all(schema: schemathesis.BaseSchema, base_url: str, prefix: str) -> set[str]:
    with requests.Session() as session:
        api = DocumentedApi(schema, base_url, session, ADMIN)
        walk_jobs(api, prefix)
        walk_workflows(api, prefix)
        walk_storage(api, prefix)
        walk_policy(api, prefix)
        return api.succeeded


@pytest_asyncio.fixture
async def echo(nats_url: str, redis_url: str, prefix: str) -> AsyncIterator[Worker]:
    worker = make_worker(f"oa-{prefix}", nats_url, redis_url)

    @worker.handler(f"job.t.oa.{prefix}")
    async def run(ctx: Any, data: Any) -> Any:
        return {"echo": data}

    async with worker:
        yield worker


async def test_every_operation_succeeds_with_a_documented_answer(
    rest: str, echo: Worker, prefix: str
) -> None:
    """Valid input for each operation (random input rarely passes validation, so the fuzz
    below mostly sees errors): every 200 body, SSE events included, matches the document."""
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, rest + OPENAPI_PATH)
    succeeded = await asyncio.to_thread(walk_all, schema, rest, prefix)
    documented = {
        f"{verb.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for verb in item
    }
    assert documented == succeeded


# -- schemathesis on every operation -----------------------------------------------------


@dataclass
class FuzzReport:
    operations: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def is_streaming(operation: APIOperation) -> bool:
    ok: dict[str, Any] = operation.definition.raw["responses"]["200"]
    return "text/event-stream" in ok.get("content", {})


def fuzz_operation(
    operation: APIOperation,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    examples: int,
) -> tuple[Counter[int], str | None]:
    """Sends `examples` generated requests; returns their statuses and the first failure.
    Negative input (what the document rules out) must get a documented 4xx, never a 5xx."""
    statuses: Counter[int] = Counter()
    timeout = (REQUEST_TIMEOUT_S, STREAM_READ_S if is_streaming(operation) else REQUEST_TIMEOUT_S)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # No shrinking: time is short, and a failure comes with its curl command.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, headers=ADMIN, timeout=timeout)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=ADMIN)

    try:
        run()
    except Unsatisfiable:  # negative: a lone string parameter has no invalid value
        return statuses, None
    # schemathesis' FailureGroup is a BaseExceptionGroup.
    except (Exception, BaseExceptionGroup) as exc:
        return statuses, f"{operation.label} ({mode.value}): {exc}"
    return statuses, None


def fuzz_all(schema: schemathesis.BaseSchema, base_url: str) -> FuzzReport:
    report = FuzzReport()
    deadline = time.monotonic() + BUDGET_S
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode, share in ((GenerationMode.POSITIVE, 1.0), (GenerationMode.NEGATIVE, 0.5)):
                if mode is GenerationMode.NEGATIVE and not has_input(operation):
                    continue  # nothing to get wrong
                examples = max(1, int(EXAMPLES * share)) if time.monotonic() < deadline else 1
                statuses, failure = fuzz_operation(operation, mode, base_url, session, examples)
                report.statuses += statuses
                report.by_mode[mode.value] += statuses.total()
                if failure:
                    report.failures.append(failure)
            report.operations += 1
    return report


def has_input(operation: APIOperation) -> bool:
    raw: dict[str, Any] = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


class FuzzSummary:
    """Registered by the fuzz test: its line goes to the terminal summary, whether the test
    passed or not, without -s or -rP."""

    name = "cordum-openapi-fuzz-summary"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


def summary_plugin(config: pytest.Config) -> FuzzSummary:
    plugin = config.pluginmanager.get_plugin(FuzzSummary.name)
    if plugin is None:
        plugin = FuzzSummary()
        config.pluginmanager.register(plugin, FuzzSummary.name)
    return plugin


async def test_every_operation_answers_generated_requests_as_documented(
    rest: str, request: pytest.FixtureRequest
) -> None:
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, rest + OPENAPI_PATH)
    documented = sum(len(item) for item in schema.raw_schema["paths"].values())
    # Blocking HTTP in a thread: the app under test runs on this event loop.
    report = await asyncio.to_thread(fuzz_all, schema, rest)
    statuses = ", ".join(f"{n}x{code}" for code, n in sorted(report.statuses.items()))
    summary = (
        f"schemathesis: {report.statuses.total()} generated requests "
        f"({report.by_mode['positive']} positive, {report.by_mode['negative']} negative; "
        f"{statuses}) over {report.operations} operations through Envoy, "
        f"{len(report.failures)} failing"
    )
    print(summary)
    summary_plugin(request.config).lines.append(summary)
    assert report.operations == documented
    assert not report.failures, "\n\n".join(report.failures)
    # Generated input is not all bounced at the door: some requests succeed.
    assert report.statuses[200] > 0
