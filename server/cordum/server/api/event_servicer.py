"""EventService over gRPC (and, through Envoy's transcoder, server-sent events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cordum.server.api.metadata import caller
from cordum.server.services.event_streams import EventFilter, EventStreams
from cordum.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, events: EventStreams) -> None:
        self._events = events

    async def StreamEvents(
        self, request: event_service_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[event_pb2.Event]:
        event_filter = EventFilter.build(
            caller(context),
            kinds=list(request.kinds),
            topic=request.topic,
            job_id=request.job_id,
            run_id=request.run_id,
        )
        # No `on_stuck`: HTTP/2 flow control already bounds what a client that stopped
        # reading holds (the window plus one message, and this stream's queue), and
        # cancelling this task would leave the call without a status: a client that
        # resumes reading gets its backlog and `stream_end`, or goes away and ends the call.
        async with self._events.open(event_filter, transport="grpc") as sub:
            async for event in sub:
                yield event
