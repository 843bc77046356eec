"""The schema registry: JSON Schemas (draft 2020-12) by id, and validation against them.

A schema is checked against the draft 2020-12 metaschema when registered (upstream stored
anything and failed only at first use). A schema may name its dialect with `$schema`, but
only 2020-12 is accepted. `format` is an annotation (2020-12's default), not an assertion.
Violations carry the JSON pointer of the offending value in the document (`/items/0/name`,
`""` for the document itself) and of the failing keyword in the schema.

Other services validate through `SchemaService.validate(schema_id, document)` or read raw
schemas with `cordum.server.stores.schemas.get_schema` (key `<prefix>schema:<id>`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from referencing.exceptions import Unresolvable

from cordum.server.errors import CordumError, Violations, not_found
from cordum.server.jsonvalue import canonical_json, finite, normalize
from cordum.server.stores.schemas import SchemaPage, SchemaStore, StoredSchema
from cordum.v1 import error_reason_pb2

SCHEMA_ID = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
DIALECT = "https://json-schema.org/draft/2020-12/schema"
MAX_SCHEMA_BYTES = 1 << 20
MAX_VIOLATIONS = 100
DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True)
class Violation:
    pointer: str
    message: str
    schema_pointer: str


def json_pointer(parts: Iterable[Any]) -> str:
    """RFC 6901: `""` is the whole document; `~` and `/` in names are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _violations(errors: Iterable[ValidationError]) -> list[Violation]:
    found = [
        Violation(json_pointer(e.absolute_path), e.message, json_pointer(e.absolute_schema_path))
        for e in errors
    ]
    found.sort(key=lambda v: (v.pointer, v.schema_pointer))
    return found[:MAX_VIOLATIONS]


def _schema_unusable(schema_id: str, error: Exception) -> CordumError:
    return CordumError(
        grpc.StatusCode.FAILED_PRECONDITION,
        error_reason_pb2.ERROR_REASON_SCHEMA_VALIDATION_FAILED,
        f"schema {schema_id} cannot be applied: {error}",
        metadata={"schema_id": schema_id},
    )


def check_id(field: str, schema_id: str, problems: Violations) -> None:
    if not schema_id:
        problems.add(field, "required")
    elif not SCHEMA_ID.match(schema_id):
        problems.add(field, "must be 1-200 characters of A-Z a-z 0-9 . _ / -")


def schema_problems(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, description) for everything that keeps `schema` from being a 2020-12 schema."""
    dialect = schema.get("$schema")
    if dialect is not None and str(dialect).rstrip("#") != DIALECT:
        return [("schema.$schema", f"only draft 2020-12 ({DIALECT}) is supported")]
    problems = []
    for error in Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema):
        where = json_pointer(error.absolute_path)
        problems.append((f"schema{where.replace('/', '.')}" if where else "schema", error.message))
    return sorted(problems)[:MAX_VIOLATIONS]


class SchemaService:
    def __init__(self, store: SchemaStore, *, validator_cache: int = 256) -> None:
        self._store = store
        self._validators: OrderedDict[tuple[str, str], Draft202012Validator] = OrderedDict()
        self._cache_size = validator_cache

    async def register(self, schema_id: str, schema: dict[str, Any] | None) -> StoredSchema:
        problems = Violations()
        check_id("id", schema_id, problems)
        if schema is None:
            problems.add("schema", "required (a JSON Schema object)")
        else:
            schema = normalize(schema)
            if not finite(schema):
                problems.add("schema", "numbers must be finite")
            elif len(canonical_json(schema)) > MAX_SCHEMA_BYTES:
                problems.add("schema", f"larger than {MAX_SCHEMA_BYTES} bytes as JSON")
            else:
                for field, description in schema_problems(schema):
                    problems.add(field, description)
        problems.raise_if_any()
        assert schema is not None
        sha = hashlib.sha256(canonical_json(schema)).hexdigest()
        stored = await self._store.put(schema_id, schema, sha, int(time.time() * 1000))
        if stored is None:
            raise CordumError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                error_reason_pb2.ERROR_REASON_INVALID_ARGUMENT,
                f"the schema registry is full ({self._store.max_schemas} schemas); "
                "delete unused schemas first",
            )
        return stored

    async def get(self, schema_id: str) -> StoredSchema:
        self._check_id(schema_id)
        stored = await self._store.get(schema_id)
        if stored is None:
            raise _missing(schema_id)
        return stored

    async def delete(self, schema_id: str) -> None:
        self._check_id(schema_id)
        if not await self._store.delete(schema_id):
            raise _missing(schema_id)

    async def list(self, page_size: int, page_token: str) -> SchemaPage:
        problems = Violations()
        if page_size < 0:
            problems.add("page_size", "must be >= 0")
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError):
                after = ""
            if not SCHEMA_ID.match(after):
                problems.add("page_token", "not a token from a previous ListSchemas")
        problems.raise_if_any()
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        page = await self._store.list(size, after)
        token = (
            base64.urlsafe_b64encode(page.next_token.encode()).decode() if page.next_token else ""
        )
        return SchemaPage(page.schemas, token)

    async def validate(self, schema_id: str, document: Any) -> list[Violation]:
        """Every way `document` breaks schema `schema_id` (empty: valid)."""
        stored = await self.get(schema_id)
        validator = self._validator(stored)
        try:
            return _violations(validator.iter_errors(normalize(document)))
        except (Unresolvable, SchemaError) as error:
            # A `$ref` to something that is not there (remote refs are never fetched).
            raise _schema_unusable(schema_id, error) from None

    def _validator(self, stored: StoredSchema) -> Draft202012Validator:
        key = (stored.id, stored.sha256)
        validator = self._validators.get(key)
        if validator is None:
            validator = Draft202012Validator(stored.schema)
            self._validators[key] = validator
            while len(self._validators) > self._cache_size:
                self._validators.popitem(last=False)
        else:
            self._validators.move_to_end(key)
        return validator

    @staticmethod
    def _check_id(schema_id: str) -> None:
        problems = Violations()
        check_id("schema_id", schema_id, problems)
        problems.raise_if_any()


def _missing(schema_id: str) -> CordumError:
    return not_found(
        error_reason_pb2.ERROR_REASON_SCHEMA_NOT_FOUND, f"schema {schema_id} not found"
    )
