"""The one settings object of a Cordum server process.

Read once at the entry point (env vars, then an optional YAML file named by CORDUM_CONFIG,
then defaults) and passed down; nothing else reads os.environ.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
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
    # JetStream mode (cordum.server.jetstream): the limits of each stream, and how many
    # times a submit or result is delivered (first redelivery after `redeliver_delay_s`,
    # doubling) before its job goes to the DLQ.
    jetstream_max_age_s: float = Field(24 * 3600, gt=0)
    jetstream_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    jetstream_replicas: int = Field(1, ge=1, le=5)
    jetstream_max_deliver: int = Field(10, ge=1)
    jetstream_ack_wait_s: float = Field(30.0, gt=0)
    jetstream_redeliver_delay_s: float = Field(1.0, ge=0)

    # Listeners. Loopback by default: exposing the API is a deliberate act.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8080
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    # The event WebSocket (`/api/v1/stream`, which Envoy routes here; server-sent events are
    # StreamEvents through the transcoder, on the gRPC port).
    ws_host: str = "127.0.0.1"
    ws_port: int = 8082
    # Event streams (StreamEvents, SSE, the WebSocket): events queued per stream before its
    # client counts as too slow and is dropped (a `stream_end` event says why), and how long
    # a dropped client gets to read that last event before its connection is cut.
    event_stream_queue: int = Field(256, ge=1)
    event_stream_grace_s: float = Field(10.0, gt=0)

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

    # -- signed bus packets (cordum.server.bus_trust) --------------------------------------
    # Our ECDSA P-256 private key (PEM, inline or in a file). When set, every packet we
    # publish is signed (CAP field 14; our own non-CAP messages in a header). Every control
    # plane process of one deployment holds the same key.
    bus_private_key: SecretStr = SecretStr("")
    bus_private_key_file: Path | None = None
    # The senders we trust: a directory of `<sender_id>.pem` files, or a YAML/JSON file
    # mapping sender_id -> PEM public key.
    bus_public_keys: Path | None = None
    # `require`: every inbound packet must carry a valid signature from a known sender (or
    # our own key), else it is dropped and counted; `off`: signatures are not checked.
    bus_verify: Literal["off", "require"] = "off"

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

    # Artifacts: where the bytes go (`redis`, or `s3` for S3-compatible object storage; the
    # metadata and the `redis://art:<id>` pointers stay in Redis either way), the largest
    # artifact accepted, and the TTL of each retention class.
    artifact_backend: str = "redis"
    artifact_max_bytes: int = 64 * 1024 * 1024
    artifact_ttl_short_s: int = 24 * 3600
    artifact_ttl_standard_s: int = 7 * 24 * 3600
    artifact_ttl_audit_s: int = 30 * 24 * 3600
    artifact_s3_bucket: str = ""
    artifact_s3_prefix: str = "cordum/artifacts/"
    # Empty: AWS itself; else an S3-compatible endpoint (MinIO, Ceph, moto).
    artifact_s3_endpoint_url: str = ""
    artifact_s3_region: str = "us-east-1"
    # Empty: boto3's own credential chain (AWS_* variables, profiles, instance roles).
    artifact_s3_access_key_id: str = ""
    artifact_s3_secret_access_key: str = ""
    # The most ReadMemory returns of one value (bytes of a string, items of a collection).
    memory_read_max_bytes: int = 1024 * 1024
    # Context engine memory (upstream's unprefixed `mem:<memory_id>:*` keys): TTL of every
    # key (refreshed on each write), chat history kept (turns of 2 messages), chunks read per
    # request, chunks retrieved into a RAG window, and the running summary's trigger and size.
    context_memory_ttl_s: int = Field(30 * 24 * 3600, ge=1)
    context_history_turns: int = Field(200, ge=1)
    context_max_chunks: int = Field(500, ge=0)
    context_rag_top_k: int = Field(8, ge=0)
    context_summary_trigger_tokens: int = 2000
    context_summary_max_tokens: int = 300
    # Override timeouts.yaml's reconciler scan interval (tests use short ones).
    reconcile_interval_s: float | None = None

    # -- the edge: API keys, rate limits, request sizes (README "Security") ---------------
    # API keys with tenants and roles (formats in api/auth.py), inline or in a YAML/JSON file.
    api_keys: str = ""
    api_keys_file: Path | None = None
    # Upstream's single keys (first non-empty wins): an admin key for every tenant.
    super_secret_api_token: str = ""
    api_key: str = ""
    legacy_api_key: str = Field("", validation_alias=AliasChoices("API_KEY"))
    # The key this process presents to other Cordum processes (a remote safety kernel);
    # empty: the single key above, if any.
    internal_api_key: str = ""
    # Without API keys the API is open, so it is only served on loopback unless this is set.
    allow_insecure_bind: bool = False
    # Token bucket per API key: requests per second and burst. Unset: 200/s, burst 400
    # when keys are configured, no limit without keys. 0 turns it off.
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None
    # The largest request message the gRPC server accepts (Envoy applies the same to REST).
    max_request_bytes: int = 4 * 1024 * 1024
    # Browser origins allowed by CORS (Envoy) and the WebSocket bridge; comma-separated,
    # `*` for any. Empty: loopback origins only (http(s)://localhost|127.0.0.1|[::1]:<port>).
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices(
            "CORDUM_ALLOWED_ORIGINS", "CORDUM_CORS_ALLOW_ORIGINS", "CORS_ALLOW_ORIGINS"
        ),
    )

    # OpenTelemetry tracing (tracing.py): off unless an OTLP/gRPC endpoint is set, e.g.
    # `http://collector:4317` (`https://` for TLS). Service name: OTEL_SERVICE_NAME, else
    # `cordum` (every role) or `cordum-<roles>`.
    otel_endpoint: str = Field(
        "", validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "CORDUM_OTEL_ENDPOINT")
    )
    otel_service_name: str = Field(
        "", validation_alias=AliasChoices("OTEL_SERVICE_NAME", "CORDUM_OTEL_SERVICE_NAME")
    )

    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_grace_s: float = 10.0

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [r.strip() for r in value.split(",") if r.strip()]
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [o.strip() for o in value.split(",") if o.strip()]
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

    @property
    def single_api_key(self) -> str:
        """Upstream's one key: CORDUM_SUPER_SECRET_API_TOKEN, CORDUM_API_KEY, API_KEY."""
        for value in (self.super_secret_api_token, self.api_key, self.legacy_api_key):
            if value.strip():
                return value.strip()
        return ""
