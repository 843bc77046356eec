"""tools/protoc_gen_openapi.py, driven without protoc: the CodeGeneratorRequest is built from
hand-made descriptors (the runtime venv has no grpcio-tools)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, duration_pb2, timestamp_pb2
from google.protobuf.compiler import plugin_pb2
from google.rpc import error_details_pb2
from openapi_spec_validator import validate

PLUGIN = Path(__file__).resolve().parents[2] / "tools" / "protoc_gen_openapi.py"
FDP = descriptor_pb2.FieldDescriptorProto
REP = FDP.LABEL_REPEATED
SCHEMAS = "#/components/schemas/"
INT64_IN = {
    "type": ["string", "integer"],
    "format": "int64",
    "pattern": "^-?[0-9]+$",
    "minimum": -(2**63),
    "maximum": 2**63 - 1,
}
INT64_OUT = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}


def _load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protoc_gen_openapi", PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _field(name: str, number: int, ftype: int, type_name: str = "", **extra: Any) -> FDP:
    label = extra.pop("label", FDP.LABEL_OPTIONAL)
    return FDP(name=name, number=number, type=ftype, type_name=type_name, label=label, **extra)


def _map_entry(name: str) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(
        name=name,
        field=[_field("key", 1, FDP.TYPE_STRING), _field("value", 2, FDP.TYPE_STRING)],
        options=descriptor_pb2.MessageOptions(map_entry=True),
    )


def _message(name: str, *fields: FDP, **extra: Any) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(name=name, field=fields, **extra)


def _method(name: str, inp: str, out: str, rule: http_pb2.HttpRule | None, **extra: Any) -> Any:
    method = descriptor_pb2.MethodDescriptorProto(
        name=name, input_type=f".cordum.v1.{inp}", output_type=f".cordum.v1.{out}", **extra
    )
    if rule is not None:
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return method


def _probe_file() -> descriptor_pb2.FileDescriptorProto:
    ts, state = ".google.protobuf.Timestamp", ".cordum.v1.JobState"
    job = _message(
        "Job",
        _field("job_id", 1, FDP.TYPE_STRING),
        _field("priority", 2, FDP.TYPE_INT64),
        _field("state", 3, FDP.TYPE_ENUM, state),
        _field("created_at", 4, FDP.TYPE_MESSAGE, ts),
        _field("labels", 5, FDP.TYPE_MESSAGE, ".cordum.v1.Job.LabelsEntry", label=REP),
        _field("tags", 6, FDP.TYPE_STRING, label=REP),
        _field("note", 7, FDP.TYPE_STRING, oneof_index=1, proto3_optional=True),
        _field("parent", 8, FDP.TYPE_MESSAGE, ".cordum.v1.Job"),
        _field("payload", 9, FDP.TYPE_BYTES),
        _field("topic", 10, FDP.TYPE_STRING, oneof_index=0),
        _field("worker", 11, FDP.TYPE_UINT64, oneof_index=0),
        nested_type=[_map_entry("LabelsEntry")],
        oneof_decl=[descriptor_pb2.OneofDescriptorProto(name=n) for n in ("target", "_note")],
    )
    messages = [
        job,
        _message(
            "Filter",
            _field("state", 1, FDP.TYPE_ENUM, state),
            _field("tags", 2, FDP.TYPE_STRING, label=REP),
            _field("since", 3, FDP.TYPE_MESSAGE, ts),
            _field("labels", 4, FDP.TYPE_MESSAGE, ".cordum.v1.Filter.LabelsEntry", label=REP),
            _field("parent", 5, FDP.TYPE_MESSAGE, ".cordum.v1.Filter"),
            nested_type=[_map_entry("LabelsEntry")],
        ),
        _message(
            "GetJobRequest",
            _field("job_id", 1, FDP.TYPE_STRING),
            _field("include_children", 2, FDP.TYPE_BOOL),
        ),
        _message(
            "ListJobsRequest",
            _field("page_size", 1, FDP.TYPE_INT32),
            _field("filter", 2, FDP.TYPE_MESSAGE, ".cordum.v1.Filter"),
            _field("ids", 3, FDP.TYPE_INT64, label=REP),
        ),
        _message(
            "ListJobsResponse",
            _field("jobs", 1, FDP.TYPE_MESSAGE, ".cordum.v1.Job", label=REP),
            _field("next_page_token", 2, FDP.TYPE_STRING),
        ),
        _message(
            "CreateJobRequest",
            _field("tenant", 1, FDP.TYPE_STRING),
            _field("job", 2, FDP.TYPE_MESSAGE, ".cordum.v1.Job"),
        ),
        _message("WatchJobsRequest", _field("tenant", 1, FDP.TYPE_STRING)),
    ]
    get_rule = http_pb2.HttpRule(
        get="/api/v1/jobs/{job_id}",
        additional_bindings=[http_pb2.HttpRule(get="/api/v1/lookup/{job_id=jobs/*}")],
    )
    service = descriptor_pb2.ServiceDescriptorProto(
        name="JobService",
        method=[
            _method("GetJob", "GetJobRequest", "Job", get_rule),
            _method(
                "ListJobs",
                "ListJobsRequest",
                "ListJobsResponse",
                http_pb2.HttpRule(get="/api/v1/jobs"),
            ),
            _method(
                "CreateJob",
                "CreateJobRequest",
                "Job",
                http_pb2.HttpRule(post="/api/v1/tenants/{tenant}/jobs", body="job"),
            ),
            _method(
                "CancelJob",
                "GetJobRequest",
                "Job",
                http_pb2.HttpRule(post="/api/v1/jobs/{job_id}:cancel", body="*"),
            ),
            _method(
                "WatchJobs",
                "WatchJobsRequest",
                "Job",
                http_pb2.HttpRule(get="/api/v1/tenants/{tenant}/jobs:watch"),
                server_streaming=True,
            ),
            _method("Internal", "GetJobRequest", "Job", None),
        ],
    )
    comments = {
        (4, 0): " A unit of work.\n",
        (4, 0, 2, 0): " Unique job id.\n",
        (6, 0): " Manages jobs.\n",
        (6, 0, 2, 0): " Gets a job.\n\n Fails with NOT_FOUND.\n",
    }
    info = descriptor_pb2.SourceCodeInfo(
        location=[
            descriptor_pb2.SourceCodeInfo.Location(path=path, leading_comments=text)
            for path, text in comments.items()
        ]
    )
    return descriptor_pb2.FileDescriptorProto(
        name="cordum/v1/probe.proto",
        package="cordum.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto", "google/protobuf/timestamp.proto"],
        message_type=messages,
        enum_type=[
            descriptor_pb2.EnumDescriptorProto(
                name="JobState",
                value=[
                    descriptor_pb2.EnumValueDescriptorProto(name="JOB_STATE_UNSPECIFIED", number=0),
                    descriptor_pb2.EnumValueDescriptorProto(name="JOB_STATE_RUNNING", number=1),
                ],
            )
        ],
        service=[service],
        source_code_info=info,
    )


def _other_file() -> descriptor_pb2.FileDescriptorProto:
    """Another package in the same run: must be skipped unless selected with package=."""
    method = descriptor_pb2.MethodDescriptorProto(
        name="Ping", input_type=".other.v1.Ping", output_type=".other.v1.Ping"
    )
    method.options.Extensions[annotations_pb2.http].CopyFrom(http_pb2.HttpRule(get="/other/ping"))
    return descriptor_pb2.FileDescriptorProto(
        name="other/v1/other.proto",
        package="other.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
        message_type=[_message("Ping", _field("seq", 1, FDP.TYPE_SINT64))],
        service=[descriptor_pb2.ServiceDescriptorProto(name="OtherService", method=[method])],
    )


def _request(
    parameter: str = "", probe: descriptor_pb2.FileDescriptorProto | None = None
) -> plugin_pb2.CodeGeneratorRequest:
    deps = []
    for module in (descriptor_pb2, http_pb2, annotations_pb2, timestamp_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        deps.append(fdp)
    files = [*deps, probe or _probe_file(), _other_file()]
    request = plugin_pb2.CodeGeneratorRequest(
        file_to_generate=["cordum/v1/probe.proto", "other/v1/other.proto"],
        parameter=parameter,
        proto_file=files,
    )
    # Round-trip through bytes, as protoc delivers it, so the http extension must re-parse.
    return plugin_pb2.CodeGeneratorRequest.FromString(request.SerializeToString())


@pytest.fixture(scope="module")
def plugin() -> ModuleType:
    return _load_plugin()


@pytest.fixture(scope="module")
def document(plugin: ModuleType) -> dict[str, Any]:
    response = plugin.generate(_request("title=Probe API,version=9.9"))
    assert not response.error
    return json.loads(response.file[0].content)


def _op(document: dict[str, Any], path: str, verb: str) -> dict[str, Any]:
    return document["paths"][path][verb]


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    return document["components"]["schemas"][name]


def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    info = document["info"]
    assert (info["title"], info["version"]) == ("Probe API", "9.9")
    assert "`GET /api/v1/openapi.json`) needs no key" in info["description"]
    assert document["servers"] == [{"url": "/"}]


def test_only_annotated_methods_of_the_selected_package(document: dict[str, Any]) -> None:
    ops = {
        (path, verb): op["operationId"]
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }
    assert ops == {
        ("/api/v1/jobs/{job_id}", "get"): "JobService_GetJob",
        ("/api/v1/lookup/{job_id}", "get"): "JobService_GetJob_1",
        ("/api/v1/jobs", "get"): "JobService_ListJobs",
        ("/api/v1/tenants/{tenant}/jobs", "post"): "JobService_CreateJob",
        ("/api/v1/jobs/{job_id}:cancel", "post"): "JobService_CancelJob",
        ("/api/v1/tenants/{tenant}/jobs:watch", "get"): "JobService_WatchJobs",
    }
    assert document["tags"] == [{"name": "JobService", "description": "Manages jobs."}]
    assert _op(document, "/api/v1/jobs", "get")["tags"] == ["JobService"]


def test_comments_become_summary_and_descriptions(document: dict[str, Any]) -> None:
    op = _op(document, "/api/v1/jobs/{job_id}", "get")
    assert op["summary"] == "Gets a job."
    assert op["description"] == "Gets a job.\n\nFails with NOT_FOUND."
    job = _schema(document, "cordum.v1.Job")
    assert job["properties"]["job_id"]["description"] == "Unique job id."
    assert job["description"].startswith("A unit of work.")
    assert "Oneof `target`: at most one of topic, worker is set." in job["description"]


def test_path_and_query_parameters(document: dict[str, Any]) -> None:
    params = _op(document, "/api/v1/jobs/{job_id}", "get")["parameters"]
    assert params[0] == {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    assert params[1:] == [
        {"name": "include_children", "in": "query", "schema": {"type": "boolean"}}
    ]

    listing = {p["name"]: p for p in _op(document, "/api/v1/jobs", "get")["parameters"]}
    # Maps are not bindable; Filter.parent would recurse into Filter.
    assert list(listing) == ["page_size", "filter.state", "filter.tags", "filter.since", "ids"]
    assert listing["filter.state"]["schema"] == {"$ref": SCHEMAS + "cordum.v1.JobState-Input"}
    assert listing["filter.since"]["schema"] == {"type": "string", "format": "date-time"}
    assert listing["filter.tags"]["style"] == "form"
    assert listing["filter.tags"]["explode"] is True
    assert listing["ids"]["schema"]["items"] == INT64_IN
    assert all(p["in"] == "query" for p in listing.values())


def test_additional_binding_with_segment_pattern(document: dict[str, Any]) -> None:
    (param,) = _op(document, "/api/v1/lookup/{job_id}", "get")["parameters"][:1]
    assert param["in"] == "path" and param["required"] is True
    assert param["schema"] == {"type": "string", "pattern": "^jobs/[^/]+$"}


def test_request_bodies(document: dict[str, Any]) -> None:
    create = _op(document, "/api/v1/tenants/{tenant}/jobs", "post")
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": SCHEMAS + "cordum.v1.Job-Input"}
    assert [p["name"] for p in create["parameters"]] == ["tenant"]

    cancel = _op(document, "/api/v1/jobs/{job_id}:cancel", "post")
    body = cancel["requestBody"]["content"]["application/json"]["schema"]
    # body "*": the path-bound job_id is not part of the body, nothing goes to the query.
    assert body["type"] == "object"
    assert set(body["properties"]) == {"include_children"}
    assert [p["name"] for p in cancel["parameters"]] == ["job_id"]


def test_response_schema_follows_envoy_print_options(document: dict[str, Any]) -> None:
    job = _schema(document, "cordum.v1.Job")
    props = job["properties"]
    assert props["priority"] == INT64_OUT
    assert props["worker"] == {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
    assert props["state"] == {"$ref": SCHEMAS + "cordum.v1.JobState"}
    assert props["created_at"] == {"type": "string", "format": "date-time"}
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["payload"] == {
        "type": "string",
        "contentEncoding": "base64",
        "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
    }
    assert props["parent"] == {"$ref": SCHEMAS + "cordum.v1.Job"}
    # always_print_primitive_fields: fields without presence are always printed.
    assert job["required"] == ["job_id", "priority", "state", "labels", "tags", "payload"]
    # The printer knows no other fields; the oneof prints one member at most.
    assert job["additionalProperties"] is False
    assert job["not"] == {"required": ["topic", "worker"]}
    assert _schema(document, "cordum.v1.JobState") == {
        "type": "string",
        "enum": ["JOB_STATE_UNSPECIFIED", "JOB_STATE_RUNNING"],
    }
    assert _schema(document, "cordum.v1.ListJobsResponse")["required"] == [
        "jobs",
        "next_page_token",
    ]


def test_request_schemas_accept_what_the_json_parser_accepts(document: dict[str, Any]) -> None:
    job = _schema(document, "cordum.v1.Job-Input")
    assert "required" not in job
    assert job["additionalProperties"] is False
    # The parser rejects a second member of a oneof.
    assert job["not"] == {"required": ["topic", "worker"]}
    assert job["properties"]["priority"] == INT64_IN
    assert job["properties"]["parent"] == {"$ref": SCHEMAS + "cordum.v1.Job-Input"}
    state = _schema(document, "cordum.v1.JobState-Input")
    assert {"type": "integer", "format": "int32", "enum": [0, 1]} in state["anyOf"]


@pytest.mark.parametrize("is_input", [True, False])
def test_number_forms(plugin: ModuleType, is_input: bool) -> None:
    non_finite = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
    double = plugin.scalar_schema(FDP.TYPE_DOUBLE, is_input)
    assert double == {"anyOf": [{"type": "number", "format": "double"}, non_finite]}
    assert plugin.scalar_schema(FDP.TYPE_FLOAT, is_input)["anyOf"][0]["maximum"] > 3.4e38
    assert plugin.scalar_schema(FDP.TYPE_UINT32, is_input) == {
        "type": "integer",
        "format": "uint32",
        "minimum": 0,
        "maximum": 2**32 - 1,
    }
    assert plugin.scalar_schema(FDP.TYPE_SINT32, is_input)["minimum"] == -(2**31)


@pytest.mark.parametrize(
    ("type_name", "is_input", "expected"),
    [
        (".google.protobuf.Int64Value", False, {**INT64_OUT, "type": ["string", "null"]}),
        (
            ".google.protobuf.Int64Value",
            True,
            {**INT64_IN, "type": ["string", "integer", "null"]},
        ),
        (
            ".google.protobuf.DoubleValue",
            False,
            {
                "anyOf": [
                    {"type": "number", "format": "double"},
                    {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
                    {"type": "null"},
                ]
            },
        ),
        (".google.protobuf.Empty", True, {"type": "object", "additionalProperties": False}),
        (".google.protobuf.BoolValue", False, {"type": ["boolean", "null"]}),
        (
            ".google.protobuf.Duration",
            False,
            {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
        ),
        (".google.protobuf.Struct", False, {"type": "object", "additionalProperties": True}),
        (".google.protobuf.Value", True, {}),
        (".google.protobuf.ListValue", False, {"type": "array", "items": {}}),
        (".google.protobuf.Any", True, {"$ref": SCHEMAS + "google.protobuf.Any"}),
        (".google.rpc.Status", False, {"$ref": SCHEMAS + "google.rpc.Status"}),
    ],
)
def test_well_known_types_use_their_json_forms(
    plugin: ModuleType, type_name: str, is_input: bool, expected: dict[str, Any]
) -> None:
    builder = plugin.SchemaBuilder(plugin.Index([]))
    assert builder.type_schema(type_name, is_input) == expected
    assert builder.drain() == {}  # inlined or static: nothing queued


def test_server_streaming_is_sse(document: dict[str, Any]) -> None:
    ok = _op(document, "/api/v1/tenants/{tenant}/jobs:watch", "get")["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    # One event; its data is the message's JSON.
    assert ok["content"]["text/event-stream"]["schema"] == {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": SCHEMAS + "cordum.v1.Job"},
            }
        },
    }
    unary = _op(document, "/api/v1/jobs/{job_id}", "get")["responses"]["200"]
    assert unary["content"] == {"application/json": {"schema": {"$ref": SCHEMAS + "cordum.v1.Job"}}}


def test_error_responses(document: dict[str, Any]) -> None:
    responses = _op(document, "/api/v1/jobs", "get")["responses"]
    assert set(responses) == {"200", "400", "401", "403", "404", "409", "429", "503", "default"}
    shared = document["components"]["responses"]
    for response in responses.values():
        if "$ref" in response:
            named = shared[response["$ref"].rsplit("/", 1)[1]]
            assert named["content"]["application/json"]["schema"] == {"$ref": SCHEMAS + "HttpError"}

    either = _schema(document, "HttpError")["anyOf"]
    assert either == [
        {"$ref": SCHEMAS + "google.rpc.Status"},
        {"$ref": SCHEMAS + "EnvoyLocalReply"},
    ]
    status = _schema(document, "google.rpc.Status")
    assert status["required"] == ["code", "message", "details"]
    assert status["properties"]["details"]["items"] == {"$ref": SCHEMAS + "ErrorDetail"}
    local = _schema(document, "EnvoyLocalReply")
    assert local["properties"]["details"] == {
        "type": "string",
        "description": "Envoy's response code details.",
    }
    # Without google/rpc/error_details.proto in the run, any packed message.
    assert _schema(document, "ErrorDetail") == {"$ref": SCHEMAS + "google.protobuf.Any"}
    assert _schema(document, "google.protobuf.Any")["required"] == ["@type"]


def test_error_details_when_their_protos_are_in_the_run(plugin: ModuleType) -> None:
    request = _request()
    for module in (duration_pb2, error_details_pb2):
        module.DESCRIPTOR.CopyToProto(request.proto_file.add())
    document = json.loads(plugin.generate(request).file[0].content)
    validate(document)
    detail = _schema(document, "ErrorDetail")["anyOf"]
    by_type = {d["properties"]["@type"]["const"]: d for d in detail[:-1]}
    url = "type.googleapis.com/google.rpc."
    assert {url + "ErrorInfo", url + "BadRequest", url + "RetryInfo"} <= set(by_type)
    info = by_type[url + "ErrorInfo"]
    assert info["required"] == ["@type", "reason", "domain", "metadata"]
    assert info["additionalProperties"] is False
    assert by_type[url + "BadRequest"]["properties"]["field_violations"]["items"] == {
        "$ref": SCHEMAS + "google.rpc.BadRequest.FieldViolation"
    }
    # Any other type: an Any whose @type is none of the known ones.
    assert detail[-1]["$ref"] == SCHEMAS + "google.protobuf.Any"
    assert set(detail[-1]["not"]["properties"]["@type"]["enum"]) == set(by_type)


def test_api_key_security_is_optional(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    # The headers the gateway reads a key from (server/cordum/server/api/auth.py).
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert (schemes["ApiKeyHeader"]["in"], schemes["ApiKeyHeader"]["name"]) == ("header", "api-key")
    assert (schemes["Bearer"]["type"], schemes["Bearer"]["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"ApiKey": []}, {"ApiKeyHeader": []}, {"Bearer": []}, {}]


def test_output_is_deterministic(plugin: ModuleType) -> None:
    first, second = plugin.generate(_request()), plugin.generate(_request())
    assert first.supported_features == plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    assert [f.name for f in first.file] == ["openapi.json"]
    content = first.file[0].content
    assert content == second.file[0].content
    assert content.endswith("}\n")
    assert (
        content
        == json.dumps(json.loads(content), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )


def test_package_option_selects_services(plugin: ModuleType) -> None:
    response = plugin.generate(_request("package=other.v1"))
    document = json.loads(response.file[0].content)
    assert list(document["paths"]) == ["/other/ping"]
    params = document["paths"]["/other/ping"]["get"]["parameters"]
    assert params == [{"name": "seq", "in": "query", "schema": INT64_IN}]
    assert document["info"]["title"] == "Cordum API"


@pytest.mark.parametrize(
    ("parameter", "template", "message"),
    [
        ("colour=blue", "/api/v1/jobs/{job_id}", "bad option"),
        ("", "/api/*/jobs/{job_id}", "wildcard outside a variable"),
        ("", "/api/v1/jobs/{missing}", "has no field 'missing'"),
        ("", "api/v1/jobs", "must start with '/'"),
    ],
)
def test_errors_are_reported_not_raised(
    plugin: ModuleType, parameter: str, template: str, message: str
) -> None:
    probe = _probe_file()
    probe.service[0].method[0].options.Extensions[annotations_pb2.http].get = template
    response = plugin.generate(_request(parameter, probe))
    assert message in response.error
    assert not response.file


def test_main_reads_stdin_and_writes_stdout(plugin: ModuleType) -> None:
    request = _request("title=Probe API")
    result = subprocess.run(
        [sys.executable, str(PLUGIN)],
        input=request.SerializeToString(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    response = plugin_pb2.CodeGeneratorResponse.FromString(result.stdout)
    assert response.file[0].content == plugin.generate(request).file[0].content
