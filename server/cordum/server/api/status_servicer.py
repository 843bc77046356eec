from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.services.status import StatusService
from cordum.server.services.workers import WorkerState
from cordum.v1 import status_pb2, status_service_pb2, status_service_pb2_grpc


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class StatusServicer(status_service_pb2_grpc.StatusServiceServicer):
    def __init__(self, service: StatusService) -> None:
        self._service = service

    async def GetStatus(
        self, request: status_service_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> status_service_pb2.GetStatusResponse:
        s = await self._service.status()
        return status_service_pb2.GetStatusResponse(
            time=_timestamp(s.time),
            uptime_seconds=s.uptime_seconds,
            build=status_pb2.BuildInfo(version=s.version),
            nats=status_pb2.NatsStatus(
                connected=s.nats.ok, status=s.nats.detail, url=s.nats_url, jetstream=s.jetstream
            ),
            redis=status_pb2.RedisStatus(ok=s.redis.ok, error=s.redis.detail),
            workers=status_pb2.WorkerCount(count=s.workers),
            roles=s.roles,
            policy_snapshot=s.policy_snapshot,
        )

    async def ListWorkers(
        self, request: status_service_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> status_service_pb2.ListWorkersResponse:
        states = self._service.workers(include_lost=request.include_lost)
        return status_service_pb2.ListWorkersResponse(
            workers=[_worker(s, self._service.is_live(s)) for s in states]
        )


def _worker(state: WorkerState, live: bool) -> status_pb2.Worker:
    hb = state.heartbeat
    hs = state.handshake
    return status_pb2.Worker(
        worker_id=state.worker_id,
        pool=hb.pool,
        topics=state.topics,
        capabilities=list(hb.capabilities) or sorted(hs.capabilities if hs else []),
        active_jobs=state.load,
        max_parallel_jobs=hb.max_parallel_jobs,
        cpu_load=hb.cpu_load,
        memory_load=hb.memory_load,
        labels=dict(hb.labels),
        sdk_version=hs.sdk_version if hs else "",
        region=hb.region,
        type=hb.type,
        agent_name=hb.agent_name or (hs.agent_name if hs else ""),
        last_heartbeat=_timestamp(state.last_seen),
        first_seen=_timestamp(state.first_seen),
        live=live,
    )
