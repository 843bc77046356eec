"""The gRPC channel behind a client: call metadata, deadlines and error translation.

The namespaces (``client.jobs`` ...) call the generated stubs only through these two
classes, so every call gets the API key, the default deadline and typed errors the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar, cast

import grpc

from cordum.sdk.errors import CordumError, DeadlineExceeded, WaitTimeout, from_grpc_error

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Metadata = Mapping[str, str] | Sequence[tuple[str, str]]

DEFAULT_TARGET = "127.0.0.1:8080"
API_KEY_HEADER = "x-api-key"


class _Default:
    """Marks "use the client's default timeout" (``None`` already means "no deadline")."""


DEFAULT = _Default()
Timeout = float | None | _Default


def call_metadata(api_key: str | None, metadata: Metadata | None) -> tuple[tuple[str, str], ...]:
    pairs = list(metadata.items() if isinstance(metadata, Mapping) else metadata or ())
    if api_key:
        pairs.append((API_KEY_HEADER, api_key))
    # gRPC requires lower-case metadata keys; HTTP users type them any way.
    return tuple((k.lower(), v) for k, v in pairs)


def _translate(
    error: grpc.RpcError, *, wait_for: str | None, wait_kind: str, timeout: float | None
) -> CordumError:
    typed = from_grpc_error(error)
    # Our own stream deadline ran out (no Cordum reason): the job or run is not done yet.
    if wait_for is not None and isinstance(typed, DeadlineExceeded) and not typed.reason:
        return WaitTimeout(wait_for, timeout, kind=wait_kind)
    return typed


class _Base:
    def __init__(
        self, *, timeout: float | None, api_key: str | None, metadata: Metadata | None
    ) -> None:
        self.timeout = timeout
        self.metadata = call_metadata(api_key, metadata)
        self._stubs: dict[Callable[[Any], Any], Any] = {}

    @property
    def channel(self) -> Any:
        raise NotImplementedError

    def stub(self, factory: Callable[[Any], S]) -> S:
        """The generated stub ``factory(channel)``, built once per client."""
        if factory not in self._stubs:
            self._stubs[factory] = factory(self.channel)
        return cast(S, self._stubs[factory])

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _Default) else timeout


class _Requests:
    """Remembers an error raised while producing a client stream's messages: gRPC only
    reports it as a CANCELLED call, and the caller wants the error itself (a file that
    could not be read, a generator that failed)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def aiter(self, requests: AsyncIterable[Req]) -> AsyncGenerator[Req, None]:
        try:
            async for request in requests:
                yield request
        except Exception as error:
            self.error = error
            raise

    def iter(self, requests: Iterable[Req]) -> Generator[Req, None, None]:
        try:
            yield from requests
        except Exception as error:
            self.error = error
            raise


class AioTransport(_Base):
    """A ``grpc.aio`` channel, made on first use so a client can be built outside a loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        api_key: str | None,
        metadata: Metadata | None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(timeout=timeout, api_key=api_key, metadata=metadata)
        self.target = target
        self._credentials = credentials
        self._channel = channel
        self._owns_channel = channel is None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials)
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.target)
            )
        return self._channel

    # `timeout` here (and in the namespaces) is the gRPC deadline sent to the server, so the
    # server stops working on a call nobody waits for; asyncio.timeout cannot do that.
    async def unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> Resp:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as error:
            raise from_grpc_error(error) from error

    async def stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        wait_for: str | None = None,
        wait_kind: str = "job",
    ) -> AsyncGenerator[Resp, None]:
        call = method(request, timeout=timeout, metadata=self.metadata)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as error:
            raise _translate(
                error, wait_for=wait_for, wait_kind=wait_kind, timeout=timeout
            ) from error
        finally:
            # The caller stopped early (break, error): end the stream on the server too.
            # A no-op once the stream has ended.
            call.cancel()

    async def stream_unary(
        self,
        method: grpc.aio.StreamUnaryMultiCallable[Req, Resp],
        requests: AsyncIterable[Req],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Resp:
        """A client stream; ``timeout`` defaults to none (an upload takes what it takes)."""
        produced = _Requests()
        try:
            return await method(produced.aiter(requests), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            if produced.error is not None:
                raise produced.error from None
            raise from_grpc_error(error) from error
        except asyncio.CancelledError:
            # grpc.aio ends a call whose request iterator failed as if it were cancelled.
            if produced.error is not None:
                raise produced.error from None
            raise

    async def close(self) -> None:
        if self._channel is not None and self._owns_channel:
            await self._channel.close()
        self._channel = None
        self._stubs.clear()


class SyncTransport(_Base):
    """A blocking ``grpc`` channel."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        api_key: str | None,
        metadata: Metadata | None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(timeout=timeout, api_key=api_key, metadata=metadata)
        self.target = target
        self._owns_channel = channel is None
        self._channel: grpc.Channel = channel or (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: Timeout = DEFAULT,
    ) -> Resp:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as error:
            raise from_grpc_error(error) from error

    def stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        wait_for: str | None = None,
        wait_kind: str = "job",
    ) -> Generator[Resp, None, None]:
        call = method(request, timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise _translate(
                error, wait_for=wait_for, wait_kind=wait_kind, timeout=timeout
            ) from error
        finally:
            call.cancel()

    def stream_unary(
        self,
        method: grpc.StreamUnaryMultiCallable[Req, Resp],
        requests: Iterable[Req],
        *,
        timeout: float | None = None,
    ) -> Resp:
        produced = _Requests()
        try:
            return method(produced.iter(requests), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            if produced.error is not None:
                raise produced.error from None
            raise from_grpc_error(error) from error

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()
        self._stubs.clear()
