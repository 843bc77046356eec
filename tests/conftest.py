"""Shared fixtures: real NATS (JetStream) and Valkey servers for the whole test session.

The servers are started with the same launcher ``cordumctl up`` uses
(:mod:`cordum.server.stack.services`), on free loopback ports in a session temp dir, and are
stopped at the end of the session. To test against servers you run yourself instead::

    pytest --nats-url nats://127.0.0.1:4222 --redis-url redis://127.0.0.1:6379/0

Tests isolate their keys and subjects with the ``prefix`` fixture, so one server pair serves
the whole session. To add another session service (envoy, cordum-server), follow the pattern
below: a ``--<name>-url`` option plus a session fixture that starts the service unless the
option is given, and stops it afterwards.
"""

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cordum.server.app import App
from cordum.server.stack.services import start_nats, start_valkey

from support.cordum import app_settings, running_app, start_envoy_for, write_config

# grpc's AioServer.__dealloc__ logs the dying server itself at DEBUG ("__dealloc__ called
# on running server %s") when a server is dropped without having run (an app whose start
# failed). pytest captures DEBUG records, the record resurrects the server, and releasing
# the captured records later frees it twice: a segfault in a later test.
logging.getLogger("grpc._cython.cygrpc").setLevel(logging.INFO)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cordum", "Cordum test servers")
    group.addoption(
        "--nats-url",
        default=None,
        help="use this NATS server (JetStream enabled) instead of starting nats-server",
    )
    group.addoption(
        "--redis-url",
        default=None,
        help="use this Redis/Valkey server instead of starting valkey-server",
    )
    group.addoption(
        "--jetstream",
        action="store_true",
        help="run the apps the tests start in JetStream mode (sets CORDUM_USE_JETSTREAM=1), "
        "e.g. `pytest tests/integration/test_jobs_*.py --jetstream`",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--jetstream"):
        # Read by every Settings the tests build (and by the servers they spawn).
        os.environ["CORDUM_USE_JETSTREAM"] = "1"


@pytest.fixture(scope="session")
def nats_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a NATS server with JetStream; started for the session unless --nats-url is given."""
    external = request.config.getoption("--nats-url")
    if external:
        yield external
        return
    base = tmp_path_factory.mktemp("nats")
    service = start_nats(data_dir=base / "data", log_path=base / "nats-server.log")
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture(scope="session")
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a Valkey server with AOF on; started for the session unless --redis-url is given."""
    external = request.config.getoption("--redis-url")
    if external:
        yield external
        return
    base = tmp_path_factory.mktemp("valkey")
    service = start_valkey(data_dir=base / "data", log_path=base / "valkey-server.log")
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture
def prefix() -> str:
    """A unique short string for per-test key and subject names."""
    return uuid.uuid4().hex[:10]


# -- the Cordum app under test --------------------------------------------------------------


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config/ for the session app: the test policy (rules keyed on job.t.<kind>.* topics)."""
    return write_config(tmp_path_factory.mktemp("config"))


@pytest_asyncio.fixture(scope="session")
async def cordum(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    """One Cordum app (every role) for the session, in its own namespace."""
    async with running_app(app_settings(nats_url, redis_url, config_dir)) as app:
        yield app


@pytest_asyncio.fixture
async def channel(cordum: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cordum.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def rest_url(cordum: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy in front of the session app: REST (and native gRPC) base URL."""
    service, url = start_envoy_for(cordum, tmp_path_factory.mktemp("envoy"))
    try:
        yield url
    finally:
        service.stop()
