"""The edge, through real servers: missing or bad keys (UNAUTHENTICATED / 401), open health
and reflection, the per-key rate limit (RESOURCE_EXHAUSTED / 429), request size limits (413
through Envoy, RESOURCE_EXHAUSTED natively), CORS preflights through Envoy for allowed and
refused origins, and the refusal to serve an open API on a public address."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cordum.server.api.auth import StartupRefused
from cordum.server.app import App
from cordum.v1 import (
    job_service_pb2,
    job_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
)

from support.admin import error_reason
from support.auth import key_of, keyed_app, md
from support.cordum import app_settings, running_app, start_envoy_for

ALLOWED = "https://console.example"
SMALL_BODY = 64 * 1024


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with keyed_app(
        nats_url,
        redis_url,
        config_dir,
        allowed_origins=[ALLOWED],
        max_request_bytes=SMALL_BODY,
        # One key is throttled hard; the others never come near it.
        rate_limit_rps=1000,
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def rest(app: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service, url = start_envoy_for(app, tmp_path_factory.mktemp("envoy-edge"))
    try:
        yield url
    finally:
        service.stop()


def status(channel: grpc.aio.Channel) -> status_service_pb2_grpc.StatusServiceStub:
    return status_service_pb2_grpc.StatusServiceStub(channel)


# -- authentication ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "an API key is required"),
        ((("x-api-key", "not-a-key"),), "invalid API key"),
        ((("authorization", "Bearer not-a-key"),), "invalid API key"),
    ],
)
async def test_no_key_or_a_bad_one_is_unauthenticated_over_grpc(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    for call in (
        status(channel).ListWorkers(status_service_pb2.ListWorkersRequest(), metadata=metadata),
        status(channel).GetStatus(status_service_pb2.GetStatusRequest(), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(caught.value) == "UNAUTHENTICATED"
        assert message in (caught.value.details() or "")
    # Streams are refused before their first message.
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in jobs.WatchJob(
            job_service_pb2.WatchJobRequest(job_id="x"), metadata=metadata
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_in_any_accepted_header_works(channel: grpc.aio.Channel) -> None:
    key = key_of("beta-viewer")
    for metadata in (
        (("x-api-key", key),),
        (("authorization", f"Bearer {key}"),),
        (("api-key", key),),
    ):
        await status(channel).ListWorkers(
            status_service_pb2.ListWorkersRequest(), metadata=metadata
        )


async def test_health_and_reflection_need_no_key(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in answer.list_services_response.service}
        assert "cordum.v1.JobService" in names
        break


async def test_no_key_or_a_bad_one_is_401_over_rest(rest: str) -> None:
    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        for headers in ({}, {"x-api-key": "not-a-key"}, {"authorization": "Bearer nope"}):
            reply = await http.get("/api/v1/workers", headers=headers)
            assert reply.status_code == 401, reply.text
            body = reply.json()
            assert body["code"] == 16
            assert body["details"][0]["reason"] == "UNAUTHENTICATED"
        ok = await http.get("/api/v1/workers", headers={"x-api-key": key_of("acme-viewer")})
        assert ok.status_code == 200, ok.text
        bearer = await http.get(
            "/api/v1/status", headers={"authorization": f"Bearer {key_of('acme-viewer')}"}
        )
        assert bearer.status_code == 200, bearer.text
        refused = await http.post(
            "/api/v1/jobs",
            json={"prompt": "x", "topic": "job.t.edge"},
            headers={"x-api-key": key_of("acme-viewer")},
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["details"][0]["reason"] == "PERMISSION_DENIED"


# -- rate limit -------------------------------------------------------------------------


async def test_a_key_over_its_rate_is_refused_and_others_are_not(
    nats_url: str, redis_url: str, config_dir: Path, tmp_path: Path
) -> None:
    settings = app_settings(
        nats_url,
        redis_url,
        config_dir,
        api_keys="slow-key-0123456789@acme:viewer, other-key-0123456789@acme:viewer",
        rate_limit_rps=0.5,
        rate_limit_burst=3,
    )
    async with running_app(settings) as limited:
        envoy, url = start_envoy_for(limited, tmp_path / "envoy")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as ch:
                slow = (("x-api-key", "slow-key-0123456789"),)
                for _ in range(3):
                    await status(ch).ListWorkers(
                        status_service_pb2.ListWorkersRequest(), metadata=slow
                    )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await status(ch).ListWorkers(
                        status_service_pb2.ListWorkersRequest(), metadata=slow
                    )
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_reason(caught.value) == "RATE_LIMITED"
                info = _error_info(caught.value)
                assert 0 < int(info.metadata["retry_after_ms"]) <= 2000
                await status(ch).ListWorkers(
                    status_service_pb2.ListWorkersRequest(),
                    metadata=(("x-api-key", "other-key-0123456789"),),
                )
            async with httpx.AsyncClient(base_url=url, timeout=15) as http:
                reply = await http.get(
                    "/api/v1/workers", headers={"x-api-key": "slow-key-0123456789"}
                )
                assert reply.status_code == 429, reply.text
                assert reply.json()["details"][0]["reason"] == "RATE_LIMITED"
        finally:
            envoy.stop()


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    found = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert found is not None
    info = error_details_pb2.ErrorInfo()
    assert found.details[0].Unpack(info)
    return info


# -- sizes ------------------------------------------------------------------------------


async def test_a_rest_body_over_the_limit_is_413(rest: str) -> None:
    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        reply = await http.post(
            "/api/v1/jobs",
            json={"prompt": "x" * (SMALL_BODY + 1), "topic": "job.t.edge"},
            headers={"x-api-key": key_of("acme-operator")},
        )
    assert reply.status_code == 413, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["code"] == 413


async def test_a_grpc_message_over_the_limit_is_resource_exhausted(
    channel: grpc.aio.Channel,
) -> None:
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(prompt="x" * (SMALL_BODY + 1), topic="job.t.edge"),
            metadata=md("acme-operator"),
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- CORS -------------------------------------------------------------------------------


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, x-api-key, idempotency-key",
    }


async def test_cors_preflight_for_an_allowed_origin(rest: str) -> None:
    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        # No key: browsers send preflights without credentials; Envoy answers them.
        reply = await http.options("/api/v1/policy/bundles/secops%2Fx", headers=preflight(ALLOWED))
        assert reply.status_code == 200, reply.text
        h = reply.headers
        assert h["access-control-allow-origin"] == ALLOWED
        methods = {m.strip() for m in h["access-control-allow-methods"].split(",")}
        assert methods == {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
        allowed = {x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
        assert {
            "content-type",
            "authorization",
            "x-api-key",
            "idempotency-key",
            "x-idempotency-key",
            "x-principal-id",
            "x-requested-with",
            "sec-websocket-protocol",
        } <= allowed
        assert int(h["access-control-max-age"]) > 0
        assert "access-control-allow-credentials" not in h
        # The real request then carries the CORS headers and exposes the gRPC status.
        actual = await http.get(
            "/api/v1/workers", headers={"Origin": ALLOWED, "x-api-key": key_of("acme-viewer")}
        )
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == ALLOWED
        assert "grpc-status" in actual.headers["access-control-expose-headers"]


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://console.example.evil", "http://localhost:3000"]
)
async def test_cors_preflight_for_a_refused_origin(rest: str, origin: str) -> None:
    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        reply = await http.options("/api/v1/jobs", headers=preflight(origin))
        # No Access-Control-Allow-Origin: the browser refuses to send the real request.
        assert "access-control-allow-origin" not in reply.headers, reply.headers
        # Answered by Envoy, never forwarded to the API (the transcoder would say 404).
        assert reply.status_code == 200, reply.text
        assert reply.headers["server"] == "envoy"
        actual = await http.get(
            "/api/v1/workers", headers={"Origin": origin, "x-api-key": key_of("acme-viewer")}
        )
        assert "access-control-allow-origin" not in actual.headers


async def test_without_an_allowlist_only_loopback_origins_are_allowed(
    app: App, tmp_path: Path
) -> None:
    envoy, url = start_envoy_for(app, tmp_path / "envoy", allowed_origins=())
    try:
        async with httpx.AsyncClient(base_url=url, timeout=15) as http:
            local = await http.options("/api/v1/jobs", headers=preflight("http://localhost:5173"))
            assert local.headers["access-control-allow-origin"] == "http://localhost:5173"
            remote = await http.options("/api/v1/jobs", headers=preflight(ALLOWED))
            assert "access-control-allow-origin" not in remote.headers
    finally:
        envoy.stop()


async def test_any_origin_when_the_allowlist_is_a_star(app: App, tmp_path: Path) -> None:
    envoy, url = start_envoy_for(app, tmp_path / "envoy", allowed_origins=("*",))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=15) as http:
            reply = await http.options("/api/v1/jobs", headers=preflight("https://any.example"))
            assert reply.headers["access-control-allow-origin"] == "https://any.example"
    finally:
        envoy.stop()


# -- open API on a public address -------------------------------------------------------
# These apps only need to start: the safety role alone is the quickest to start and stop.
ONE_ROLE = {"roles": ["safety"]}


async def test_without_keys_a_public_address_is_refused(
    nats_url: str, redis_url: str, config_dir: Path
) -> None:
    settings = app_settings(nats_url, redis_url, config_dir, grpc_host="0.0.0.0", **ONE_ROLE)
    with pytest.raises(StartupRefused) as caught:
        async with running_app(settings):
            pass
    assert "refusing to serve an open API on CORDUM_GRPC_HOST=0.0.0.0" in str(caught.value)
    # With keys, the same address is fine.
    keyed = app_settings(
        nats_url,
        redis_url,
        config_dir,
        grpc_host="0.0.0.0",
        api_keys="k-0123456789abcdef",
        **ONE_ROLE,
    )
    async with running_app(keyed) as app:
        assert app.grpc_port > 0


async def test_insecure_bind_is_a_deliberate_act(
    nats_url: str, redis_url: str, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = app_settings(
        nats_url, redis_url, config_dir, grpc_host="0.0.0.0", allow_insecure_bind=True, **ONE_ROLE
    )
    async with running_app(settings) as app:
        assert app.grpc_port > 0
    assert any("the API is OPEN" in r.getMessage() for r in caplog.records)


async def test_without_keys_loopback_serves_and_says_so(
    nats_url: str, redis_url: str, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(app_settings(nats_url, redis_url, config_dir, **ONE_ROLE)) as app:
        assert not app.authenticator.enabled
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("the API is open, served on loopback only" in w for w in warnings)


def test_cordum_server_refuses_with_one_line(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CORDUM_") and k not in ("API_KEY", "NATS_URL", "REDIS_URL")
    }
    env |= {"CORDUM_GRPC_HOST": "0.0.0.0", "CORDUM_LOG_FORMAT": "text"}
    done = subprocess.run(
        [sys.executable, "-m", "cordum.server", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("cordum-server:")]
    assert len(lines) == 1, done.stderr
    assert "refusing to serve an open API on CORDUM_GRPC_HOST=0.0.0.0" in lines[0]
