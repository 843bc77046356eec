"""YAML reading and typed field access that collects every problem with its field path.

Upstream parses policies with Go's yaml.v3, which follows the YAML 1.2 core schema: `yes`,
`on`, `12:30` and `2024-01-01` are strings there. PyYAML's default YAML 1.1 resolvers would
turn them into bools, sexagesimal ints and dates, so a label value `approved: yes` that
upstream accepts would fail our string check. The loader below resolves scalars the 1.2 way
and, like yaml.v3, rejects duplicate mapping keys instead of silently keeping the last.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from cordum.server.errors import Violations

_BASE: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # type: ignore[assignment]
_REPLACED_TAGS = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}
_MERGE_TAG = "tag:yaml.org,2002:merge"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class _Loader(_BASE):  # type: ignore[misc,valid-type]
    yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] not in _REPLACED_TAGS]
        for first, resolvers in _BASE.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _value in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if digits.startswith("0o"):
        return sign * int(digits[2:], 8)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    return sign * int(digits, 10)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str) -> Any:
    """Parse one YAML document; raises `yaml.YAMLError` (with a position) when malformed."""
    return yaml.load(text, Loader=_Loader)


def yaml_error_text(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return problem


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


class Reader:
    """Typed reads of YAML values; each wrong value adds a violation and yields a default.

    Reading on after an error (instead of stopping) is what lets one load report every
    problem of a file at once. A null value reads as absent.
    """

    def __init__(self) -> None:
        self.violations = Violations()

    def add(self, path: str, description: str) -> None:
        self.violations.add(path, description)

    def mapping(self, value: Any, path: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {_type_name(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.add(f"{path}.{key}" if path else str(key), "keys must be strings")
                continue
            if allowed is not None and key not in allowed:
                self.add(_join(path, key), f"unknown field (allowed: {', '.join(sorted(allowed))})")
                continue
            out[key] = item
        return out

    def string(self, value: Any, path: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            self.add(path, f"must be a string, got {_type_name(value)}")
            return ""
        return value

    def string_list(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.add(path, f"must be a list of strings, got {_type_name(value)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            else:
                self.add(f"{path}[{i}]", f"must be a string, got {_type_name(item)}")
        return tuple(out)

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, item in self.mapping(value, path, None).items():
            if isinstance(item, str):
                out[key] = item
            else:
                self.add(_join(path, key), f"must be a string, got {_type_name(item)}")
        return out

    def boolean(self, value: Any, path: str) -> bool | None:
        if value is None:
            return None
        if not isinstance(value, bool):
            self.add(path, f"must be true or false, got {_type_name(value)}")
            return None
        return value

    def integer(self, value: Any, path: str, maximum: int = INT64_MAX) -> int:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"must be an integer, got {_type_name(value)}")
            return 0
        if value < 0:
            self.add(path, "must be >= 0")
            return 0
        if value > maximum:
            self.add(path, f"must be <= {maximum}")
            return 0
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
