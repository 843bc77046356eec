"""The CAP SafetyKernel service over real gRPC, and the scheduler's gRPC client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cordum.agent.v1 import safety_pb2, safety_pb2_grpc
from cordum.server.api.interceptors import ErrorInterceptor
from cordum.server.safety.client import GrpcSafetyClient, KernelUnavailable, retry_after_ms
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.safety.servicer import SafetyKernelServicer

D = safety_pb2

POLICY = """\
version: it
tenants:
  default:
    deny_topics: ["job.forbidden.*"]
rules:
  - id: approve-deploys
    match: {topics: ["job.deploy.*"]}
    decision: require_approval
    reason: deploys need a human
  - id: slow-bulk
    match: {topics: ["job.bulk.*"]}
    decision: throttle
    reason: bulk is rate limited
    retry_after_ms: 1500
"""


async def serve(kernel: SafetyKernel) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    safety_pb2_grpc.add_SafetyKernelServicer_to_server(SafetyKernelServicer(kernel), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[SafetyKernel]:
    path = tmp_path / "safety.yaml"
    path.write_text(POLICY)
    k = SafetyKernel(path, watch_interval_s=0)
    await k.start()
    yield k
    await k.stop()


@pytest.fixture
async def target(kernel: SafetyKernel) -> AsyncIterator[str]:
    server, address = await serve(kernel)
    yield address
    await server.stop(None)


@pytest.fixture
async def stub(target: str) -> AsyncIterator[safety_pb2_grpc.SafetyKernelStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield safety_pb2_grpc.SafetyKernelStub(channel)


def req(topic: str, job_id: str = "job-1") -> safety_pb2.PolicyCheckRequest:
    return safety_pb2.PolicyCheckRequest(job_id=job_id, topic=topic, tenant="default")


async def test_all_five_rpcs(stub: safety_pb2_grpc.SafetyKernelStub, kernel: SafetyKernel) -> None:
    check = await stub.Check(req("job.deploy.web", job_id="j-7"))
    assert check.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert (check.approval_required, check.approval_ref) == (True, "j-7")
    assert check.rule_id == "approve-deploys"
    assert check.policy_snapshot == kernel.snapshot

    evaluated = await stub.Evaluate(req("job.forbidden.x"))
    assert evaluated.decision == D.DECISION_TYPE_DENY
    assert evaluated.rule_id == "legacy:default:deny:1"

    explained = await stub.Explain(req("job.deploy.web", job_id="j-7"))
    assert explained == check

    simulated = await stub.Simulate(req("job.bulk.load"))
    assert simulated.decision == D.DECISION_TYPE_THROTTLE
    assert retry_after_ms(simulated) == 1500

    snapshots = await stub.ListSnapshots(safety_pb2.ListSnapshotsRequest())
    assert list(snapshots.snapshots) == [kernel.snapshot]
    assert snapshots.snapshots[0].startswith("it:")


async def test_grpc_client_checks(target: str) -> None:
    async with GrpcSafetyClient(target, timeout_s=2.0) as client:
        resp = await client.check(req("job.bulk.x"))
        assert resp.decision == D.DECISION_TYPE_THROTTLE
        assert resp.reason == "bulk is rate limited (retry_after_ms=1500)"
        assert (await client.check(req("job.ok"))).decision == D.DECISION_TYPE_ALLOW


async def test_unloaded_kernel_answers_unavailable_and_client_raises(tmp_path: Path) -> None:
    kernel = SafetyKernel(tmp_path / "never-loaded.yaml", watch_interval_s=0)
    server, address = await serve(kernel)
    try:
        async with GrpcSafetyClient(address) as client:
            with pytest.raises(KernelUnavailable) as caught:
                await client.check(req("job.a"))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_grpc_client_against_a_closed_port_raises_kernel_unavailable() -> None:
    async with GrpcSafetyClient(f"127.0.0.1:{closed_port()}", timeout_s=2.0) as client:
        with pytest.raises(KernelUnavailable) as caught:
            await client.check(req("job.a"))
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
