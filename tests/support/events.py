"""Event-stream clients for the three transports (gRPC StreamEvents, server-sent events and
the WebSocket through Envoy), each collecting events as protojson dicts (snake_case) in
the background, so one test can assert the same things of all three."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import aiohttp
import grpc
import httpx
from google.protobuf import json_format

from cordum.v1 import event_service_pb2, event_service_pb2_grpc

from support.auth import key_of, md
from support.waiting import eventually

Event = dict[str, Any]


def protocol_token(key: str) -> str:
    """A key as browsers send it in `Sec-WebSocket-Protocol` (base64url, no padding)."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


class Collector:
    """Background collection of one stream's events; `start()` returns once the server's
    `stream_start` arrived (the stream is live)."""

    name = "stream"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await self.wait_for(lambda e: e["kind"] == "stream_start", "stream_start")
        assert self.events[0]["kind"] == "stream_start", self.events[:3]
        return self

    async def _run(self) -> None:
        try:
            await self._collect()
        finally:
            self.finished.set()

    async def _collect(self) -> None:
        raise NotImplementedError

    async def wait_for(
        self, predicate: Callable[[Event], bool], what: str, within: float = 30.0
    ) -> Event:
        async def probe() -> Event | None:
            if self._task is not None and self._task.done() and self._task.exception():
                raise self._task.exception()  # type: ignore[misc]
            return next((e for e in self.events if predicate(e)), None)

        found = await eventually(
            probe, until=lambda e: e is not None, within=within, what=f"{self.name}: {what}"
        )
        assert found is not None
        return found

    def about(self, job_id: str) -> list[Event]:
        return [e for e in self.events if e.get("job_id") == job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Its end (cancelled, or the error of a stream already broken) is not news here.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class GrpcEvents(Collector):
    name = "grpc"

    def __init__(self, channel: grpc.aio.Channel, key: str, **filters: Any) -> None:
        super().__init__()
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        request = event_service_pb2.StreamEventsRequest(**filters)
        self.call = stub.StreamEvents(request, metadata=md(key))

    async def _collect(self) -> None:
        while True:
            event = await self.call.read()
            if event is grpc.aio.EOF:
                return
            self.events.append(
                json_format.MessageToDict(
                    event,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )

    async def close(self) -> None:
        self.call.cancel()
        await super().close()


def query(filters: dict[str, Any]) -> str:
    return urlencode(
        [(k, v) for k, vs in filters.items() for v in (vs if isinstance(vs, list) else [vs])]
    )


class SseEvents(Collector):
    """GET /api/v1/events through Envoy: `data: {json}` per event."""

    name = "sse"

    def __init__(self, rest_url: str, key: str, **filters: Any) -> None:
        super().__init__()
        self.url = f"{rest_url}/api/v1/events?{query(filters)}"
        self.key = key
        self.content_type = ""

    async def _collect(self) -> None:
        timeout = httpx.Timeout(15, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", self.url, headers={"x-api-key": key_of(self.key)}) as response,
        ):
            assert response.status_code == 200, await response.aread()
            self.content_type = response.headers["content-type"]
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    self.events.append(json.loads(line.removeprefix("data: ")))


class WsEvents(Collector):
    """The WebSocket through Envoy, authenticated like a browser: the key as a subprotocol."""

    name = "websocket"

    def __init__(
        self,
        rest_url: str,
        key: str,
        *,
        protocols: Sequence[str] | None = None,
        headers: dict[str, str] | None = None,
        **filters: Any,
    ) -> None:
        super().__init__()
        base = rest_url.replace("http://", "ws://")
        self.url = f"{base}/api/v1/stream?{query(filters)}"
        self.protocols = (
            tuple(protocols)
            if protocols is not None
            else ("cordum-api-key", protocol_token(key_of(key)))
        )
        self.headers = headers or {}
        self.protocol: str | None = None
        self.close_code: int | None = None
        self.close_message = ""

    async def _collect(self) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(self.url, protocols=self.protocols, headers=self.headers) as ws,
        ):
            self.protocol = ws.protocol
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(msg.data))
                    continue
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    self.close_code, self.close_message = msg.data, msg.extra or ""
                return
