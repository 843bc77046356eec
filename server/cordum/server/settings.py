"""The one settings object of a Cordum server process.

Read once at the entry point (env vars, then an optional YAML file named by CORDUM_CONFIG,
then defaults) and passed down; nothing else reads os.environ.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ALL_ROLES: tuple[str, ...] = ("gateway", "scheduler", "safety", "workflow", "context")


def _default_instance_id() -> str:
    # Unique per App, also when tests run several in one process.
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORDUM_",
        extra="ignore",
        populate_by_name=True,
    )

    # Connections. NATS_URL / REDIS_URL keep the names CAP workers and upstream use.
    nats_url: str = Field(
        "nats://127.0.0.1:4222", validation_alias=AliasChoices("NATS_URL", "CORDUM_NATS_URL")
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "CORDUM_REDIS_URL"),
    )
    use_jetstream: bool = Field(
        False, validation_alias=AliasChoices("NATS_USE_JETSTREAM", "CORDUM_USE_JETSTREAM")
    )

    # Listeners. Loopback by default: exposing the API is a deliberate act.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8080
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    # The WebSocket/SSE bridge Envoy routes /api/v1/stream to.
    ws_host: str = "127.0.0.1"
    ws_port: int = 8082

    # Comma-separated in the environment: CORDUM_ROLES=gateway,scheduler.
    roles: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(ALL_ROLES))
    # Where safety.yaml, pools.yaml and timeouts.yaml live.
    config_dir: Path = Path("config")
    # Prefix of every Redis key and NATS subject this process owns; lets tests (and
    # several stacks on one server) share NATS and Redis without seeing each other.
    # CAP subjects stay as CAP fixes them when empty.
    namespace: str = ""
    # The CAP sender_id of this control plane; stable so workers can pin its key.
    sender_id: str = "cordum-scheduler"
    instance_id: str = Field(default_factory=_default_instance_id)

    # Where the scheduler and gateway reach the safety kernel when it is not in this process.
    safety_addr: str = Field(
        "127.0.0.1:50051", validation_alias=AliasChoices("SAFETY_KERNEL_ADDR", "CORDUM_SAFETY_ADDR")
    )
    safety_timeout_s: float = 2.0
    # How often the kernel checks safety.yaml for changes (hot reload).
    policy_watch_s: float = 2.0
    decision_cache_ttl_s: float = 5.0

    job_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    dlq_max_entries: int = 10_000
    # Override timeouts.yaml's reconciler scan interval (tests use short ones).
    reconcile_interval_s: float | None = None

    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_grace_s: float = 10.0

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [r.strip() for r in value.split(",") if r.strip()]
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ALL_ROLES))
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known: {', '.join(ALL_ROLES)}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("CORDUM_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
