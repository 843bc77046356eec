"""Idempotency keys are scoped per tenant and replay the first response (body field or the
`Idempotency-Key` gRPC metadata header).

Jobs go to a denied topic: they end at once and leave nothing waiting."""

from __future__ import annotations

import grpc

from cordum.server.app import App

from support.jobs import J, jobs


async def test_same_key_same_tenant_replays_the_first_job(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    request = J.SubmitJobRequest(
        prompt="x", topic=f"job.t.deny.{prefix}", tenant_id=f"ta-{prefix}", idempotency_key="k1"
    )
    first = await stub.SubmitJob(request)
    second = await stub.SubmitJob(request)
    assert not first.idempotent_replay
    assert second.idempotent_replay
    assert second.job_id == first.job_id
    assert second.trace_id == first.trace_id
    # A different body under the same key still replays the first job.
    changed = J.SubmitJobRequest()
    changed.CopyFrom(request)
    changed.prompt = "something else"
    third = await stub.SubmitJob(changed)
    assert third.idempotent_replay and third.job_id == first.job_id
    assert cordum.redis is not None
    ttl = await cordum.redis.ttl(f"{cordum.settings.namespace}idem:ta-{prefix}:k1")
    assert 0 < ttl <= cordum.settings.idempotency_ttl_s


async def test_same_key_other_tenant_is_another_job(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    topic = f"job.t.deny.{prefix}"
    a = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=topic, tenant_id=f"ta-{prefix}", idempotency_key="k")
    )
    b = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=topic, tenant_id=f"tb-{prefix}", idempotency_key="k")
    )
    assert not a.idempotent_replay and not b.idempotent_replay
    assert a.job_id != b.job_id
    assert (a.job.tenant_id, b.job.tenant_id) == (f"ta-{prefix}", f"tb-{prefix}")
    again = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=topic, tenant_id=f"tb-{prefix}", idempotency_key="k")
    )
    assert again.idempotent_replay and again.job_id == b.job_id


async def test_idempotency_key_metadata_header(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    request = J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}")
    metadata = (("idempotency-key", f"hdr-{prefix}"),)
    first = await stub.SubmitJob(request, metadata=metadata)
    second = await stub.SubmitJob(request, metadata=metadata)
    assert first.job.idempotency_key == f"hdr-{prefix}"
    assert second.idempotent_replay and second.job_id == first.job_id
    # The body field names the same key.
    body = J.SubmitJobRequest(
        prompt="x", topic=f"job.t.deny.{prefix}", idempotency_key=f"hdr-{prefix}"
    )
    third = await stub.SubmitJob(body)
    assert third.idempotent_replay and third.job_id == first.job_id
    # Without a key, two submits are two jobs.
    c, d = await stub.SubmitJob(request), await stub.SubmitJob(request)
    assert c.job_id != d.job_id


async def test_submit_and_wait_replays_too(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    job = J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}", idempotency_key="w")
    first = await stub.SubmitJobAndWait(J.SubmitJobAndWaitRequest(job=job, timeout_ms=5000))
    second = await stub.SubmitJobAndWait(J.SubmitJobAndWaitRequest(job=job, timeout_ms=5000))
    assert first.done and second.done
    assert second.idempotent_replay and second.job_id == first.job_id
    assert second.job.state == first.job.state
