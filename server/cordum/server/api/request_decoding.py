"""Requests whose bytes do not decode get INVALID_ARGUMENT naming the field, not UNKNOWN.

grpc.aio answers a request deserializer's exception with UNKNOWN ("Unexpected DecodeError"),
which Envoy turns into a 500. It happens through REST too: Envoy's transcoder turns a JSON
object given as a `map<string, string>` value (`"labels": {"a": {}}`) into bytes protobuf
cannot parse. The interceptor here lets the deserializer hand back an `Undecodable` marker
instead, and the handler turns it into INVALID_ARGUMENT with a field violation naming the
first field whose bytes do not parse (found by walking the wire format).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from cordum.server.api.interceptors import WrappingInterceptor
from cordum.server.errors import CordumError, invalid_field

logger = logging.getLogger(__name__)

WHOLE = "request"
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns in place of a message it could not parse."""

    field: str
    type_name: str

    def error(self) -> CordumError:
        return invalid_field(
            self.field,
            f"not a valid value: the {self.type_name} does not decode (through REST: a JSON "
            "value of the wrong type, such as an object as a value of a map of strings)",
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    cls = getattr(deserializer, "__self__", None)
    descriptor = cls.DESCRIPTOR if isinstance(cls, type) and issubclass(cls, Message) else None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            if descriptor is None:
                return Undecodable(WHOLE, "request")
            field = first_bad_field(raw, descriptor) or WHOLE
            logger.debug("undecodable %s: %s", descriptor.full_name, field)
            return Undecodable(field, descriptor.full_name)

    return deserialize


def checked(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error()
    return request


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield checked(request)


def first_bad_field(raw: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """Dotted path of the first field whose bytes do not parse (map values by their key:
    `steps.fetch.route_labels`); None when every field parses on its own."""

    def named(number: int) -> str:
        field = descriptor.fields_by_number.get(number)
        return prefix + (field.name if field else str(number))

    try:
        for number, value in _walk(raw):
            field = descriptor.fields_by_number.get(number)
            name = named(number)
            if field is None or not isinstance(value, bytes):
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = _bad_message(value, field, name)
                if inner:
                    return inner
            elif field.type == FieldDescriptor.TYPE_STRING and not _utf8(value):
                return name
    except _Truncated as cut:
        return named(cut.number) if cut.number is not None else prefix.rstrip(".") or None
    return None


def _bad_message(chunk: bytes, field: FieldDescriptor, name: str) -> str | None:
    entry = field.message_type
    try:
        message_factory.GetMessageClass(entry).FromString(chunk)
    except DecodeError:
        if not entry.GetOptions().map_entry:
            return first_bad_field(chunk, entry, name + ".") or name
        inner, key = first_bad_field(chunk, entry), _map_key(chunk)
        if inner is None or key is None or not inner.startswith("value"):
            return name
        return f"{name}.{key}{inner.removeprefix('value')}"
    return None


class _Truncated(Exception):
    def __init__(self, number: int | None = None) -> None:
        super().__init__(number)
        self.number = number  # the field being read; None: its tag itself


def _walk(raw: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: an int, or the bytes of a length-delimited one."""
    pos = 0
    while pos < len(raw):
        tag, pos = _varint(raw, pos)
        number, wire = tag >> 3, tag & 7
        try:
            if wire == _VARINT:
                value, pos = _varint(raw, pos)
                yield number, value
            elif wire in (_FIXED64, _FIXED32):
                pos += 8 if wire == _FIXED64 else 4
                if pos > len(raw):
                    raise _Truncated
                yield number, 0
            elif wire == _LENGTH:
                length, pos = _varint(raw, pos)
                chunk, pos = raw[pos : pos + length], pos + length
                if pos > len(raw):
                    raise _Truncated
                yield number, chunk
            else:  # groups and invalid wire types
                raise _Truncated
        except _Truncated:
            raise _Truncated(number) from None


def _map_key(entry: bytes) -> str | None:
    try:
        key = next((value for number, value in _walk(entry) if number == 1), None)
    except _Truncated:
        return None
    if isinstance(key, bytes):
        return key.decode() if _utf8(key) else None
    return None if key is None else str(key)


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):  # at most 10 bytes
        if pos >= len(raw):
            break
        byte, pos = raw[pos], pos + 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise _Truncated


def _unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], stream_in: bool
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked_stream(request) if stream_in else checked(request), context)

    return wrapper


def _streaming(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], stream_in: bool
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in behavior(
            checked_stream(request) if stream_in else checked(request), context
        ):
            yield item

    return wrapper


class RequestDecodeInterceptor(WrappingInterceptor):
    """Innermost: the CordumError it raises becomes a status in ErrorInterceptor."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _wrap(handler)


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    kwargs = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, False), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, True), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, True), **kwargs
        )
    return handler
