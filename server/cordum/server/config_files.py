"""The routing and timeout files (`config/pools.yaml`, `config/timeouts.yaml`), in upstream's
shapes. Bad files fail with every problem named by field; a missing file means defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from cordum.server.errors import CordumError, FieldViolation, invalid

_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolSpec(_Strict):
    requires: list[str] = Field(default_factory=list)

    @field_validator("requires")
    @classmethod
    def _normalise(cls, value: list[str]) -> list[str]:
        return sorted({r.strip().lower() for r in value if r.strip()})


class PoolsConfig(_Strict):
    # topic -> pools (a scalar in the file means one pool).
    topics: dict[str, list[str]] = Field(default_factory=dict)
    pools: dict[str, PoolSpec] = Field(default_factory=dict)

    @field_validator("topics", mode="before")
    @classmethod
    def _scalar_pools(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    def pools_for(self, topic: str) -> list[str]:
        return self.topics.get(topic, [])

    def requires_ok(self, pool: str, requires: set[str]) -> bool:
        spec = self.pools.get(pool)
        if not requires:
            return True
        return spec is not None and requires <= set(spec.requires)


class TopicTimeouts(_Strict):
    # Running timeout for jobs on this topic; 0 = the reconciler default.
    timeout_seconds: NonNegativeInt = 0
    # Default retries for jobs on this topic that do not ask for any.
    max_retries: NonNegativeInt = 0


class WorkflowTimeouts(_Strict):
    child_timeout_seconds: NonNegativeInt = 0
    total_timeout_seconds: NonNegativeInt = 0
    max_retries: NonNegativeInt = 0


class ReconcilerTimeouts(_Strict):
    # Absent or 0 both mean the default (upstream mixed two sets of defaults).
    dispatch_timeout_seconds: NonNegativeInt = 300
    running_timeout_seconds: NonNegativeInt = 9000
    scan_interval_seconds: NonNegativeInt = 30

    @field_validator("*", mode="after")
    @classmethod
    def _zero_is_default(cls, value: int, info: Any) -> int:
        if value:
            return value
        return int(cls.model_fields[info.field_name].default)


class TimeoutsConfig(_Strict):
    topics: dict[str, TopicTimeouts] = Field(default_factory=dict)
    workflows: dict[str, WorkflowTimeouts] = Field(default_factory=dict)
    reconciler: ReconcilerTimeouts = Field(default_factory=ReconcilerTimeouts)

    def running_timeout_s(self, topic: str) -> int:
        spec = self.topics.get(topic)
        if spec and spec.timeout_seconds:
            return spec.timeout_seconds
        return self.reconciler.running_timeout_seconds

    def default_retries(self, topic: str) -> int:
        spec = self.topics.get(topic)
        return spec.max_retries if spec else 0


def _load(model: type[_M], path: Path) -> _M:
    if not path.exists():
        return model()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise invalid([FieldViolation(str(path), f"not valid YAML: {exc}")]) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _violations(path, exc) from exc


def _violations(path: Path, exc: ValidationError) -> CordumError:
    items = [
        FieldViolation(".".join(str(p) for p in err["loc"]) or "(root)", err["msg"])
        for err in exc.errors()
    ]
    return invalid(items, f"{path}: " + "; ".join(f"{v.field}: {v.description}" for v in items))


def load_pools(path: Path) -> PoolsConfig:
    return _load(PoolsConfig, path)


def load_timeouts(path: Path) -> TimeoutsConfig:
    return _load(TimeoutsConfig, path)
