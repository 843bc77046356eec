"""A real, unmodified CAP 2.17 worker (cap-sdk-python's ``Agent``, in its own venv) against a
control plane in JetStream mode: the worker keeps its core subscriptions and its core result
publish; the streams capturing its subjects, and the ``Nats-Msg-Id`` header on our dispatch,
change nothing for it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from cordum.sdk import cap
from cordum.server.app import App
from cordum.server.jetstream import MSG_ID, Streams
from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from support.cap_venv import cap_env, cap_process, ensure_cap_python
from support.cordum import app_settings, running_app
from support.waiting import eventually

pytestmark = pytest.mark.slow

J = job_service_pb2
WAIT = 60.0

# Nothing but the public Agent API; its id and topic come from the environment.
WORKER_SCRIPT = """\
import asyncio, os
from cap.runtime import Agent

agent = Agent(sender_id=os.environ["TEST_WORKER_ID"])


@agent.job(os.environ["TEST_TOPIC"])
async def echo(ctx, data):
    return {"echo": data, "job_id": ctx.job_id}


asyncio.run(agent.run())
"""


@pytest_asyncio.fixture
async def js_app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    settings = app_settings(nats_url, redis_url, config_dir, use_jetstream=True)
    async with running_app(settings) as app:
        yield app


async def test_a_cap_worker_runs_jobs_unchanged_in_jetstream_mode(
    js_app: App, nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    python = await asyncio.to_thread(ensure_cap_python)
    tag = uuid.uuid4().hex[:8]
    worker_id, topic = f"cap-js-{tag}", f"job.cap-js-echo-{tag}"
    env = cap_env(nats_url, redis_url, TEST_WORKER_ID=worker_id, TEST_TOPIC=topic)
    bus = await nats.connect(nats_url)
    try:
        async with cap_process(python, WORKER_SCRIPT, env=env, workdir=tmp_path) as worker:
            assert js_app.registry is not None
            registry = js_app.registry

            async def registered() -> list[str]:
                assert worker.process.returncode is None, worker.log()
                return [w.worker_id for w in registry.workers()]

            await eventually(registered, until=lambda ids: worker_id in ids, within=WAIT)
            data = {"text": "over JetStream", "n": 2}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{js_app.grpc_port}") as channel:
                reply = await job_service_pb2_grpc.JobServiceStub(channel).SubmitJobAndWait(
                    J.SubmitJobAndWaitRequest(
                        job=J.SubmitJobRequest(
                            topic=topic, input=json_format.ParseDict(data, struct_pb2.Value())
                        ),
                        timeout_ms=int(WAIT * 1000),
                    )
                )
            assert reply.done, worker.log()
        assert reply.job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert reply.job.worker_id == worker_id
        assert json_format.MessageToDict(reply.result) == {"echo": data, "job_id": reply.job_id}
        streams = Streams.of(js_app.subjects)
        js = bus.jetstream()
        # Our dispatch, as the worker got it on its core subscription, is in the stream.
        stored = await js.get_last_msg(streams.jobs.name, f"worker.{worker_id}.jobs")
        assert stored.headers is not None and stored.headers[MSG_ID] == f"{reply.job_id}@1"
        assert cap.decode(stored.data or b"").job_request.job_id == reply.job_id
        # The worker's core publish of its result came to us through the results stream.
        info = await js.consumer_info(streams.results.name, streams.durable("scheduler"))
        assert info.delivered.consumer_seq >= 1 and info.num_ack_pending == 0
        assert js_app.redis is not None
        written = await js_app.redis.get(f"res:{reply.job_id}")
        assert json.loads(written) == {"echo": data, "job_id": reply.job_id}
    finally:
        await bus.drain()
