"""The embedded stack end to end: the same launcher `cordumctl up` uses starts nats-server,
valkey-server, cordum-server, Envoy and the example worker on free loopback ports; the
gRPC health service answers natively and `GET /api/v1/status` answers through Envoy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cordum.server.stack.launcher import Stack, StackSettings, read_state
from cordum.server.stack.process import PortInUseError, pick_free_port
from cordum.v1 import status_service_pb2, status_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "echo_worker.py"
CORDUMCTL = Path(sys.executable).parent / "cordumctl"


def free_ports() -> dict[str, int]:
    names = ("grpc", "rest", "ws", "nats", "redis", "metrics", "admin")
    return {name: pick_free_port() for name in names}


def settings_for(data_dir: Path, ports: dict[str, int], **extra: object) -> StackSettings:
    return StackSettings(
        data_dir=data_dir,
        grpc_port=ports["grpc"],
        rest_port=ports["rest"],
        ws_port=ports["ws"],
        nats_port=ports["nats"],
        redis_port=ports["redis"],
        metrics_port=ports["metrics"],
        envoy_admin_port=ports["admin"],
        config_dir=ROOT / "config",
        **extra,  # type: ignore[arg-type]
    )


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    worker_id = f"echo-{uuid.uuid4().hex[:8]}"
    s = settings_for(
        tmp_path_factory.mktemp("stack"), free_ports(), worker_script=WORKER, worker_id=worker_id
    )
    running = Stack(s)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_grpc_health_answers_natively(stack: Stack) -> None:
    with grpc.insecure_channel(stack.endpoints().grpc) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="cordum.v1.JobService"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_rest_status_through_envoy(stack: Stack) -> None:
    reply = httpx.get(stack.endpoints().rest + "/api/v1/status", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["nats"]["connected"] is True
    assert body["redis"]["ok"] is True
    assert body["workers"]["count"] >= 1
    assert set(body["roles"]) == {"gateway", "scheduler", "safety", "workflow", "context"}


def test_example_worker_is_registered(stack: Stack) -> None:
    reply = httpx.get(stack.endpoints().rest + "/api/v1/workers", timeout=5)
    assert reply.status_code == 200
    workers = {w["worker_id"]: w for w in reply.json()["workers"]}
    worker = workers[stack.settings.worker_id]
    assert worker["live"] is True
    assert "job.echo" in worker["topics"]


def test_native_grpc_through_envoy(stack: Stack) -> None:
    target = stack.endpoints().rest.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        reply = status_service_pb2_grpc.StatusServiceStub(channel).GetStatus(
            status_service_pb2.GetStatusRequest(), timeout=5
        )
    assert reply.redis.ok


def test_envoy_errors_are_json(stack: Stack) -> None:
    rest = stack.endpoints().rest
    unknown_api = httpx.get(rest + "/api/v1/no-such-thing", timeout=5)
    assert unknown_api.status_code == 404
    assert unknown_api.json()["code"] == 404
    unknown_path = httpx.get(rest + "/elsewhere", timeout=5)
    assert unknown_path.status_code == 404
    assert unknown_path.json()["code"] == 404
    bad_query = httpx.get(rest + "/api/v1/status?bogus=1", timeout=5)
    assert bad_query.status_code == 400
    assert "bogus" in bad_query.json()["message"]


def test_event_websocket_through_envoy(stack: Stack) -> None:
    """`cordumctl up` wires the gateway's WebSocket bridge behind Envoy: the stream shows
    the example worker's heartbeats (the stack has no keys: every tenant's view)."""

    async def first_heartbeat() -> dict[str, Any]:
        url = stack.endpoints().websocket + "?kinds=heartbeat"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            assert (await ws.receive_json(timeout=10))["kind"] == "stream_start"
            return dict(await ws.receive_json(timeout=20))

    event = asyncio.run(first_heartbeat())
    assert event["packet"]["heartbeat"]["worker_id"] == stack.settings.worker_id


def test_metrics_endpoint_serves_prometheus_text(stack: Stack) -> None:
    reply = httpx.get(stack.endpoints().metrics, timeout=5)
    assert reply.status_code == 200
    assert "# HELP" in reply.text or "# TYPE" in reply.text


def test_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    ports = free_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["nats"]))
        blocker.listen()
        with pytest.raises(PortInUseError) as info:
            Stack(settings_for(tmp_path, ports)).check()
    message = str(info.value)
    assert "\n" not in message
    assert str(ports["nats"]) in message and "nats-server" in message


def cordumctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CORDUMCTL), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def port_args(ports: dict[str, int]) -> list[str]:
    return [
        f"--grpc-port={ports['grpc']}",
        f"--rest-port={ports['rest']}",
        f"--ws-port={ports['ws']}",
        f"--nats-port={ports['nats']}",
        f"--redis-port={ports['redis']}",
        f"--metrics-port={ports['metrics']}",
        f"--admin-port={ports['admin']}",
    ]


def test_cli_detach_status_down_keeps_data(tmp_path: Path) -> None:
    ports = free_ports()
    data = ["--data-dir", str(tmp_path / "data")]
    up = cordumctl("up", "--detach", "--no-worker", *data, *port_args(ports))
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        status = cordumctl("status", "--json", *data)
        assert status.returncode == 0, status.stderr + status.stdout
        doc = json.loads(status.stdout)
        assert doc["healthy"] is True
        assert doc["endpoints"]["rest"] == f"http://127.0.0.1:{ports['rest']}"
        assert set(doc["components"]) == {"nats-server", "valkey-server", "cordum-server", "envoy"}
        pids = [c["pid"] for c in doc["components"].values()]
        redis.Redis(port=ports["redis"]).set("survives", "yes")
    finally:
        down = cordumctl("down", *data)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(pid_alive(p) for p in pids), what="components to exit")
    assert cordumctl("status", *data).returncode == 1

    up = cordumctl("up", "--detach", "--no-worker", *data, *port_args(ports))
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        assert redis.Redis(port=ports["redis"]).get("survives") == b"yes"
    finally:
        assert cordumctl("down", *data).returncode == 0


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    ports = free_ports()
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [str(CORDUMCTL), "up", "--no-worker", "--data-dir", str(data_dir), *port_args(ports)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: read_state(data_dir) is not None, timeout=60, what="stack state")
        state = read_state(data_dir)
        assert state is not None
        pids = [c["pid"] for c in state["components"]]
        assert all(pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(pid_alive(p) for p in pids)
    assert read_state(data_dir) is None
