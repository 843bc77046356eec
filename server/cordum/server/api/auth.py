"""API keys, tenants, roles and rate limits: who is calling, and may they.

Where the check runs: a grpc.aio server interceptor, not Envoy ext_authz. Every way in ends
at the gateway's gRPC server (native gRPC, with or without Envoy; REST through Envoy, whose
`x-api-key` and `authorization` headers arrive as gRPC metadata), so one in-process check
covers them all with no extra network hop per call and no authorization service to run,
scale and secure; native gRPC clients that talk to the gateway directly are checked too,
which an Envoy-only check would miss. The WebSocket bridge (its own listener) calls the
same `Authenticator` (`authenticate_websocket`), so the three paths share one key table,
one role table (api/roles.py) and one rate limiter.

Keys (README "Security" has the user-facing version):

- `CORDUM_API_KEYS`, in any of upstream's forms, each entry optionally extended with a
  tenant and a role:
    - JSON array `[{"key": "...", "name": "ci", "tenant": "acme", "role": "operator"}]`
    - JSON object keyed by the key `{"<key>": {"name": "ci", "tenant": "acme", "role": ...}}`
    - JSON `{"keys": [ ...entries as in the array... ]}`
    - comma-separated items `key`, `name:key`, `key@tenant:role` or `name:key@tenant:role`
      (in this form keys cannot contain `,`, `:` or `@`; use JSON for such keys);
- `CORDUM_API_KEYS_FILE`: a YAML or JSON file holding any of the JSON forms;
- upstream's single key, the first non-empty of `CORDUM_SUPER_SECRET_API_TOKEN`,
  `CORDUM_API_KEY`, `API_KEY`.
`tenant` is a tenant id or `*` (every tenant); `role` is admin, operator or viewer. An
entry that gives neither is an admin for every tenant, which is what every upstream key was
(one tenant per process, roles never enforced); give new keys both. JSON entries may also
set `rate_limit_rps` (0: unlimited, e.g. for the key processes use between themselves) and
`rate_limit_burst`, overriding CORDUM_RATE_LIMIT_RPS/_BURST for that key; the key named by
CORDUM_INTERNAL_API_KEY (what processes present to each other) is unlimited by default.

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every
configured digest (no early exit), so neither the key nor its position leaks through timing.
A key is presented as `x-api-key` (or upstream's `api-key`), or `authorization: Bearer <key>`;
the principal is the `x-principal-id` header, else the key's name.

With no keys configured the API is open (every caller an admin for every tenant, as
upstream), so the server refuses to listen on anything but loopback unless
`CORDUM_ALLOW_INSECURE_BIND=1`, and says so at start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import yaml
from grpc_status import rpc_status

from cordum.server.api import roles
from cordum.server.api.metadata import CURRENT_CALLER
from cordum.server.errors import CordumError, permission_denied, unauthenticated
from cordum.server.services.caller import Caller
from cordum.server.services.job_validation import TENANT_RE
from cordum.server.settings import Settings
from cordum.v1 import error_reason_pb2

logger = logging.getLogger(__name__)

ALL_TENANTS = "*"
WS_PROTOCOL = "cordum-api-key"
DEFAULT_RATE_RPS = 200.0
# Keys shorter than this are accepted (upstream accepted anything) but logged.
SHORT_KEY = 16
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

HeaderSource = Mapping[str, Any] | Iterable[tuple[str, Any]]


class StartupRefused(Exception):
    """The server must not start with these settings; the message is one clear line."""


class KeyConfigError(StartupRefused):
    pass


# -- keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """One configured key as written (the secret in clear; never kept after loading)."""

    key: str = field(repr=False)
    name: str = ""
    tenant: str = ALL_TENANTS
    role: str = roles.ADMIN
    # This key's own rate limit (JSON forms only); None: the server's default.
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True)
class ApiKey:
    name: str
    # None: every tenant.
    tenant: str | None
    role: str
    digest: bytes = field(repr=False)
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None

    @property
    def fingerprint(self) -> str:
        """Safe to log: the first 8 hex digits of the key's SHA-256."""
        return self.digest.hex()[:8]


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _clean(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return value


def _entry(where: str, key: Any, name: Any = "", tenant: Any = None, role: Any = None) -> KeyEntry:
    if not isinstance(key, str) or not _clean(key):
        raise KeyConfigError(f"{where}: `key` must be a non-empty string")
    for what, value in (("name", name), ("tenant", tenant), ("role", role)):
        if value is not None and not isinstance(value, str):
            raise KeyConfigError(f"{where}: `{what}` must be a string")
    tenant = _clean(tenant or "") or ALL_TENANTS
    role = _clean(role or "").lower() or roles.ADMIN
    if tenant != ALL_TENANTS and not TENANT_RE.match(tenant):
        raise KeyConfigError(
            f"{where}: tenant {tenant!r} must be `*` or 1-100 characters from [A-Za-z0-9._-]"
        )
    if role not in roles.ROLES:
        raise KeyConfigError(f"{where}: role {role!r} must be one of {', '.join(roles.ROLES)}")
    return KeyEntry(key=_clean(key), name=_clean(name or ""), tenant=tenant, role=role)


def _json_entry(where: str, key: Any, meta: Mapping[str, Any]) -> KeyEntry:
    entry = _entry(where, key, meta.get("name"), _tenant_of(meta), meta.get("role"))
    rate, burst = meta.get("rate_limit_rps"), meta.get("rate_limit_burst")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0
    ):
        raise KeyConfigError(f"{where}: `rate_limit_rps` must be a number >= 0 (0: no limit)")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise KeyConfigError(f"{where}: `rate_limit_burst` must be an integer >= 1")
    return replace(
        entry,
        rate_limit_rps=float(rate) if rate is not None else None,
        rate_limit_burst=burst,
    )


def _json_entries(doc: Any, source: str) -> list[KeyEntry]:
    if isinstance(doc, Mapping) and set(doc) == {"keys"}:
        doc = doc["keys"]
    if isinstance(doc, Mapping):
        out = []
        for i, (key, meta) in enumerate(doc.items(), 1):
            where = f"{source} entry {i}"
            if meta is None:
                meta = {}
            elif isinstance(meta, str):
                meta = {"name": meta}
            elif not isinstance(meta, Mapping):
                raise KeyConfigError(f"{where}: the value must be an object (name, tenant, role)")
            out.append(_json_entry(where, key, meta))
        return out
    if isinstance(doc, list):
        out = []
        for i, item in enumerate(doc, 1):
            where = f"{source} entry {i}"
            if isinstance(item, str):
                out.append(_csv_item(item, where))
            elif isinstance(item, Mapping):
                out.append(_json_entry(where, item.get("key"), item))
            else:
                raise KeyConfigError(f"{where}: must be an object with `key` (or a string)")
        return out
    raise KeyConfigError(f"{source}: expected a list of keys, an object, or {{keys: [...]}}")


def _tenant_of(meta: Mapping[str, Any]) -> Any:
    return meta.get("tenant", meta.get("tenant_id"))


def _csv_item(item: str, where: str) -> KeyEntry:
    item = _clean(item)
    tenant = role = None
    head, at, scope = item.rpartition("@")
    if at:
        tenant, colon, role = scope.partition(":")
        if not colon:
            raise KeyConfigError(
                f"{where}: after `@` write `tenant:role` (for example key@acme:operator)"
            )
        item = head
    name, colon, rest = item.partition(":")
    # Upstream: `name:key` keeps the part after the first colon; later colons end the key.
    key = rest.split(":", 1)[0] if colon else name
    return _entry(where, key, name if colon else "", tenant, role)


def parse_api_keys(text: str, source: str = "CORDUM_API_KEYS") -> list[KeyEntry]:
    """Every entry of a CORDUM_API_KEYS value (JSON forms or comma-separated items)."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            doc = json.loads(text)
        except ValueError as error:
            raise KeyConfigError(f"{source}: not valid JSON: {error}") from error
        return _json_entries(doc, source)
    items = [i for i in text.split(",") if i.strip()]
    return [_csv_item(item, f"{source} item {n}") for n, item in enumerate(items, 1)]


def read_keys_file(path: Path) -> list[KeyEntry]:
    source = f"CORDUM_API_KEYS_FILE {path}"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KeyConfigError(f"{source}: cannot read: {error.strerror or error}") from error
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise KeyConfigError(f"{source}: not valid YAML/JSON: {error}") from error
    if doc is None:
        return []
    return _json_entries(doc, source)


def configured_entries(settings: Settings) -> list[KeyEntry]:
    """Every key the settings configure, from all three sources."""
    entries = parse_api_keys(settings.api_keys)
    if settings.api_keys_file is not None:
        entries += read_keys_file(settings.api_keys_file)
    single = settings.single_api_key
    if single:
        entries.append(_entry("the single API key", single, "api-key"))
    return entries


def _hashed(entries: Sequence[KeyEntry]) -> list[ApiKey]:
    keys: list[ApiKey] = []
    seen: dict[bytes, int] = {}
    for n, entry in enumerate(entries, 1):
        d = digest(entry.key)
        if d in seen:
            raise KeyConfigError(f"API key {n} repeats key {seen[d]} (each key once)")
        seen[d] = n
        if len(entry.key) < SHORT_KEY:
            logger.warning(
                "API key %s is shorter than %d characters; use long random keys",
                entry.name or f"#{n}",
                SHORT_KEY,
            )
        keys.append(
            ApiKey(
                name=entry.name or f"key-{d.hex()[:8]}",
                tenant=None if entry.tenant == ALL_TENANTS else entry.tenant,
                role=entry.role,
                digest=d,
                rate_limit_rps=entry.rate_limit_rps,
                rate_limit_burst=entry.rate_limit_burst,
            )
        )
    return keys


# -- presenting a key ----------------------------------------------------------------------


def _pairs(headers: HeaderSource | None) -> Iterable[tuple[str, Any]]:
    if headers is None:
        return ()
    items = getattr(headers, "items", None)
    return items() if callable(items) else headers


def _header_values(headers: HeaderSource | None) -> dict[str, str]:
    """Lower-cased names; the first value of each (aiohttp headers, gRPC metadata, dicts)."""
    out: dict[str, str] = {}
    for name, value in _pairs(headers):
        lname = name.lower()
        if lname not in out:
            out[lname] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return out


def presented_key(values: Mapping[str, str]) -> str | None:
    """The key in `x-api-key`, `authorization: Bearer`, or `api-key` (upstream's fallback)."""
    key = values.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = values.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = values.get("api-key", "").strip()
    return key or None


def _decodings(token: str) -> list[str]:
    """Upstream's order: base64url without padding, standard base64, the token as written."""
    out = []
    padded = token + "=" * (-len(token) % 4)
    for decode in (base64.urlsafe_b64decode, base64.b64decode):
        try:
            text = decode(padded.encode()).decode("utf-8")
        except (binascii.Error, ValueError):
            continue
        if text and text.isprintable() and text not in out:
            out.append(text)
    if token not in out:
        out.append(token)
    return out


def websocket_protocol_key(header: str) -> tuple[list[str], str] | None:
    """The key candidates in a `Sec-WebSocket-Protocol` header, and the protocol to answer.

    Browsers cannot set headers on a WebSocket, so upstream accepts the key as a protocol:
    `cordum-api-key, <base64url key>` (answer `cordum-api-key`) or one protocol
    `cordum-api-key.<token>` (answer it whole, the only one offered). None: no key there.
    """
    offered = [p.strip() for p in header.split(",") if p.strip()]
    if WS_PROTOCOL in offered:
        i = offered.index(WS_PROTOCOL)
        if i + 1 < len(offered):
            return _decodings(offered[i + 1]), WS_PROTOCOL
    for protocol in offered:
        if protocol.startswith(WS_PROTOCOL + ".") and len(protocol) > len(WS_PROTOCOL) + 1:
            return _decodings(protocol[len(WS_PROTOCOL) + 1 :]), protocol
    return None


def origin_allowed(origin: str, allowed: Sequence[str]) -> bool:
    """The CORS rule Envoy applies, for the WebSocket bridge's own Origin check: exact match
    against the list (`*` = any); with no list, loopback origins only."""
    if not origin:
        return True  # not a browser
    if allowed:
        return "*" in allowed or origin in allowed
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS


# -- the authenticator ---------------------------------------------------------------------


class RateLimiter:
    """A token bucket per API key: `rate` requests per second, up to `burst` at once (the
    server's default; a key may have its own). A rate of 0 is no limit."""

    def __init__(
        self, rate: float = 0.0, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}

    def limits_for(self, api_key: ApiKey | None) -> tuple[float, int]:
        if api_key is None or api_key.rate_limit_rps is None:
            return self.rate, self.burst
        rate = api_key.rate_limit_rps
        return rate, api_key.rate_limit_burst or max(1, int(rate * 2))

    def take(self, bucket: str, rate: float | None = None, burst: int | None = None) -> float:
        """0 when a request may go now, else the seconds until one may."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0.0
        capacity = float(self.burst if burst is None else burst)
        now = self._clock()
        state = self._buckets.get(bucket)
        if state is None:
            state = self._buckets[bucket] = [capacity, now]
        tokens = min(capacity, state[0] + (now - state[1]) * rate)
        state[1] = now
        if tokens >= 1.0:
            state[0] = tokens - 1.0
            return 0.0
        state[0] = tokens
        return (1.0 - tokens) / rate


class Authenticator:
    """Turns presented credentials into a `Caller`; shared by gRPC and the WebSocket bridge."""

    def __init__(self, keys: Sequence[ApiKey], limiter: RateLimiter | None = None) -> None:
        self.keys = tuple(keys)
        self.limiter = limiter or RateLimiter()

    @property
    def rate_limited(self) -> bool:
        """Whether any call may be rate-limited (a default rate, or a key with its own)."""
        return self.limiter.rate > 0 or any(k.rate_limit_rps for k in self.keys)

    @property
    def enabled(self) -> bool:
        """Whether keys are required (any key configured)."""
        return bool(self.keys)

    def identify(self, key: str | None) -> ApiKey | None:
        """The configured key matching `key`; None when no keys are configured."""
        if not self.keys:
            return None
        if not key:
            raise unauthenticated(
                "an API key is required: send `x-api-key: <key>` or `authorization: Bearer <key>`"
            )
        presented = digest(key)
        found = None
        for candidate in self.keys:  # every one, so timing does not depend on which
            if hmac.compare_digest(candidate.digest, presented):
                found = candidate
        if found is None:
            raise unauthenticated("invalid API key")
        return found

    def _caller(self, api_key: ApiKey | None, principal: str) -> Caller:
        self._limit(api_key)
        if api_key is None:
            return Caller(tenant=None, principal=principal, role=roles.ADMIN)
        return Caller(tenant=api_key.tenant, principal=principal or api_key.name, role=api_key.role)

    def _limit(self, api_key: ApiKey | None) -> None:
        rate, burst = self.limiter.limits_for(api_key)
        wait_s = self.limiter.take(api_key.fingerprint if api_key else "", rate, burst)
        if wait_s > 0:
            retry_ms = max(1, int(wait_s * 1000 + 0.999))
            who = f"API key {api_key.name!r}" if api_key else "this server"
            raise CordumError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                error_reason_pb2.ERROR_REASON_RATE_LIMITED,
                f"rate limit of {rate:g} requests/s (burst {burst}) for {who} exceeded; "
                f"retry in {retry_ms} ms",
                metadata={"retry_after_ms": str(retry_ms)},
            )

    def authenticate(
        self, headers: HeaderSource | None = None, *, key: str | None = None
    ) -> Caller:
        """The caller presenting `headers` (or `key`); raises CordumError UNAUTHENTICATED
        (no key, unknown key) or RESOURCE_EXHAUSTED (the key's rate limit)."""
        values = _header_values(headers)
        api_key = self.identify(key if key is not None else presented_key(values))
        return self._caller(api_key, values.get("x-principal-id", "").strip())

    def authenticate_websocket(self, headers: HeaderSource) -> tuple[Caller, str | None]:
        """For a WebSocket upgrade: the headers' key, else the one in
        `Sec-WebSocket-Protocol`. Returns the caller and the protocol to answer with (None
        when the key did not come as a protocol)."""
        values = _header_values(headers)
        principal = values.get("x-principal-id", "").strip()
        if presented_key(values) is not None or not self.keys:
            return self.authenticate(values), None
        offered = websocket_protocol_key(values.get("sec-websocket-protocol", ""))
        if offered is None:
            self.identify(None)  # raises: a key is required
            raise AssertionError("unreachable")
        candidates, protocol = offered
        for candidate in candidates:
            try:
                api_key = self.identify(candidate)
            except CordumError:
                continue
            return self._caller(api_key, principal), protocol
        raise unauthenticated("invalid API key")

    @staticmethod
    def authorize(caller: Caller, needed: str | None, what: str) -> None:
        """Refuse (PERMISSION_DENIED) a caller below the `needed` access level (roles.py)."""
        if needed is None or roles.allows(caller.role, caller.all_tenants, needed):
            return
        if needed == roles.PLATFORM and caller.role == roles.ADMIN:
            caller.require_all_tenants(what)
        level = "admin role for every tenant" if needed == roles.PLATFORM else f"{needed} role"
        raise permission_denied(f"{what} needs the {level}; this API key has {caller.role}")


# -- the gRPC interceptor ------------------------------------------------------------------


def _refusal(handler: grpc.RpcMethodHandler, error: CordumError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with `error`."""
    status = rpc_status.to_status(error.to_status_proto())

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, rate-limits and authorizes every call before its handler runs, and
    leaves the `Caller` in `CURRENT_CALLER` (read by `metadata.caller`). An allowed call
    gets its handler untouched: the check costs one SHA-256 and a compare per key."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator
        self._warned: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needed = roles.access_for(method)
        if handler is None or needed is None:  # unknown (UNIMPLEMENTED), or open
            return handler
        if method not in roles.METHOD_ACCESS and method not in self._warned:
            # Served but missing from the table (finite: only served methods get here).
            self._warned.add(method)
            logger.warning("%s has no row in api/roles.py; treated as platform-admin", method)
        try:
            caller = self._auth.authenticate(handler_call_details.invocation_metadata)
            self._auth.authorize(caller, needed, method.lstrip("/").replace("cordum.v1.", ""))
        except CordumError as error:
            return _refusal(handler, error)
        CURRENT_CALLER.set(caller)  # this task serves this one call only
        return handler


# -- wiring --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Edge:
    """What the server's edge needs, built once from the settings."""

    authenticator: Authenticator
    # The key this process presents to other Cordum processes ("" = none).
    internal_key: str
    max_request_bytes: int

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # Without keys or a rate limit there is nothing to check: no per-call cost at all.
        if not self.authenticator.enabled and not self.authenticator.rate_limited:
            return []
        return [AuthInterceptor(self.authenticator)]

    def server_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", self.max_request_bytes)]


def edge_from_settings(settings: Settings) -> Edge:
    """Keys, limiter and bind check; raises StartupRefused with one clear line."""
    keys = _hashed(configured_entries(settings))
    internal = settings.internal_api_key.strip()
    if internal and keys:
        # Processes calling each other (the scheduler's policy checks) are never throttled,
        # unless the key's entry sets a limit of its own.
        found = digest(internal)
        keys = [
            replace(k, rate_limit_rps=0.0) if k.digest == found and k.rate_limit_rps is None else k
            for k in keys
        ]
        if not any(k.digest == found for k in keys):
            logger.warning("CORDUM_INTERNAL_API_KEY is not one of the configured API keys")
    rate = settings.rate_limit_rps
    if rate is None:
        rate = DEFAULT_RATE_RPS if keys else 0.0
    if rate < 0 or (settings.rate_limit_burst is not None and settings.rate_limit_burst < 1):
        raise StartupRefused(
            "CORDUM_RATE_LIMIT_RPS must be >= 0 (0: no limit) and CORDUM_RATE_LIMIT_BURST >= 1"
        )
    if settings.max_request_bytes < 1024:
        raise StartupRefused("CORDUM_MAX_REQUEST_BYTES must be at least 1024")
    limiter = RateLimiter(rate, settings.rate_limit_burst or max(1, int(rate * 2)))
    hosts = {"CORDUM_GRPC_HOST": settings.grpc_host, "CORDUM_WS_HOST": settings.ws_host}
    exposed = {name: host for name, host in hosts.items() if not is_loopback(host)}
    if keys:
        tenants = sorted({k.tenant or ALL_TENANTS for k in keys})
        logger.info("API keys required: %d key(s), tenants %s", len(keys), ", ".join(tenants))
    elif exposed and not settings.allow_insecure_bind:
        name, host = next(iter(exposed.items()))
        raise StartupRefused(
            f"refusing to serve an open API on {name}={host}: no API keys are configured. "
            "Set CORDUM_API_KEYS (or CORDUM_API_KEYS_FILE), bind 127.0.0.1, or set "
            "CORDUM_ALLOW_INSECURE_BIND=1 to serve without keys anyway"
        )
    elif exposed:
        logger.warning(
            "no API keys configured and CORDUM_ALLOW_INSECURE_BIND=1: the API is OPEN to "
            "anyone who can reach %s",
            ", ".join(exposed.values()),
        )
    else:
        logger.warning(
            "no API keys configured (CORDUM_API_KEYS): the API is open, served on loopback only"
        )
    return Edge(
        authenticator=Authenticator(keys, limiter),
        internal_key=settings.internal_api_key.strip() or settings.single_api_key,
        max_request_bytes=settings.max_request_bytes,
    )


def probe_key(env: Mapping[str, str]) -> str | None:
    """A key local tooling (the stack launcher's readiness probes) can present, from the
    server's environment: the single key, else the first configured one."""
    for name in ("CORDUM_SUPER_SECRET_API_TOKEN", "CORDUM_API_KEY", "API_KEY"):
        if env.get(name, "").strip():
            return env[name].strip()
    entries = parse_api_keys(env.get("CORDUM_API_KEYS", ""))
    if env.get("CORDUM_API_KEYS_FILE"):
        entries += read_keys_file(Path(env["CORDUM_API_KEYS_FILE"]))
    return entries[0].key if entries else None
