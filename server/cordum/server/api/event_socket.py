"""The WebSocket stream `/api/v1/stream` (upstream Cordum's endpoint): the gateway serves it
on its own small aiohttp listener (CORDUM_WS_HOST/PORT) and Envoy routes the upgrade here.
The events are StreamEvents' (services/event_streams.py), one text frame of protojson
`cordum.v1.Event` each (snake_case field names, as the REST API and the SSE stream).

Auth is the gRPC API's: the same key table, roles and rate limit (`authenticate_websocket`),
with the key in `x-api-key` / `authorization: Bearer`, or, for browsers that cannot set
headers, as upstream does it: `Sec-WebSocket-Protocol: cordum-api-key, <base64url key>`
(answered with the `cordum-api-key` subprotocol) or one protocol `cordum-api-key.<key>`.
Browsers do not apply CORS to WebSockets, so the Origin is checked here (Envoy's rule).

Filters are query parameters: `kinds` (repeated or comma-separated), `topic`, `job_id`,
`run_id`. Refusals happen before the upgrade, as JSON `google.rpc.Status` with the HTTP
status Envoy would give (400, 401, 403, 429). The server never reads client frames beyond
close and ping. When the server ends a stream it sends `stream_end` and then closes with a
code: 1008 (slow consumer), 1013 (server overloaded), 1011 (interrupted), 1001 (shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import json_format

from cordum.server.api import roles
from cordum.server.api.auth import Authenticator, origin_allowed, websocket_protocol_key
from cordum.server.errors import CordumError, invalid_field, permission_denied
from cordum.server.services.event_streams import EventFilter, EventStreams, Subscription
from cordum.server.stack.envoy_config import WS_PATH
from cordum.v1 import event_pb2

logger = logging.getLogger(__name__)

METHOD = "/cordum.v1.EventService/StreamEvents"
QUERY = ("kinds", "topic", "job_id", "run_id")
CLOSE_CODES = {
    "slow_consumer": WSCloseCode.POLICY_VIOLATION,
    "overloaded": WSCloseCode.TRY_AGAIN_LATER,
    "interrupted": WSCloseCode.INTERNAL_ERROR,
    "shutdown": WSCloseCode.GOING_AWAY,
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
# Client frames are only close/ping; anything big is not a client of ours.
MAX_CLIENT_FRAME = 64 * 1024


def event_json(event: event_pb2.Event) -> str:
    """The same JSON as the REST API and the SSE stream (Envoy's print options)."""
    return json_format.MessageToJson(
        event,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=None,
    )


def _refusal(error: CordumError) -> web.Response:
    status = json_format.MessageToDict(error.to_status_proto(), preserving_proto_field_name=True)
    headers = {}
    if "retry_after_ms" in error.metadata:
        headers["Retry-After"] = str(max(1, -(-int(error.metadata["retry_after_ms"]) // 1000)))
    return web.Response(
        status=HTTP_STATUS.get(error.code, 500),
        text=json.dumps(status),
        content_type="application/json",
        headers=headers,
    )


class EventSocketServer:
    def __init__(
        self,
        events: EventStreams,
        authenticator: Authenticator,
        *,
        host: str,
        port: int,
        allowed_origins: Sequence[str] = (),
        heartbeat_s: float = 20.0,
    ) -> None:
        self._events = events
        self._auth = authenticator
        self._host = host
        self._port = port
        self._origins = tuple(allowed_origins)
        self._heartbeat_s = heartbeat_s
        self._runner: web.AppRunner | None = None
        self.bound_port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", WS_PATH, self._stream)
        # Open streams get `stream_end` at shutdown (EventStreams.end_all) and finish.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.bound_port = sockets[0].getsockname()[1]
        logger.info("event WebSocket on ws://%s:%d%s", self._host, self.bound_port, WS_PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _admit(self, request: web.Request) -> tuple[EventFilter, str | None]:
        """The stream's filter and the subprotocol to answer; raises CordumError."""
        origin = request.headers.get("Origin", "")
        if not origin_allowed(origin, self._origins):
            raise permission_denied(f"origin {origin!r} is not allowed (CORDUM_ALLOWED_ORIGINS)")
        caller, protocol = self._auth.authenticate_websocket(request.headers)
        self._auth.authorize(caller, roles.access_for(METHOD), "EventService/StreamEvents")
        if protocol is None:
            # No keys configured: the key offered as a protocol was not needed, but a
            # browser fails the handshake unless one of its protocols is answered.
            offered = websocket_protocol_key(request.headers.get("Sec-WebSocket-Protocol", ""))
            protocol = offered[1] if offered else None
        unknown = sorted(set(request.query) - set(QUERY))
        if unknown:
            raise invalid_field(unknown[0], f"unknown query parameter; known: {', '.join(QUERY)}")
        for name in ("topic", "job_id", "run_id"):
            if len(request.query.getall(name, [])) > 1:
                raise invalid_field(name, "give it once")
        event_filter = EventFilter.build(
            caller,
            kinds=request.query.getall("kinds", []),
            topic=request.query.get("topic", ""),
            job_id=request.query.get("job_id", ""),
            run_id=request.query.get("run_id", ""),
        )
        return event_filter, protocol

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        try:
            event_filter, protocol = self._admit(request)
        except CordumError as error:
            return _refusal(error)
        ws = web.WebSocketResponse(
            protocols=(protocol,) if protocol else (),
            heartbeat=self._heartbeat_s,
            max_msg_size=MAX_CLIENT_FRAME,
        )
        if not ws.can_prepare(request).ok:
            return _refusal(invalid_field("Upgrade", "a WebSocket upgrade is required"))

        def cut() -> None:
            # The client stopped reading: its socket buffers are full, so a close frame
            # could not get through either.
            if request.transport is not None:
                request.transport.abort()

        try:
            async with self._events.open(event_filter, transport="websocket", on_stuck=cut) as sub:
                # Subscribed before the handshake completes: an open socket misses nothing.
                await ws.prepare(request)
                await self._serve(ws, sub)
        except CordumError as error:  # from `open`: the bus is unavailable, or we are stopping
            return _refusal(error)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, sub: Subscription) -> None:
        sender = asyncio.create_task(self._send(ws, sub))
        reader = asyncio.create_task(self._read(ws))
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            sender.cancel()
        for task in (sender, reader):  # a send to a gone client raises: nothing to do
            if task.done() and not task.cancelled():
                task.exception()
        if sender.done() and not sender.cancelled() and sender.exception() is None:
            reason = sub.end_reason
            if reason is not None and not ws.closed:
                await ws.close(
                    code=CLOSE_CODES.get(reason.code, WSCloseCode.GOING_AWAY),
                    message=reason.message.encode()[:123],
                )

    @staticmethod
    async def _send(ws: web.WebSocketResponse, sub: Subscription) -> None:
        async for event in sub:
            await ws.send_str(event_json(event))

    @staticmethod
    async def _read(ws: web.WebSocketResponse) -> None:
        """Until the client closes (aiohttp answers pings and close frames while we read)."""
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                return
