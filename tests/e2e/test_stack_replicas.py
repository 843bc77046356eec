"""`cordumctl up --replicas 2`: the control plane as separate processes (a gateway, a safety
kernel, a context engine, two schedulers, two workflow engines) next to nats-server,
valkey-server, Envoy and the example worker; `cordumctl status` lists each with its PID and
health, jobs and workflow runs go through them, and Envoy sends context-engine calls to the
context engine's own process. (The chaos suite kills and restarts them under load.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from cordum.sdk import Client
from cordum.sdk.workflows import load_workflow
from cordum.server.stack.process import pick_free_port
from cordum.v1 import context_service_pb2, context_service_pb2_grpc, job_pb2, run_pb2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CORDUMCTL = Path(sys.executable).parent / "cordumctl"
CONTROL_PLANE = {"safety", "context", "gateway", "scheduler-1", "scheduler-2"} | {
    "workflow-1",
    "workflow-2",
}


def cordumctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CORDUMCTL), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_replicas_run_each_role_in_processes_of_its_own(tmp_path: Path) -> None:
    ports = {name: pick_free_port() for name in ("grpc", "rest", "ws", "nats", "redis")}
    ports |= {"metrics": pick_free_port(), "admin": pick_free_port()}
    data = ["--data-dir", str(tmp_path / "data")]
    args = [f"--{name}-port={port}" for name, port in ports.items()]
    up = cordumctl("up", "--detach", "--replicas", "2", *data, *args)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        status = cordumctl("status", "--json", *data)
        assert status.returncode == 0, status.stderr + status.stdout
        doc = json.loads(status.stdout)
        components = doc["components"]
        assert set(components) == {
            "nats-server",
            "valkey-server",
            "envoy",
            "echo-worker",
            *CONTROL_PLANE,
        }
        assert all(c["healthy"] for c in components.values()), components
        pids = [c["pid"] for c in components.values()]
        assert len(set(pids)) == len(pids)

        grpc_target = doc["endpoints"]["grpc"]
        with Client(grpc_target, timeout=30) as client:
            outcome = client.jobs.run(topic="job.echo", input={"n": 1}, timeout=30)
            assert outcome.job.state == job_pb2.JOB_STATE_SUCCEEDED
            client.workflows.upsert(load_workflow(ROOT / "examples" / "workflows" / "hello.json"))
            started = client.runs.start("hello", input={"name": "Ada"})
            run = client.runs.wait(started.run_id, timeout=60)
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED

        # The gateway has no context role: it answers UNIMPLEMENTED itself, while Envoy
        # routes the same call (gRPC or REST) to the context engine's process.
        window = context_service_pb2.BuildWindowRequest(memory_id="replicas-test")
        with grpc.insecure_channel(grpc_target) as channel:
            stub = context_service_pb2_grpc.ContextEngineStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.BuildWindow(window, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(f"127.0.0.1:{ports['rest']}") as channel:
            stub = context_service_pb2_grpc.ContextEngineStub(channel)
            stub.BuildWindow(window, timeout=10)
        reply = httpx.post(
            f"http://127.0.0.1:{ports['rest']}/api/v1/context/window",
            json={"memory_id": "replicas-test"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
    finally:
        down = cordumctl("down", *data)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)
