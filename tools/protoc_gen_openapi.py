#!/usr/bin/env python3
"""protoc plugin: OpenAPI 3.1 (JSON) for the REST surface of Envoy's gRPC-JSON transcoder.

The document mirrors the transcoder as Cordum configures it: preserve_proto_field_names,
always_print_primitive_fields, stream_sse_style_delimited, convert_grpc_status, JSON local
replies, no auto_mapping (methods without a google.api.http rule are not exposed).

    python -m grpc_tools.protoc -Iproto -Ithird_party \
        --plugin=protoc-gen-openapi=tools/protoc_gen_openapi.py \
        --openapi_out=gen/cordum/v1 --openapi_opt=title=Cordum API,version=v1 <files> \
        google/rpc/status.proto google/rpc/error_details.proto

Request bodies/parameters use `<full.name>-Input` schemas (nothing required, int64 as string
or number, enums by name or number); responses use `<full.name>` (fields without presence
are always printed, hence required). `-` cannot occur in proto names, so the two never clash.
The google.rpc error detail types in the run (error_details.proto) describe Status.details.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

# Importing annotations_pb2 registers the google.api.http extension, so MethodOptions in the
# request parse with it (verified with protoc 31.1; no re-parse of option bytes needed).
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

FDP = descriptor_pb2.FieldDescriptorProto
Schema = dict[str, Any]
Path = tuple[int, ...]
Docs = dict[Path, str]  # SourceCodeInfo path -> comment
Method = descriptor_pb2.MethodDescriptorProto
Rule = http_pb2.HttpRule

OUTPUT_FILE = "openapi.json"
INPUT_SUFFIX = "-Input"
SCHEMAS = "#/components/schemas/"
STATUS, ANY, HTTP_ERROR = "google.rpc.Status", "google.protobuf.Any", "HttpError"
ERROR_DETAIL, ERROR_PACKAGE, ENVOY_REPLY = "ErrorDetail", "google.rpc", "EnvoyLocalReply"
TYPE_URL_PREFIX = "type.googleapis.com/"
HTTP_VERBS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
DEFAULT_OPTIONS = {"title": "Cordum API", "version": "v1", "package": "cordum.v1"}

INT64_FORMATS = {
    **dict.fromkeys((FDP.TYPE_INT64, FDP.TYPE_SINT64, FDP.TYPE_SFIXED64), "int64"),
    **dict.fromkeys((FDP.TYPE_UINT64, FDP.TYPE_FIXED64), "uint64"),
}
INT64_BOUNDS = {"int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}
INT64_PATTERNS = {"int64": "^-?[0-9]+$", "uint64": "^[0-9]+$"}
INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
UINT32 = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
FLOAT_MAX = 3.4028234663852886e38
# Both ways: the printer writes non-finite floats as these strings, the parser reads them.
NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
# Standard base64 with padding: what the printer writes (the parser also takes URL-safe).
BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
SCALARS: dict[int, Schema] = {
    FDP.TYPE_INT32: INT32,
    FDP.TYPE_SINT32: INT32,
    FDP.TYPE_SFIXED32: INT32,
    FDP.TYPE_UINT32: UINT32,
    FDP.TYPE_FIXED32: UINT32,
    FDP.TYPE_FLOAT: {
        "anyOf": [
            {"type": "number", "format": "float", "minimum": -FLOAT_MAX, "maximum": FLOAT_MAX},
            NON_FINITE,
        ]
    },
    FDP.TYPE_DOUBLE: {"anyOf": [{"type": "number", "format": "double"}, NON_FINITE]},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "contentEncoding": "base64", "pattern": BASE64},
}
WRAPPERS = {  # google.protobuf.XValue -> the scalar it wraps
    f".google.protobuf.{name}Value": getattr(FDP, f"TYPE_{name.upper()}")
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
WKT_SCHEMAS: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    # The JSON mapping camelCases FieldMask paths even with preserve_proto_field_names.
    ".google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated camelCase paths.",
    },
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Value": {},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Empty": {"type": "object", "additionalProperties": False},
}
# The transcoder binds only these message types from a single query/path string.
QUERYABLE_WKT = frozenset(WRAPPERS) | {
    ".google.protobuf.Timestamp",
    ".google.protobuf.Duration",
    ".google.protobuf.FieldMask",
}
# HTTP status -> (components.responses name, what produces it: Envoy's gRPC->HTTP mapping
# or an Envoy local reply).
ERROR_RESPONSES = {
    "400": ("BadRequest", "INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE or bad JSON"),
    "401": ("Unauthorized", "UNAUTHENTICATED (missing or invalid API key)"),
    "403": ("Forbidden", "PERMISSION_DENIED"),
    "404": ("NotFound", "NOT_FOUND, or no route matched"),
    "409": ("Conflict", "ALREADY_EXISTS or ABORTED"),
    "429": ("TooManyRequests", "RESOURCE_EXHAUSTED or rate limited"),
    "503": ("ServiceUnavailable", "UNAVAILABLE, or upstream unreachable"),
}
# Where the gateway looks for an API key (server/cordum/server/api/auth.py).
SECURITY_SCHEMES: dict[str, Schema] = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "ApiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "api-key",
        "description": "Upstream Cordum's header name for the same key.",
    },
    "Bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API key as `Authorization: Bearer <key>`.",
    },
}
INFO_DESCRIPTION = """\
REST through Envoy's gRPC-JSON transcoder; the gRPC API (same port) is the source of truth.

- Authentication: an API key in `X-API-Key`, `api-key` or `Authorization: Bearer`, when the \
gateway has keys configured. This document (`GET /api/v1/openapi.json`) needs no key.
- JSON: field names as in the protos (snake_case; lowerCamelCase is accepted on input), \
64-bit integers as strings, enums by name, bytes as base64, Timestamp as RFC 3339, \
Duration as seconds with an `s` suffix. Fields without presence are always printed. A \
request body field the API does not know is ignored, an unknown query parameter refused.
- Path parameters are percent-encoded, `/` inside a value (artifact pointers, schema and \
bundle ids) as `%2F`.
- Errors: a google.rpc.Status (`code` is the gRPC code, `details` holds google.rpc.ErrorInfo \
and, for bad input, google.rpc.BadRequest naming each field), or, when Envoy answers \
itself, `{code, message, details}` with the HTTP status as `code`.
- Server streaming: server-sent events, one `data:` event per message.
"""
VAR_RE = re.compile(r"\{([^{}=]+)(?:=([^{}]+))?\}")
SSE_DESCRIPTION = (
    "Server-sent events: each streamed message is one event, `data: <JSON>` plus a blank "
    "line (no `event:` or `id:` lines); the schema describes one event, its `data` holding "
    "the message (contentSchema). An error before the first message is an ordinary JSON "
    "error response; a later one only ends the stream (grpc-status/grpc-message trailers)."
)


class PluginError(Exception):
    """A problem in the input protos; reported through CodeGeneratorResponse.error."""


@dataclass(frozen=True)
class MessageInfo:
    proto: descriptor_pb2.DescriptorProto
    explicit_presence: bool  # proto2/editions: singular scalars track presence
    doc: str
    field_docs: dict[str, str]


@dataclass(frozen=True)
class EnumInfo:
    proto: descriptor_pb2.EnumDescriptorProto
    doc: str
    value_docs: dict[str, str]


@dataclass(frozen=True)
class PathVar:
    field_path: str
    pattern: str | None  # set when the variable binds a segment pattern such as jobs/*


def _comments(fdp: descriptor_pb2.FileDescriptorProto) -> Docs:
    docs = {}
    for loc in fdp.source_code_info.location:
        text = loc.leading_comments or loc.trailing_comments
        lines = [line.strip() for line in text.strip().splitlines()]
        if lines:
            docs[tuple(loc.path)] = "\n".join(lines)
    return docs


class Index:
    """All messages/enums of the request by '.full.Name', with their comments."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, MessageInfo] = {}
        self.enums: dict[str, EnumInfo] = {}
        for fdp in files:
            docs = _comments(fdp)
            scope = f".{fdp.package}" if fdp.package else ""
            self._add_messages(fdp.message_type, scope, (4,), docs, fdp.syntax != "proto3")
            self._add_enums(fdp.enum_type, scope, (5,), docs)

    def _add_messages(
        self, msgs: Iterable[Any], scope: str, path: Path, docs: Docs, explicit: bool
    ) -> None:
        for i, msg in enumerate(msgs):
            name, p = f"{scope}.{msg.name}", (*path, i)
            field_docs = {f.name: docs.get((*p, 2, j), "") for j, f in enumerate(msg.field)}
            self.messages[name] = MessageInfo(msg, explicit, docs.get(p, ""), field_docs)
            self._add_messages(msg.nested_type, name, (*p, 3), docs, explicit)
            self._add_enums(msg.enum_type, name, (*p, 4), docs)

    def _add_enums(self, enums: Iterable[Any], scope: str, path: Path, docs: Docs) -> None:
        for i, enum in enumerate(enums):
            p = (*path, i)
            value_docs = {v.name: docs.get((*p, 2, j), "") for j, v in enumerate(enum.value)}
            self.enums[f"{scope}.{enum.name}"] = EnumInfo(enum, docs.get(p, ""), value_docs)

    def message(self, name: str) -> MessageInfo:
        if name not in self.messages:
            raise PluginError(f"unknown message type {name}")
        return self.messages[name]

    def resolve(self, msg_name: str, field_path: str) -> tuple[str, FDP]:
        """Follows a dotted field path (path variables, body, response_body) to
        (owning message, field)."""
        owner, field = msg_name, None
        for part in field_path.split("."):
            if field is not None:
                owner = field.type_name
            match = [f for f in self.message(owner).proto.field if f.name == part]
            if not match:
                raise PluginError(f"{owner} has no field {part!r} (in {field_path!r})")
            field = match[0]
        if field is None:
            raise PluginError(f"empty field path in {msg_name}")
        return owner, field

    def is_map(self, field: FDP) -> bool:
        info = self.messages.get(field.type_name)
        return field.type == FDP.TYPE_MESSAGE and bool(info and info.proto.options.map_entry)


def _has_presence(field: FDP, explicit: bool) -> bool:
    """What always_print_primitive_fields skips: fields that track presence."""
    if field.label == FDP.LABEL_REPEATED:
        return False
    if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_GROUP) or field.HasField("oneof_index"):
        return True
    return explicit and field.label != FDP.LABEL_REQUIRED


def scalar_schema(ftype: int, is_input: bool) -> Schema:
    if ftype in INT64_FORMATS:
        # The printer quotes 64-bit ints; the parser accepts strings and numbers.
        fmt = INT64_FORMATS[ftype]
        schema: Schema = {"type": "string", "format": fmt, "pattern": INT64_PATTERNS[fmt]}
        if is_input:
            low, high = INT64_BOUNDS[fmt]
            schema.update(type=["string", "integer"], minimum=low, maximum=high)
        return schema
    return copy.deepcopy(SCALARS[ftype])


class SchemaBuilder:
    """Emits component schemas on demand: ref() queues, drain() builds the queue."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.schemas: dict[str, Schema] = {}
        self._pending: list[tuple[str, bool]] = []
        self._queued: set[str] = set()

    def ref(self, name: str, is_input: bool) -> Schema:
        key = name.lstrip(".") + (INPUT_SUFFIX if is_input else "")
        if key not in self._queued:
            self._queued.add(key)
            self._pending.append((name, is_input))
        return {"$ref": SCHEMAS + key}

    def drain(self) -> dict[str, Schema]:
        while self._pending:
            name, is_input = self._pending.pop()
            key = name.lstrip(".") + (INPUT_SUFFIX if is_input else "")
            build = self.enum_schema if name in self.index.enums else self.message_schema
            self.schemas[key] = build(name, is_input)
        return self.schemas

    def type_schema(self, type_name: str, is_input: bool) -> Schema:
        """Schema for a message-typed value: well-known JSON forms inline, others by $ref."""
        if type_name in WRAPPERS:
            schema = scalar_schema(WRAPPERS[type_name], is_input)
            if "anyOf" in schema:
                return {"anyOf": [*schema["anyOf"], {"type": "null"}]}
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            return {**schema, "type": [*types, "null"]}
        if type_name in WKT_SCHEMAS:
            return copy.deepcopy(WKT_SCHEMAS[type_name])
        if type_name == f".{ANY}" or (type_name == f".{STATUS}" and not is_input):
            return {"$ref": SCHEMAS + type_name[1:]}
        return self.ref(type_name, is_input)

    def field_schema(self, field: FDP, is_input: bool) -> Schema:
        if self.index.is_map(field):
            value = self.index.messages[field.type_name].proto.field[1]
            return {"type": "object", "additionalProperties": self._single(value, is_input)}
        item = self._single(field, is_input)
        return {"type": "array", "items": item} if field.label == FDP.LABEL_REPEATED else item

    def _single(self, field: FDP, is_input: bool) -> Schema:
        if field.type == FDP.TYPE_ENUM:
            if field.type_name == ".google.protobuf.NullValue":
                return {"type": "null"}
            return self.ref(field.type_name, is_input)
        if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_GROUP):
            return self.type_schema(field.type_name, is_input)
        return scalar_schema(field.type, is_input)

    def message_schema(
        self, name: str, is_input: bool, exclude: frozenset[str] = frozenset()
    ) -> Schema:
        info = self.index.message(name)
        props: dict[str, Schema] = {}
        required = []
        for field in info.proto.field:
            if field.name in exclude:
                continue
            prop = self.field_schema(field, is_input)
            if info.field_docs[field.name]:
                prop["description"] = info.field_docs[field.name]
            if field.options.deprecated:
                prop["deprecated"] = True
            props[field.name] = prop
            if not is_input and not _has_presence(field, info.explicit_presence):
                required.append(field.name)
        # Envoy prints only the fields its descriptor knows (and ignores others on input):
        # no other property is part of the API.
        schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            schema["required"] = required
        oneofs = self._oneofs(info, exclude)
        pairs = [{"required": [a, b]} for _, members in oneofs for a, b in combinations(members, 2)]
        if pairs:  # the parser rejects a second member of a oneof
            schema["not"] = pairs[0] if len(pairs) == 1 else {"anyOf": pairs}
        notes = [f"Oneof `{name}`: at most one of {', '.join(m)} is set." for name, m in oneofs]
        doc = "\n\n".join(filter(None, [info.doc, *notes]))
        if doc:
            schema["description"] = doc
        return schema

    @staticmethod
    def _oneofs(info: MessageInfo, exclude: frozenset[str]) -> list[tuple[str, list[str]]]:
        """Real (not proto3 optional) oneofs, none of whose members is excluded."""
        oneofs = []
        for i, oneof in enumerate(info.proto.oneof_decl):
            members = [
                f.name
                for f in info.proto.field
                if f.HasField("oneof_index") and f.oneof_index == i and not f.proto3_optional
            ]
            if members and not set(members) & exclude:
                oneofs.append((oneof.name, members))
        return oneofs

    def enum_schema(self, name: str, is_input: bool) -> Schema:
        info = self.index.enums[name]
        schema: Schema = {"type": "string", "enum": [v.name for v in info.proto.value]}
        if is_input:  # the parser also accepts the numeric value
            numbers = sorted({v.number for v in info.proto.value})
            schema = {"anyOf": [schema, {"type": "integer", "format": "int32", "enum": numbers}]}
        values = [f"- `{k}`: {v}" for k, v in info.value_docs.items() if v]
        doc = "\n\n".join(filter(None, [info.doc, "\n".join(values)]))
        if doc:
            schema["description"] = doc
        return schema

    def query_params(
        self, msg_name: str, bound: set[str], prefix: str = "", stack: tuple[str, ...] = ()
    ) -> list[Schema]:
        """Fields not bound by path or body; nested messages flatten to dotted names."""
        info = self.index.message(msg_name)
        stack = (*stack, msg_name)
        params: list[Schema] = []
        for field in info.proto.field:
            name = prefix + field.name
            if name in bound or self.index.is_map(field):
                continue
            if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_GROUP) and (
                field.type_name not in QUERYABLE_WKT
            ):
                if self._flattenable(field, stack):
                    params += self.query_params(field.type_name, bound, f"{name}.", stack)
                continue
            param: Schema = {"name": name, "in": "query", "schema": self.field_schema(field, True)}
            if field.label == FDP.LABEL_REPEATED:
                param.update(style="form", explode=True)
            if info.field_docs[field.name]:
                param["description"] = info.field_docs[field.name]
            params.append(param)
        return params

    def _flattenable(self, field: FDP, stack: tuple[str, ...]) -> bool:
        # Repeated messages and JSON-only WKTs (Struct, Any, ...) cannot be bound from a query
        # string; a type already being flattened would recurse forever.
        return (
            field.label != FDP.LABEL_REPEATED
            and field.type_name in self.index.messages
            and not field.type_name.startswith(".google.protobuf.")
            and field.type_name not in stack
        )


def parse_template(template: str) -> tuple[str, list[PathVar]]:
    """'/v1/{name=jobs/*}:cancel' -> ('/v1/{name}:cancel', [PathVar('name', '^jobs/[^/]+$')])."""
    if not template.startswith("/"):
        raise PluginError(f"path template {template!r} must start with '/'")
    parts, variables, pos = [], [], 0
    for match in VAR_RE.finditer(template):
        parts.append(_literal(template[pos : match.start()], template))
        field_path, segments = match.group(1), match.group(2)
        pattern = None if segments in (None, "*") else _segments_pattern(segments)
        variables.append(PathVar(field_path, pattern))
        parts.append("{" + field_path + "}")
        pos = match.end()
    parts.append(_literal(template[pos:], template))
    return "".join(parts), variables


def _literal(text: str, template: str) -> str:
    if any(c in text for c in "*{}"):  # OpenAPI has no anonymous wildcards
        raise PluginError(f"unsupported path template {template!r}: wildcard outside a variable")
    return text


def _segments_pattern(segments: str) -> str:
    # ECMA-262 patterns: escape only regex syntax characters (no identity escapes like "\-").
    wildcards = {"*": "[^/]+", "**": ".*"}
    regex = [
        wildcards.get(seg) or re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", seg)
        for seg in segments.split("/")
    ]
    return "^" + "/".join(regex) + "$"


def _rule_route(rule: Rule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise PluginError("google.api.http rule without get/put/post/delete/patch/custom")
    verb, path = (
        (rule.custom.kind.lower(), rule.custom.path)
        if kind == "custom"
        else (kind, getattr(rule, kind))
    )
    if verb not in HTTP_VERBS:
        raise PluginError(f"custom HTTP method {verb!r} cannot be described in OpenAPI")
    return verb, path


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _path_param(sb: SchemaBuilder, input_type: str, var: PathVar) -> Schema:
    owner, field = sb.index.resolve(input_type, var.field_path)
    if field.label == FDP.LABEL_REPEATED or (
        field.type == FDP.TYPE_MESSAGE and field.type_name not in QUERYABLE_WKT
    ):
        raise PluginError(f"path variable {var.field_path!r} must be a singular scalar field")
    schema = (
        {"type": "string", "pattern": var.pattern} if var.pattern else sb.field_schema(field, True)
    )
    param: Schema = {"name": var.field_path, "in": "path", "required": True, "schema": schema}
    doc = sb.index.messages[owner].field_docs[field.name]
    if var.pattern and "/" in var.pattern:  # Envoy matches segments before unescaping %2F
        doc = "\n\n".join(filter(None, [doc, "Spans several segments: send '/' unescaped."]))
    return {**param, **_described(doc)}


def _request_body(sb: SchemaBuilder, method: Method, rule: Rule, bound: set[str]) -> Schema:
    if rule.body == "*":
        # Only whole top-level fields leave the body; for {job.id} the `job` object stays.
        top = frozenset(p for p in bound if "." not in p)
        schema = (
            sb.message_schema(method.input_type, True, top)
            if top
            else sb.type_schema(method.input_type, True)
        )
    else:
        schema = sb.field_schema(sb.index.resolve(method.input_type, rule.body)[1], True)
    if method.client_streaming:  # the transcoder reads a JSON array of messages
        schema = {"type": "array", "items": schema}
    return {"content": _json(schema)}


def _responses(sb: SchemaBuilder, method: Method, rule: Rule) -> Schema:
    if rule.response_body:
        schema = sb.field_schema(sb.index.resolve(method.output_type, rule.response_body)[1], False)
    else:
        schema = sb.type_schema(method.output_type, False)
    if method.server_streaming:
        # One event, as OAS 3.2 spells it in `itemSchema` and as SSE-aware 3.1 tools
        # (schemathesis) read `schema` of text/event-stream.
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}
        event = {"type": "object", "required": ["data"], "properties": {"data": data}}
        ok = {"description": SSE_DESCRIPTION, "content": {"text/event-stream": {"schema": event}}}
    else:
        ok = {"description": "OK", "content": _json(schema)}
    responses = {"200": ok, "default": {"$ref": "#/components/responses/Error"}}
    for code, (name, _) in ERROR_RESPONSES.items():
        responses[code] = {"$ref": f"#/components/responses/{name}"}
    return responses


def build_operation(
    sb: SchemaBuilder, service: str, method: Method, rule: Rule, op_id: str, doc: str
) -> tuple[str, str, Schema]:
    """One HttpRule binding -> (OpenAPI path, verb, operation object)."""
    verb, template = _rule_route(rule)
    path, variables = parse_template(template)
    params = [_path_param(sb, method.input_type, var) for var in variables]
    bound = {var.field_path for var in variables}
    op: Schema = {
        "operationId": op_id,
        "tags": [service],
        "responses": _responses(sb, method, rule),
    }
    if rule.body:
        op["requestBody"] = _request_body(sb, method, rule, bound)
        bound.add(rule.body)
    if rule.body != "*":  # body "*" leaves nothing for the query string
        params += sb.query_params(method.input_type, bound)
    if params:
        op["parameters"] = params
    if doc:
        op["summary"] = doc.splitlines()[0]
        if doc != op["summary"]:
            op["description"] = doc
    if method.options.deprecated:
        op["deprecated"] = True
    return path, verb, op


def static_components(sb: SchemaBuilder) -> tuple[dict[str, Schema], dict[str, Schema]]:
    """Error schemas/responses shared by every operation (hand-written: Envoy's JSON forms)."""
    code = {"type": "integer", "format": "int32"}
    details = {"type": "array", "items": {"$ref": SCHEMAS + ERROR_DETAIL}}
    schemas = {
        ANY: {
            "description": "google.protobuf.Any: the packed message's JSON plus its @type.",
            "type": "object",
            "required": ["@type"],
            "properties": {"@type": {"type": "string", "description": "Type URL."}},
            "additionalProperties": True,
        },
        ERROR_DETAIL: error_detail_schema(sb),
        STATUS: {
            "description": "A gRPC error as JSON (Envoy convert_grpc_status); the HTTP status "
            "follows Envoy's gRPC-to-HTTP mapping.",
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {**code, "description": "gRPC status code (google.rpc.Code)."},
                "message": {"type": "string"},
                "details": {
                    **details,
                    "description": "Cordum errors carry a google.rpc.ErrorInfo (domain "
                    "cordum.io, reason) and, for bad input, a google.rpc.BadRequest naming "
                    "each offending field.",
                },
            },
            "additionalProperties": False,
        },
        ENVOY_REPLY: {
            "description": "An error Envoy answers itself (no route, bad JSON, unknown query "
            "parameter, body too large, gateway unreachable).",
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {**code, "description": "The HTTP status."},
                "message": {"type": "string"},
                "details": {"type": "string", "description": "Envoy's response code details."},
            },
            "additionalProperties": False,
        },
        HTTP_ERROR: {
            "description": "A google.rpc.Status from the gateway, or an Envoy local reply.",
            "anyOf": [{"$ref": SCHEMAS + STATUS}, {"$ref": SCHEMAS + ENVOY_REPLY}],
        },
    }
    responses = {
        "Error": {
            "description": "Any other error (e.g. 413 body too large, 500 INTERNAL, "
            "501 UNIMPLEMENTED, 504 DEADLINE_EXCEEDED).",
            "content": _json({"$ref": SCHEMAS + HTTP_ERROR}),
        }
    }
    for name, text in ERROR_RESPONSES.values():
        responses[name] = {"description": text, "content": _json({"$ref": SCHEMAS + HTTP_ERROR})}
    return schemas, responses


def error_detail_schema(sb: SchemaBuilder) -> Schema:
    """One element of Status.details: a google.rpc error detail type (ErrorInfo, BadRequest,
    ...) with its @type, or any other packed message."""
    types = sorted(
        name
        for name in sb.index.messages
        if name.rpartition(".")[0] == f".{ERROR_PACKAGE}" and name != f".{STATUS}"
    )
    packed = []
    for name in types:
        schema = sb.message_schema(name, False)
        url = TYPE_URL_PREFIX + name[1:]
        schema["properties"] = {"@type": {"const": url}, **schema["properties"]}
        schema["required"] = ["@type", *schema.get("required", [])]
        packed.append(schema)
    other: Schema = {"$ref": SCHEMAS + ANY}
    if not packed:
        return other
    urls = [TYPE_URL_PREFIX + name[1:] for name in types]
    # Other types fall back to Any; the known ones must match their own schema.
    other["not"] = {"required": ["@type"], "properties": {"@type": {"enum": urls}}}
    return {"anyOf": [*packed, other]}


def parse_options(parameter: str) -> dict[str, str]:
    options = dict(DEFAULT_OPTIONS)
    for item in filter(None, (part.strip() for part in parameter.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in DEFAULT_OPTIONS:
            raise PluginError(f"bad option {item!r}; known: {', '.join(DEFAULT_OPTIONS)}")
        options[key.strip()] = value.strip()
    return options


def build_document(request: plugin_pb2.CodeGeneratorRequest, options: dict[str, str]) -> Schema:
    sb = SchemaBuilder(Index(list(request.proto_file)))
    paths: dict[str, dict[str, Schema]] = {}
    tags: list[Schema] = []
    targets = set(request.file_to_generate)
    for fdp in request.proto_file:
        if fdp.name not in targets or fdp.package != options["package"]:
            continue
        docs = _comments(fdp)
        for s, service in enumerate(fdp.service):
            tags.append({"name": service.name, **_described(docs.get((6, s)))})
            for m, method in enumerate(service.method):
                # Envoy runs without auto_mapping: unannotated methods are gRPC-only.
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                for i, binding in enumerate([rule, *rule.additional_bindings]):
                    op_id = f"{service.name}_{method.name}" + (f"_{i}" if i else "")
                    doc = docs.get((6, s, 2, m), "")
                    path, verb, op = build_operation(sb, service.name, method, binding, op_id, doc)
                    if verb in paths.setdefault(path, {}):
                        raise PluginError(f"{verb.upper()} {path} is bound twice ({op_id})")
                    paths[path][verb] = op
    schemas, responses = static_components(sb)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": options["title"],
            "version": options["version"],
            "description": INFO_DESCRIPTION,
        },
        "servers": [{"url": "/"}],
        # Any one of the key schemes; the empty alternative: a gateway with no keys
        # configured is open.
        "security": [{name: []} for name in SECURITY_SCHEMES] + [{}],
        "tags": sorted(tags, key=lambda tag: tag["name"]),  # independent of file order
        "paths": paths,
        "components": {
            "schemas": {**sb.drain(), **schemas},
            "responses": responses,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _described(doc: str | None) -> Schema:
    return {"description": doc} if doc else {}


def render(document: Schema) -> str:
    """Stable bytes: sorted keys, fixed indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    try:
        document = build_document(request, parse_options(request.parameter))
    except PluginError as exc:
        response.error = str(exc)
        return response
    response.file.add(name=OUTPUT_FILE, content=render(document))
    return response


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
