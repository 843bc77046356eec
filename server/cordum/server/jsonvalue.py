"""JSON values as the platform stores and hashes them.

Documents arrive as `google.protobuf.Struct`/`Value`, where every number is a double: a
config value `3` comes back as `3.0`. `normalize` turns integral floats back into ints so
what we store (and hash) is what the caller meant, and `canonical_json` is the one byte
form used for content hashes: keys sorted at every level, no whitespace, UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from google.protobuf import json_format, struct_pb2

JSON = Any
# Integral doubles beyond this lose precision as ints anyway; keep them floats.
_MAX_EXACT = 2**53


def normalize(value: JSON) -> JSON:
    """A copy of `value` with integral floats as ints (`3.0` → `3`), recursively."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _MAX_EXACT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def canonical_json(value: JSON) -> bytes:
    """Sorted keys, compact separators, UTF-8 (not ASCII-escaped); NaN/Infinity refused."""
    return json.dumps(
        normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def content_hash(value: JSON) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def finite(value: JSON) -> bool:
    """False when a number anywhere in `value` is NaN or infinite (not representable in JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return True


def from_struct(message: struct_pb2.Struct) -> dict[str, JSON]:
    return normalize(json_format.MessageToDict(message))  # type: ignore[no-any-return]


def from_value(message: struct_pb2.Value) -> JSON:
    return normalize(json_format.MessageToDict(message))


def to_struct(value: dict[str, JSON]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def to_value(value: JSON) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out
