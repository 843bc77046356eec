"""Clients for the Cordum gRPC API: :class:`AsyncClient` (asyncio) and :class:`Client`
(blocking), with the same namespaces and methods::

    async with AsyncClient("127.0.0.1:8080", api_key=key) as client:
        outcome = await client.jobs.run(topic="job.echo", input={"n": 1})
        async for job in client.jobs.list(state="RUNNING"):
            ...
        await client.workflows.upsert(load_workflow("examples/workflows/hello.json"))
        started = await client.runs.start("hello", input={"name": "Ada"})
        run = await client.runs.wait(started.run_id)

Namespaces: ``jobs``, ``approvals``, ``status``, ``workflows``, ``runs``, ``config``,
``policy`` (with ``policy.bundles``), ``schemas``, ``locks``, ``artifacts``, ``dlq``,
``memory``, ``context`` and ``events``.

Calls raise the typed errors of :mod:`cordum.sdk.errors`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc

from cordum.sdk._transport import DEFAULT_TARGET, AioTransport, Metadata, SyncTransport
from cordum.sdk.approvals import ApprovalsClient, AsyncApprovalsClient
from cordum.sdk.artifacts import ArtifactsClient, AsyncArtifactsClient
from cordum.sdk.config import AsyncConfigClient, ConfigClient
from cordum.sdk.context import AsyncContextClient, ContextClient
from cordum.sdk.dlq import AsyncDLQClient, DLQClient
from cordum.sdk.events import AsyncEventsClient, EventsClient
from cordum.sdk.jobs import AsyncJobsClient, JobsClient
from cordum.sdk.locks import AsyncLocksClient, LocksClient
from cordum.sdk.memory import AsyncMemoryClient, MemoryClient
from cordum.sdk.policy import AsyncPolicyClient, PolicyClient
from cordum.sdk.runs import AsyncRunsClient, RunsClient
from cordum.sdk.schemas import AsyncSchemasClient, SchemasClient
from cordum.sdk.status import AsyncStatusClient, StatusClient
from cordum.sdk.workflows import AsyncWorkflowsClient, WorkflowsClient

__all__ = ["DEFAULT_TARGET", "AsyncClient", "Client"]


class AsyncClient:
    """An asyncio client. ``timeout`` is the deadline in seconds of each unary call
    (``None``: none); ``api_key`` is sent as ``x-api-key``, ``metadata`` with every call.
    Pass ``credentials`` for TLS, or ``channel`` to use a channel you own and close."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._transport = AioTransport(
            target,
            timeout=timeout,
            api_key=api_key,
            metadata=metadata,
            credentials=credentials,
            channel=channel,
        )
        self.jobs = AsyncJobsClient(self._transport)
        self.approvals = AsyncApprovalsClient(self._transport)
        self.status = AsyncStatusClient(self._transport)
        self.workflows = AsyncWorkflowsClient(self._transport)
        self.runs = AsyncRunsClient(self._transport)
        self.config = AsyncConfigClient(self._transport)
        self.policy = AsyncPolicyClient(self._transport)
        self.schemas = AsyncSchemasClient(self._transport)
        self.locks = AsyncLocksClient(self._transport)
        self.artifacts = AsyncArtifactsClient(self._transport)
        self.dlq = AsyncDLQClient(self._transport)
        self.memory = AsyncMemoryClient(self._transport)
        self.context = AsyncContextClient(self._transport)
        self.events = AsyncEventsClient(self._transport)

    @property
    def target(self) -> str:
        return self._transport.target

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Client:
    """A blocking client with the surface of :class:`AsyncClient`. Do not call it from a
    coroutine: each call blocks the event loop (use :class:`AsyncClient` there)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._transport = SyncTransport(
            target,
            timeout=timeout,
            api_key=api_key,
            metadata=metadata,
            credentials=credentials,
            channel=channel,
        )
        self.jobs = JobsClient(self._transport)
        self.approvals = ApprovalsClient(self._transport)
        self.status = StatusClient(self._transport)
        self.workflows = WorkflowsClient(self._transport)
        self.runs = RunsClient(self._transport)
        self.config = ConfigClient(self._transport)
        self.policy = PolicyClient(self._transport)
        self.schemas = SchemasClient(self._transport)
        self.locks = LocksClient(self._transport)
        self.artifacts = ArtifactsClient(self._transport)
        self.dlq = DLQClient(self._transport)
        self.memory = MemoryClient(self._transport)
        self.context = ContextClient(self._transport)
        self.events = EventsClient(self._transport)

    @property
    def target(self) -> str:
        return self._transport.target

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
