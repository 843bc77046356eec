"""CEL expressions and `${...}` templates of workflow steps.

Variables (all JSON values):
  input  the run input
  steps  every step of the workflow by id: `{"status": "SUCCEEDED", "output": ..., "error": ...}`
         (status without the `STEP_STATUS_` prefix; output/error null until there is one)
  ctx    the run context: output_path targets, plus `steps` as above
  item   the for_each item (only in the `input` of a for_each step)
  index  the for_each index, an int (same)

JSON numbers that are whole are ints (`3`, not `3.0`), so `index + 1` and `items[index]` work;
CEL does not mix int and double in arithmetic (`double(x) * 1.5`). Comparisons do mix.
A missing key is an evaluation error: write `has(input.x) ? input.x : 0`. An evaluation error
fails the step with the error text (upstream left the step untouched and the run hung).

Templates: a string that is exactly one `${expr}` becomes the typed value of `expr` (number,
object, list, bool, null); otherwise every `${expr}` is replaced by its text: strings as they
are, everything else as JSON (`1000000`, `0.5`, `true`, `null`, `{"a":1}`; never Go's `1e+06`).
`$${` is a literal `${`. Only string values are templated, never object keys.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import cel

from cordum.server.jsonvalue import JSON, normalize

VARIABLES: Mapping[str, str] = {
    "input": "the run input",
    "steps": "steps by id: {status, output, error}",
    "ctx": "the run context (output_path targets and steps)",
    "item": "the for_each item (for_each step inputs only)",
    "index": "the for_each index (for_each step inputs only)",
}
BASE_VARIABLES = frozenset({"input", "steps", "ctx"})
ITEM_VARIABLES = frozenset({"item", "index"})
MAX_EXPRESSION = 4096

# Names bound by comprehension macros are not free variables (`.exists(x, ...)`).
_BINDER = re.compile(
    r"\.\s*(?:all|exists|exists_one|existsOne|map|filter|transformList|transformMap)\s*\(\s*"
    r"([A-Za-z_]\w*)\s*(?:,\s*([A-Za-z_]\w*)\s*)?,"
)
_STRING_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_STEP_DOT = re.compile(r"(?<![\w.])steps\s*\.\s*([A-Za-z_]\w*)\s*(\()?")
_STEP_INDEX = re.compile(r"(?<![\w.])steps\s*\[\s*(\"[^\"]*\"|'[^']*')\s*\]")
_STEP_ANY = re.compile(r"(?<![\w.])steps(?!\w)")


class ExpressionError(Exception):
    """Evaluation failed (missing key, type mismatch, a result that is not JSON)."""


def to_json(value: Any) -> JSON:
    """A CEL result as a JSON value (timestamps as RFC 3339, durations as `1.5s`, bytes as
    base64); NaN and infinities are refused."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"{value} is not a JSON number")
        return normalize(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.timedelta):
        return f"{_number_text(value.total_seconds())}s"
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, cel.OptionalValue):
        return to_json(value.value()) if value.has_value() else None
    return str(value)


def _number_text(value: float | int) -> str:
    """Numbers as JavaScript prints them: plain digits between 1e-6 and 1e21."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(repr(value)), "f")
    return repr(value)


def text(value: JSON) -> str:
    """The interpolation text of a value: strings verbatim, everything else as JSON."""
    if isinstance(value, str):
        return value
    return _json_text(value)


def _json_text(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number_text(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


class Scope:
    """The variables of one evaluation; values may be given as zero-argument callables,
    computed on first use (building `steps` for a 200-child run is not free)."""

    __slots__ = ("_cache", "_values")

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self._cache: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name in self._cache:
            return self._cache[name]
        value = self._values.get(name)
        if callable(value):
            value = value()
        self._cache[name] = value
        return value

    def with_values(self, **values: Any) -> Scope:
        child = Scope({**self._values, **values})
        child._cache = {k: v for k, v in self._cache.items() if k not in values}
        return child


@dataclass(frozen=True, slots=True, eq=False)
class Expression:
    source: str
    program: Any
    variables: frozenset[str]
    # Step ids read through `steps.<id>` / `steps["id"]`; None when `steps` is used in a way
    # that hides which (e.g. `steps[name]`).
    step_refs: frozenset[str] | None

    def evaluate(self, scope: Scope) -> JSON:
        context = cel.Context({name: scope.get(name) for name in self.variables})
        try:
            result = self.program.execute(context)
        except KeyError as error:
            raise ExpressionError(f"no such key: {error.args[0] if error.args else ''}") from error
        except Exception as error:  # the binding raises assorted builtin types
            raise ExpressionError(_first_line(f"{error}") or type(error).__name__) from error
        return to_json(result)


def compile_expression(source: str, allowed: Iterable[str] = BASE_VARIABLES) -> Expression:
    """Compile a CEL expression; ValueError names the problem (syntax, unknown variable)."""
    if not source.strip():
        raise ValueError("empty expression")
    if len(source) > MAX_EXPRESSION:
        raise ValueError(f"longer than {MAX_EXPRESSION} characters")
    try:
        program = cel.compile(source)
    except Exception as error:
        raise ValueError(_first_line(str(error)) or "invalid expression") from error
    bound = {name for m in _BINDER.finditer(source) for name in m.groups() if name}
    referenced = set(program.variables()) - bound
    allowed_set = frozenset(allowed)
    unknown = sorted(referenced - allowed_set)
    if unknown:
        hint = ""
        if set(unknown) & ITEM_VARIABLES:
            hint = " (item and index exist only in the input of a for_each step)"
        raise ValueError(
            f"unknown variable(s) {', '.join(unknown)}; known here: "
            f"{', '.join(sorted(allowed_set))}{hint}"
        )
    refs = _step_refs(source) if "steps" in referenced else frozenset()
    return Expression(source, program, frozenset(referenced), refs)


def _step_refs(source: str) -> frozenset[str] | None:
    # Blank literals so `"steps.x"` in a string is not a reference, but keep `steps["x"]`.
    refs: set[str] = set()
    for m in _STEP_INDEX.finditer(source):
        refs.add(m.group(1)[1:-1])
    code = _STEP_INDEX.sub(" __stepref__ ", source)
    code = _STRING_LITERAL.sub('""', code)
    covered = 0
    for m in _STEP_DOT.finditer(code):
        if m.group(2):  # `steps.exists(...)`: a macro over the map, not a step id
            return None
        refs.add(m.group(1))
        covered += 1
    if len(_STEP_ANY.findall(code)) > covered:
        return None
    return frozenset(refs)


def _first_line(text_: str) -> str:
    lines = [line for line in text_.splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


# -- templates ---------------------------------------------------------------------------


class Template:
    """A JSON value whose strings may hold `${...}`; compiled once, rendered per step run."""

    __slots__ = ("_node", "expressions")

    def __init__(self, node: Any, expressions: list[Expression]) -> None:
        self._node = node
        self.expressions = expressions

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(v for e in self.expressions for v in e.variables)

    def step_refs(self) -> frozenset[str] | None:
        refs: set[str] = set()
        for e in self.expressions:
            if e.step_refs is None:
                return None
            refs |= e.step_refs
        return frozenset(refs)

    def render(self, scope: Scope) -> JSON:
        return _render(self._node, scope, "")


class _Whole:
    __slots__ = ("expr",)

    def __init__(self, expr: Expression) -> None:
        self.expr = expr


class _Interp:
    __slots__ = ("parts",)

    def __init__(self, parts: list[str | Expression]) -> None:
        self.parts = parts


def _render(node: Any, scope: Scope, path: str) -> JSON:
    if isinstance(node, _Whole):
        try:
            return node.expr.evaluate(scope)
        except ExpressionError as error:
            raise ExpressionError(f"{path or 'input'}: ${{{node.expr.source}}}: {error}") from error
    if isinstance(node, _Interp):
        out = []
        for part in node.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            try:
                out.append(text(part.evaluate(scope)))
            except ExpressionError as error:
                raise ExpressionError(f"{path or 'input'}: ${{{part.source}}}: {error}") from error
        return "".join(out)
    if isinstance(node, dict):
        return {k: _render(v, scope, f"{path}.{k}" if path else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, scope, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def compile_template(
    value: JSON, allowed: Iterable[str] = BASE_VARIABLES, *, path: str = ""
) -> tuple[Template, list[tuple[str, str]]]:
    """Compile every `${...}` in `value`; returns the template and the problems found, as
    (path, description) pairs (path relative to the value, e.g. `a.b[0]`)."""
    allowed_set = frozenset(allowed)
    problems: list[tuple[str, str]] = []
    expressions: list[Expression] = []

    def walk(v: JSON, where: str) -> Any:
        if isinstance(v, dict):
            return {k: walk(item, f"{where}.{k}" if where else k) for k, item in v.items()}
        if isinstance(v, list):
            return [walk(item, f"{where}[{i}]") for i, item in enumerate(v)]
        if not isinstance(v, str) or "${" not in v:
            return v
        try:
            parts = _split(v)
        except ValueError as error:
            problems.append((where, str(error)))
            return v
        compiled: list[str | Expression] = []
        for part in parts:
            if not isinstance(part, _Source):
                compiled.append(part)
                continue
            try:
                expr = compile_expression(part, allowed_set)
            except ValueError as error:
                problems.append((where, f"${{{part}}}: {error}"))
                return v
            expressions.append(expr)
            compiled.append(expr)
        if len(compiled) == 1 and isinstance(compiled[0], Expression):
            return _Whole(compiled[0])
        if all(isinstance(p, str) for p in compiled):
            return "".join(p for p in compiled if isinstance(p, str))
        return _Interp(compiled)

    node = walk(value, path)
    return Template(node, expressions), problems


class _Source(str):
    """An expression's source inside a split template (a str subclass, told apart by type)."""


def _split(value: str) -> list[str | _Source]:
    parts: list[str | _Source] = []
    literal: list[str] = []
    i, n = 0, len(value)
    while i < n:
        if value.startswith("$${", i):
            literal.append("${")
            i += 3
            continue
        if value.startswith("${", i):
            end = _closing_brace(value, i + 2)
            if end < 0:
                raise ValueError(f"unterminated template expression at offset {i}")
            source = value[i + 2 : end]
            if not source.strip():
                raise ValueError(f"empty template expression at offset {i}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Source(source))
            i = end + 1
            continue
        literal.append(value[i])
        i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _closing_brace(value: str, start: int) -> int:
    """Index of the `}` closing a `${` whose expression starts at `start` (string literals and
    nested braces skipped), or -1."""
    depth, i, n = 0, start, len(value)
    while i < n:
        c = value[i]
        if c in "\"'":
            quote = value[i : i + 3] if value[i : i + 3] in ('"""', "'''") else c
            i += len(quote)
            while i < n and not value.startswith(quote, i):
                i += 2 if value[i] == "\\" else 1
            i += len(quote)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


def template_split_for_tests(value: str) -> list[str]:
    """The parts of a template string, expressions as `${...}` (for unit tests)."""
    return [f"${{{p}}}" if isinstance(p, _Source) else p for p in _split(value)]


def evaluate_text(source: str, scope_values: Mapping[str, Any]) -> JSON:
    """Compile and evaluate one expression against plain values (tests, tools)."""
    expr = compile_expression(source, scope_values.keys() | BASE_VARIABLES | ITEM_VARIABLES)
    return expr.evaluate(Scope(scope_values))
