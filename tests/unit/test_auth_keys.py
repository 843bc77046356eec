"""API keys: every accepted format, hashing and constant-time matching, how a key is
presented (headers, gRPC metadata, the WebSocket subprotocol), origins and the rate limiter."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest

from cordum.server.api import auth
from cordum.server.api.auth import (
    Authenticator,
    KeyConfigError,
    RateLimiter,
    StartupRefused,
    configured_entries,
    edge_from_settings,
    origin_allowed,
    parse_api_keys,
    probe_key,
    websocket_protocol_key,
)
from cordum.server.errors import CordumError
from cordum.server.settings import Settings


def entries(text: str) -> list[tuple[str, str, str, str]]:
    return [(e.key, e.name, e.tenant, e.role) for e in parse_api_keys(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # upstream's forms: no tenant or role → admin for every tenant
        (
            '[{"key": "k1"}, {"key": "k2", "name": "ci"}]',
            [("k1", "", "*", "admin"), ("k2", "ci", "*", "admin")],
        ),
        (
            '{"k1": {"name": "ci"}, "k2": {}}',
            [("k1", "ci", "*", "admin"), ("k2", "", "*", "admin")],
        ),
        ('{"keys": [{"key": "k1"}]}', [("k1", "", "*", "admin")]),
        ("k1, ci:k2", [("k1", "", "*", "admin"), ("k2", "ci", "*", "admin")]),
        # upstream: the part after the first colon; a later colon ends the key
        ("ci:k2:ignored", [("k2", "ci", "*", "admin")]),
        (" 'k1' , \"ci:k2\" ", [("k1", "", "*", "admin"), ("k2", "ci", "*", "admin")]),
        # our extension: tenant and role
        (
            '[{"key": "k1", "name": "a", "tenant": "acme", "role": "viewer"}]',
            [("k1", "a", "acme", "viewer")],
        ),
        ('{"k1": {"tenant_id": "acme", "role": "OPERATOR"}}', [("k1", "", "acme", "operator")]),
        (
            "k1@acme:viewer, ci:k2@beta:operator, k3@*:admin",
            [
                ("k1", "", "acme", "viewer"),
                ("k2", "ci", "beta", "operator"),
                ("k3", "", "*", "admin"),
            ],
        ),
        ("", []),
    ],
)
def test_every_key_format(text: str, expected: list[tuple[str, str, str, str]]) -> None:
    assert entries(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"key": "k1", "role": "root"}]', "role 'root' must be one of viewer, operator, admin"),
        ('[{"key": "k1", "tenant": "a b"}]', "tenant 'a b' must be `*` or"),
        ('[{"name": "no key"}]', "entry 1: `key` must be a non-empty string"),
        ('[{"key": 5}]', "`key` must be a non-empty string"),
        ('{"k1": ["x"]}', "the value must be an object"),
        ("k1@acme", "item 1: after `@` write `tenant:role`"),
        ("k1, k2@acme:boss", "item 2: role 'boss'"),
        ("[oops", "not valid JSON"),
    ],
)
def test_a_bad_key_entry_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(KeyConfigError) as caught:
        parse_api_keys(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_keys_come_from_the_env_value_the_file_and_the_single_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - key: file-key\n    tenant: acme\n    role: viewer\n")
    settings = Settings(
        api_keys="env-key@beta:operator",
        api_keys_file=path,
        api_key="single-key",
        legacy_api_key="ignored: CORDUM_API_KEY wins",
    )
    got = [(e.key, e.tenant, e.role) for e in configured_entries(settings)]
    assert got == [
        ("env-key", "beta", "operator"),
        ("file-key", "acme", "viewer"),
        ("single-key", "*", "admin"),
    ]
    assert Settings(super_secret_api_token="a", api_key="b").single_api_key == "a"
    assert Settings(legacy_api_key=" c ").single_api_key == "c"
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps({"jk": {"tenant": "acme", "role": "admin"}}))
    assert [e.key for e in configured_entries(Settings(api_keys_file=json_file))] == ["jk"]
    with pytest.raises(KeyConfigError, match="cannot read"):
        configured_entries(Settings(api_keys_file=tmp_path / "missing.yaml"))


def test_a_repeated_key_refuses_the_start() -> None:
    with pytest.raises(KeyConfigError, match="API key 2 repeats key 1"):
        edge_from_settings(Settings(api_keys="same-key@acme:viewer, same-key@beta:admin"))


def test_keys_are_kept_hashed_only() -> None:
    edge = edge_from_settings(Settings(api_keys="a-very-secret-key-123@acme:viewer"))
    (key,) = edge.authenticator.keys
    assert "a-very-secret-key-123" not in repr(key)
    assert key.digest == auth.digest("a-very-secret-key-123")
    assert vars(key).keys() == {
        "name",
        "tenant",
        "role",
        "digest",
        "rate_limit_rps",
        "rate_limit_burst",
    }
    assert key.name == f"key-{key.fingerprint}"


def _authenticator(text: str = "k-acme-viewer@acme:viewer, ops:k-all@*:admin") -> Authenticator:
    return edge_from_settings(Settings(api_keys=text)).authenticator


def test_a_key_is_matched_against_every_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken does not say which key (if any) matched."""
    authn = _authenticator("k1@acme:viewer, k2@acme:viewer, k3@acme:viewer")
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    authn.authenticate(key="k1")
    assert len(compared) == 3
    with pytest.raises(CordumError):
        authn.authenticate(key="nope")
    assert len(compared) == 6


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "k-acme-viewer"},
        {"X-API-Key": "k-acme-viewer"},  # HTTP header names arrive in any case
        {"authorization": "Bearer k-acme-viewer"},
        {"Authorization": "bearer  k-acme-viewer "},
        {"api-key": "k-acme-viewer"},  # upstream's gRPC fallback
        (("x-api-key", b"k-acme-viewer"),),  # gRPC metadata pairs
    ],
)
def test_a_key_is_presented_in_a_header(headers: object) -> None:
    caller = _authenticator().authenticate(headers)  # type: ignore[arg-type]
    assert (caller.tenant, caller.role, caller.principal) == (
        "acme",
        "viewer",
        "key-" + auth.digest("k-acme-viewer").hex()[:8],
    )


def test_the_principal_is_the_named_one_else_the_keys_name() -> None:
    authn = _authenticator()
    assert authn.authenticate({"x-api-key": "k-all"}).principal == "ops"
    caller = authn.authenticate({"x-api-key": "k-all", "x-principal-id": "alice"})
    assert (caller.principal, caller.tenant, caller.role) == ("alice", None, "admin")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "an API key is required"),
        ({"x-api-key": "wrong"}, "invalid API key"),
        ({"authorization": "Basic azE6"}, "an API key is required"),
    ],
)
def test_no_key_or_an_unknown_one_is_unauthenticated(headers: dict[str, str], message: str) -> None:
    with pytest.raises(CordumError) as caught:
        _authenticator().authenticate(headers)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason_name == "UNAUTHENTICATED"
    assert message in caught.value.message


def test_without_keys_everyone_is_an_admin_for_every_tenant() -> None:
    authn = Authenticator([])
    assert not authn.enabled
    caller = authn.authenticate({"x-api-key": "anything", "x-principal-id": "bob"})
    assert (caller.tenant, caller.role, caller.principal) == (None, "admin", "bob")


def b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("protocol", "answer"),
    [
        (f"cordum-api-key, {b64url('k-acme-viewer')}", "cordum-api-key"),
        (f"cordum-api-key,{base64.b64encode(b'k-acme-viewer').decode()}", "cordum-api-key"),
        ("cordum-api-key, k-acme-viewer", "cordum-api-key"),  # the token as written
        (f"cordum-api-key.{b64url('k-acme-viewer')}", f"cordum-api-key.{b64url('k-acme-viewer')}"),
    ],
)
def test_a_browser_presents_the_key_as_a_websocket_subprotocol(protocol: str, answer: str) -> None:
    caller, chosen = _authenticator().authenticate_websocket({"Sec-WebSocket-Protocol": protocol})
    assert (caller.tenant, caller.role) == ("acme", "viewer")
    assert chosen == answer


def test_a_websocket_header_key_needs_no_subprotocol() -> None:
    caller, chosen = _authenticator().authenticate_websocket({"x-api-key": "k-all"})
    assert (caller.tenant, chosen) == (None, None)
    for headers in (
        {},
        {"sec-websocket-protocol": "chat"},
        {"sec-websocket-protocol": "cordum-api-key"},
    ):
        with pytest.raises(CordumError, match="required"):
            _authenticator().authenticate_websocket(headers)
    with pytest.raises(CordumError, match="invalid API key"):
        _authenticator().authenticate_websocket(
            {"sec-websocket-protocol": f"cordum-api-key, {b64url('wrong')}"}
        )
    assert websocket_protocol_key("graphql-ws") is None


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        ("", [], True),  # not a browser
        ("http://localhost:3000", [], True),
        ("https://127.0.0.1", [], True),
        ("http://[::1]:8080", [], True),
        ("https://evil.example", [], False),
        ("http://localhost.evil.example", [], False),
        ("http://localhost:99999", [], False),
        ("https://app.example", ["https://app.example"], True),
        ("https://app.example.evil", ["https://app.example"], False),
        ("http://localhost:3000", ["https://app.example"], False),
        ("https://anything", ["*"], True),
    ],
)
def test_origins(origin: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


def test_the_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0  # one bucket per key
    now[0] += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0


def test_a_rate_limited_key_gets_resource_exhausted_with_the_retry_delay() -> None:
    edge = edge_from_settings(
        Settings(api_keys="k1@acme:viewer, k2@acme:viewer", rate_limit_rps=1, rate_limit_burst=1)
    )
    authn = edge.authenticator
    authn.authenticate(key="k1")
    with pytest.raises(CordumError) as caught:
        authn.authenticate(key="k1")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.reason_name == "RATE_LIMITED"
    assert 0 < int(caught.value.metadata["retry_after_ms"]) <= 1000
    authn.authenticate(key="k2")


def test_rate_limit_defaults() -> None:
    keyed = edge_from_settings(Settings(api_keys="k1@acme:viewer")).authenticator.limiter
    assert (keyed.rate, keyed.burst) == (200.0, 400)
    assert not edge_from_settings(Settings()).authenticator.rate_limited
    assert not edge_from_settings(
        Settings(api_keys="k1", rate_limit_rps=0)
    ).authenticator.rate_limited
    open_limited = edge_from_settings(Settings(rate_limit_rps=5)).interceptors()
    assert len(open_limited) == 1  # a rate limit without keys still needs the interceptor
    assert edge_from_settings(Settings()).interceptors() == []
    with pytest.raises(StartupRefused, match="CORDUM_RATE_LIMIT_RPS"):
        edge_from_settings(Settings(rate_limit_rps=-1))


def test_a_key_may_have_its_own_rate_limit() -> None:
    keys = json.dumps(
        [
            {"key": "internal", "rate_limit_rps": 0},
            {
                "key": "tight",
                "tenant": "acme",
                "role": "viewer",
                "rate_limit_rps": 1,
                "rate_limit_burst": 2,
            },
            {"key": "default", "tenant": "acme", "role": "viewer"},
        ]
    )
    authn = edge_from_settings(
        Settings(api_keys=keys, rate_limit_rps=1, rate_limit_burst=5)
    ).authenticator
    for _ in range(20):
        authn.authenticate(key="internal")
    authn.authenticate(key="tight")
    authn.authenticate(key="tight")
    with pytest.raises(CordumError, match=r"rate limit of 1 requests/s \(burst 2\)"):
        authn.authenticate(key="tight")
    for _ in range(5):
        authn.authenticate(key="default")
    with pytest.raises(CordumError, match="burst 5"):
        authn.authenticate(key="default")
    for bad in (
        '{"k": {"rate_limit_rps": -1}}',
        '{"k": {"rate_limit_burst": 0}}',
        '{"k": {"rate_limit_rps": "x"}}',
    ):
        with pytest.raises(KeyConfigError, match="rate_limit"):
            parse_api_keys(bad)


@pytest.mark.parametrize(
    ("host", "keys", "insecure", "refused"),
    [
        ("127.0.0.1", "", False, False),
        ("localhost", "", False, False),
        ("::1", "", False, False),
        ("0.0.0.0", "", False, True),
        ("10.1.2.3", "", False, True),
        ("0.0.0.0", "", True, False),
        ("0.0.0.0", "k1@acme:viewer", False, False),
    ],
)
def test_without_keys_only_loopback_is_served(
    host: str, keys: str, insecure: bool, refused: bool
) -> None:
    settings = Settings(grpc_host=host, api_keys=keys, allow_insecure_bind=insecure)
    if refused:
        with pytest.raises(StartupRefused) as caught:
            edge_from_settings(settings)
        assert f"CORDUM_GRPC_HOST={host}" in str(caught.value)
        assert "CORDUM_ALLOW_INSECURE_BIND=1" in str(caught.value)
    else:
        edge_from_settings(settings)


def test_the_internal_key_is_not_rate_limited() -> None:
    authn = edge_from_settings(
        Settings(
            api_keys="inside-0123456789@*:operator, user-0123456789@acme:viewer",
            internal_api_key="inside-0123456789",
            rate_limit_rps=1,
            rate_limit_burst=1,
        )
    ).authenticator
    for _ in range(10):
        authn.authenticate(key="inside-0123456789")
    authn.authenticate(key="user-0123456789")
    with pytest.raises(CordumError, match="rate limit"):
        authn.authenticate(key="user-0123456789")


def test_the_internal_key_defaults_to_the_single_key() -> None:
    assert edge_from_settings(Settings(api_key="one-key")).internal_key == "one-key"
    assert (
        edge_from_settings(Settings(api_keys="k1@*:operator", internal_api_key="k1")).internal_key
        == "k1"
    )
    assert edge_from_settings(Settings(api_keys="k1@*:operator")).internal_key == ""


def test_tooling_finds_a_key_in_the_servers_environment(tmp_path: Path) -> None:
    assert probe_key({}) is None
    assert probe_key({"CORDUM_API_KEYS": "a@acme:viewer,b"}) == "a"
    assert probe_key({"CORDUM_API_KEYS": "a@acme:viewer", "API_KEY": "single"}) == "single"
    path = tmp_path / "keys.yaml"
    path.write_text("- key: from-file\n")
    assert probe_key({"CORDUM_API_KEYS_FILE": str(path)}) == "from-file"
