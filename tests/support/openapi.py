"""A REST client that checks every answer against the served OpenAPI document (with
schemathesis' checks: no 5xx, documented status, content type and body, SSE events too).

Blocking (requests): call it from a thread while the app under test runs on the event loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

T = TypeVar("T")

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
REQUEST_TIMEOUT_S = 15.0
# Server streams (SSE) may never end: read for this long, then cut (complete events count).
STREAM_READ_S = 1.0


@dataclass
class DocumentedApi:
    schema: schemathesis.BaseSchema
    base_url: str
    session: requests.Session
    headers: dict[str, str]
    # "VERB /path/{template}" of every call answered 200.
    succeeded: set[str] = field(default_factory=set)

    def call(
        self,
        label: str,
        *,
        path: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
        body: Any = NOT_SET,
        headers: dict[str, str] | None = None,
        expect: int = 200,
    ) -> schemathesis.Response:
        """`label` is "VERB /api/v1/path/{var}" as in the document."""
        method, template = label.split(" ", 1)
        operation = self.schema[template][method]
        case = operation.Case(path_parameters=path or {}, query=query or {}, body=body)
        streaming = "text/event-stream" in operation.definition.raw["responses"]["200"]["content"]
        timeout = (REQUEST_TIMEOUT_S, STREAM_READ_S if streaming else REQUEST_TIMEOUT_S)
        sent = {**self.headers, **(headers or {})}
        response = case.call(
            base_url=self.base_url, session=self.session, headers=sent, timeout=timeout
        )
        case.validate_response(response, checks=CHECKS, headers=sent)
        assert response.status_code == expect, f"{label}: {response.status_code} {response.text}"
        if response.status_code == 200:
            self.succeeded.add(label)
        return response

    def json(self, label: str, **kwargs: Any) -> Any:
        return self.call(label, **kwargs).json()

    def events(self, label: str, **kwargs: Any) -> list[Any]:
        """The messages of a server stream (each SSE event's data)."""
        text = self.call(label, **kwargs).text
        return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def poll(probe: Callable[[], T], until: Callable[[T], bool], *, within: float = 20.0) -> T:
    """Blocking twin of support.waiting.eventually, for code running in a thread."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s; last: {value!r}")
        time.sleep(0.05)
