"""LockService over gRPC: proto in, LockService call, proto out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.api.metadata import caller
from cordum.server.services.locks import LockService
from cordum.server.stores.locks import LockState
from cordum.v1 import lock_pb2, lock_service_pb2, lock_service_pb2_grpc

Ctx = grpc.aio.ServicerContext


def _ms(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def lock_proto(lock: LockState) -> lock_pb2.Lock:
    return lock_pb2.Lock(
        resource=lock.resource,
        mode=lock.mode,
        owners={name: o.count for name, o in lock.owners.items()},
        fencing_token=lock.fencing_token,
        updated_at=_ms(lock.updated_ms),
        expires_at=_ms(lock.expires_ms),
    )


class LockServicer(lock_service_pb2_grpc.LockServiceServicer):
    def __init__(self, service: LockService) -> None:
        self._locks = service

    async def AcquireLock(
        self, request: lock_service_pb2.AcquireLockRequest, context: Ctx
    ) -> lock_pb2.Lock:
        lock = await self._locks.acquire(
            request.resource,
            request.owner,
            request.mode,
            request.ttl_ms,
            request.wait_ms,
            caller(context),
        )
        return lock_proto(lock)

    async def ReleaseLock(
        self, request: lock_service_pb2.ReleaseLockRequest, context: Ctx
    ) -> lock_service_pb2.ReleaseLockResponse:
        lock = await self._locks.release(request.resource, request.owner, caller(context))
        return lock_service_pb2.ReleaseLockResponse(
            lock=lock_proto(lock) if lock is not None else None, released=True
        )

    async def RenewLock(
        self, request: lock_service_pb2.RenewLockRequest, context: Ctx
    ) -> lock_pb2.Lock:
        lock = await self._locks.renew(
            request.resource, request.owner, request.ttl_ms, caller(context)
        )
        return lock_proto(lock)

    async def GetLock(
        self, request: lock_service_pb2.GetLockRequest, context: Ctx
    ) -> lock_pb2.Lock:
        return lock_proto(await self._locks.get(request.resource, caller(context)))

    async def ListLocks(
        self, request: lock_service_pb2.ListLocksRequest, context: Ctx
    ) -> lock_service_pb2.ListLocksResponse:
        page = await self._locks.list(
            request.prefix, request.page_size, request.page_token, caller(context)
        )
        return lock_service_pb2.ListLocksResponse(
            locks=[lock_proto(lock) for lock in page.locks], next_page_token=page.next_after
        )
