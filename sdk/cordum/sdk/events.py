"""``client.events``: live bus events (``EventService.StreamEvents``), as they happen::

    async for event in client.events.stream(kinds=["job_state"], topic="job.billing.*"):
        print(event.kind, event.job_id, event.message)

Each item is a ``cordum.v1.event_pb2.Event``. The first is always ``stream_start`` (from
then on nothing is missed); a ``stream_end`` comes before the server closes the stream (a
client too slow to keep up, the server shutting down). The stream has no end of its own:
stop iterating, or pass ``timeout`` (then :class:`~cordum.sdk.errors.DeadlineExceeded`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from typing import cast

from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

__all__ = ["AsyncEventsClient", "EventsClient"]

E = event_service_pb2
Stub = event_service_pb2_grpc.EventServiceStub


def _stream_request(
    kinds: Iterable[str] | str | None,
    topic: str | None,
    job_id: str | None,
    run_id: str | None,
) -> E.StreamEventsRequest:
    # One kind given as a bare string would otherwise be split into letters.
    chosen = [kinds] if isinstance(kinds, str) else list(kinds or ())
    return E.StreamEventsRequest(
        kinds=chosen, topic=topic or "", job_id=job_id or "", run_id=run_id or ""
    )


class AsyncEventsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> event_service_pb2_grpc.EventServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("event_service_pb2_grpc.EventServiceAsyncStub", self._t.stub(Stub))

    def stream(
        self,
        *,
        kinds: Iterable[str] | str | None = None,
        topic: str | None = None,
        job_id: str | None = None,
        run_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[event_pb2.Event, None]:
        """Events as they happen, filtered by ``kinds`` (e.g. ``job_state``; default all),
        ``topic`` (a glob such as ``job.billing.*``), ``job_id`` and ``run_id``.
        Breaking out of the loop ends the stream on the server too."""
        return self._t.stream(
            self._stub.StreamEvents,
            _stream_request(kinds, topic, job_id, run_id),
            timeout=timeout,
        )


class EventsClient:
    """The blocking twin of :class:`AsyncEventsClient`; same methods, same results."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def stream(
        self,
        *,
        kinds: Iterable[str] | str | None = None,
        topic: str | None = None,
        job_id: str | None = None,
        run_id: str | None = None,
        timeout: float | None = None,
    ) -> Generator[event_pb2.Event, None, None]:
        return self._t.stream(
            self._stub.StreamEvents,
            _stream_request(kinds, topic, job_id, run_id),
            timeout=timeout,
        )
