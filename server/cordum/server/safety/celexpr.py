"""CEL conditions for rules (`match.cel`, our extension to upstream's format).

Expressions are compiled once when the policy loads; a request builds one CEL activation,
lazily, holding only the variables some expression of the policy references, and reuses it
for every CEL rule it reaches. The binding converts maps at ~1.7 µs per entry, so for the
fixed-shape maps (`meta`, `budget`, `mcp`) only the fields the policy reads are included
when every use is a plain field access (`meta.capability`, `meta["pack_id"]`).

Variables: `topic`, `tenant`, `labels`, `priority`, `principal_id`, `job_id`, `meta`,
`budget`, `estimated_cost`, `input_size_bytes`, `secrets_present`, `mcp`, `config` (see
`VARIABLES`). `config` is the job's effective config (the merged system → org → team →
workflow → step documents the scheduler attaches), so a rule can read any setting:
`"limits" in config && config.limits.max_cost < 10.0`.
A missing map key is an evaluation error (write `"env" in labels && labels.env == "prod"`);
an error, or a result that is not a bool, means the rule does not match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import cel

from cordum.agent.v1 import job_pb2
from cordum.server.safety.facts import Facts

VARIABLES: Mapping[str, str] = MappingProxyType(
    {
        "topic": "string: the job topic",
        "tenant": "string: the resolved tenant",
        "labels": "map(string, string): job labels",
        "priority": "string: INTERACTIVE, BATCH, CRITICAL or UNSPECIFIED",
        "principal_id": "string",
        "job_id": "string",
        "meta": (
            "map: actor_id (meta.actor_id or principal_id), actor_type (human|service|''), "
            "capability, risk_tags (list), requires (list), pack_id, idempotency_key, labels (map)"
        ),
        "budget": "map(string, int): max_input_tokens, max_output_tokens, max_total_tokens, "
        "deadline_ms",
        "estimated_cost": "double",
        "input_size_bytes": "int",
        "secrets_present": "bool: the computed secrets flag",
        "mcp": "map(string, string): server, tool, resource, action ('' when absent)",
        "config": "map: the job's effective config data ({} when none was attached)",
    }
)

# `program.variables()` also reports names bound by comprehension macros; those are not
# unknown variables. Matches `.exists(x, …)`, `.map(k, v, …)` and friends.
_BINDER = re.compile(
    r"\.\s*(?:all|exists|exists_one|existsOne|map|filter|transformList|transformMap)\s*\(\s*"
    r"([A-Za-z_]\w*)\s*(?:,\s*([A-Za-z_]\w*)\s*)?,"
)


# Maps with a fixed set of keys, which may be trimmed to the fields a policy reads.
_FIXED_MAPS = ("meta", "budget", "mcp")
_STRING_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_FIELD_ACCESS = r"\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*[\"']([A-Za-z_]\w*)[\"']\s*\])"

# name -> the fields read, or None when the whole map is needed.
Needs = dict[str, frozenset[str] | None]


class CelEvalError(Exception):
    """The expression failed at evaluation time (missing key, bad types, …)."""


@dataclass(frozen=True, slots=True, eq=False)
class CelExpression:
    source: str
    program: Any
    # The policy-level variables this expression reads, and for fixed-shape maps which
    # fields (None: all).
    variables: frozenset[str]
    needs: Needs

    def evaluate(self, facts: Facts) -> Any:
        """The raw result; raises CelEvalError. Needs `facts.cel_context` (see `activation`)."""
        try:
            return self.program.execute(facts.cel_context)
        except Exception as error:  # the CEL binding raises assorted builtin types
            raise CelEvalError(f"{type(error).__name__}: {error}") from error


def compile_cel(source: str) -> CelExpression:
    """Compile; raises ValueError naming the problem (syntax, unknown variable)."""
    if not source.strip():
        raise ValueError("empty expression")
    try:
        program = cel.compile(source)
    except Exception as error:
        raise ValueError(_first_line(str(error))) from error
    bound = {name for m in _BINDER.finditer(source) for name in m.groups() if name}
    referenced = set(program.variables()) - bound
    unknown = sorted(referenced - VARIABLES.keys())
    if unknown:
        raise ValueError(
            f"unknown variable(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIABLES))}"
        )
    needs: Needs = {name: None for name in referenced}
    for name in _FIXED_MAPS:
        if name in referenced:
            needs[name] = _fields_read(source, name)
    return CelExpression(source, program, frozenset(referenced), needs)


def _fields_read(source: str, name: str) -> frozenset[str] | None:
    """The fields of map `name` the expression reads, or None if it uses the map otherwise."""
    if '"""' in source or "'''" in source:
        return None  # triple-quoted strings defeat the literal blanking below
    # Blank string literals so `"meta.x"` is not read as an access, but keep identifier-like
    # ones: `meta["pack_id"]` is one.
    code = _STRING_LITERAL.sub(_blank_literal, source)
    fields: set[str] = set()
    for occurrence in re.finditer(rf"(?<![\w.]){name}(?!\w)", code):
        access = re.match(_FIELD_ACCESS, code[occurrence.end() :])
        if access is None:
            return None
        fields.add(access.group(1) or access.group(2))
    return frozenset(fields)


def _blank_literal(literal: re.Match[str]) -> str:
    text = literal.group(0)
    return text if re.fullmatch(r"[\"'][A-Za-z_]\w*[\"']", text) else '""'


def merge_needs(expressions: Iterable[CelExpression]) -> Needs:
    """What one activation must hold to serve every expression of a policy."""
    merged: Needs = {}
    for expression in expressions:
        for name, fields in expression.needs.items():
            if name in merged:
                current = merged[name]
                merged[name] = None if current is None or fields is None else current | fields
            else:
                merged[name] = fields
    return merged


def activation(facts: Facts, needs: Needs) -> Any:
    """A CEL context holding the variables (and map fields) in `needs` for this request."""
    request = facts.request
    values: dict[str, Any] = {}
    for name, fields in needs.items():
        value = _value(name, facts, request)
        if fields is not None:
            value = {k: v for k, v in value.items() if k in fields}
        values[name] = value
    return cel.Context(values)


def _value(name: str, facts: Facts, request: Any) -> Any:
    if name == "topic":
        return facts.topic
    if name == "tenant":
        return facts.tenant
    if name == "labels":
        return facts.labels
    if name == "priority":
        return _priority_name(request.priority)
    if name == "principal_id":
        return request.principal_id
    if name == "job_id":
        return request.job_id
    if name == "meta":
        meta = request.meta
        return {
            "actor_id": meta.actor_id or request.principal_id,
            "actor_type": facts.actor_type,
            "capability": meta.capability,
            "risk_tags": list(meta.risk_tags),
            "requires": list(meta.requires),
            "pack_id": meta.pack_id,
            "idempotency_key": meta.idempotency_key,
            "labels": dict(meta.labels),
        }
    if name == "budget":
        budget = request.budget
        return {
            "max_input_tokens": budget.max_input_tokens,
            "max_output_tokens": budget.max_output_tokens,
            "max_total_tokens": budget.max_total_tokens,
            "deadline_ms": budget.deadline_ms,
        }
    if name == "estimated_cost":
        return float(request.estimated_cost)
    if name == "input_size_bytes":
        return request.input_size_bytes
    if name == "secrets_present":
        return facts.secrets_present
    if name == "mcp":
        return facts.mcp._asdict()
    if name == "config":
        return effective_data(request.effective_config)
    raise KeyError(name)  # compile_cel admits only VARIABLES


def effective_data(raw: bytes) -> dict[str, Any]:
    """The `data` of an effective-config snapshot (`{version, hash, data}`), or the object
    itself when it is a bare document; {} when absent or not a JSON object (the kernel
    ignores a malformed one, as for its `safety` section)."""
    if not raw:
        return {}
    try:
        top = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(top, dict):
        return {}
    data = top.get("data")
    return data if isinstance(data, dict) and "version" in top else top


def _priority_name(value: int) -> str:
    try:
        return job_pb2.JobPriority.Name(value).removeprefix("JOB_PRIORITY_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "invalid expression"
