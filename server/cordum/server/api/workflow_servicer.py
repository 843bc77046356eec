"""WorkflowService and RunService over gRPC: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cordum.server.api.metadata import caller, idempotency_key
from cordum.server.workflows.service import RunService, WorkflowService
from cordum.v1 import (
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

Ctx = grpc.aio.ServicerContext
W = workflow_service_pb2
RS = run_service_pb2


class WorkflowServicer(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, service: WorkflowService) -> None:
        self._workflows = service

    async def UpsertWorkflow(
        self, request: W.UpsertWorkflowRequest, context: Ctx
    ) -> workflow_pb2.Workflow:
        return await self._workflows.upsert(request.workflow, caller(context))

    async def ValidateWorkflow(
        self, request: W.ValidateWorkflowRequest, context: Ctx
    ) -> W.ValidateWorkflowResponse:
        _, problems = await self._workflows.validate(request.workflow, caller(context))
        return W.ValidateWorkflowResponse(
            valid=not problems,
            problems=[
                W.WorkflowProblem(field=p.field, description=p.description) for p in problems
            ],
        )

    async def GetWorkflow(
        self, request: W.GetWorkflowRequest, context: Ctx
    ) -> workflow_pb2.Workflow:
        return await self._workflows.get(request.workflow_id, caller(context))

    async def ListWorkflows(
        self, request: W.ListWorkflowsRequest, context: Ctx
    ) -> W.ListWorkflowsResponse:
        items, token = await self._workflows.list(
            request.org_id, request.page_size, request.page_token, caller(context)
        )
        return W.ListWorkflowsResponse(workflows=items, next_page_token=token)

    async def DeleteWorkflow(
        self, request: W.DeleteWorkflowRequest, context: Ctx
    ) -> W.DeleteWorkflowResponse:
        await self._workflows.delete(request.workflow_id, caller(context))
        return W.DeleteWorkflowResponse()


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, service: RunService) -> None:
        self._runs = service

    async def StartRun(self, request: RS.StartRunRequest, context: Ctx) -> RS.StartRunResponse:
        started = await self._runs.start(request, caller(context), idempotency_key(context))
        return RS.StartRunResponse(
            run_id=started.run.id, run=started.run, idempotent_replay=started.replay
        )

    async def GetRun(self, request: RS.GetRunRequest, context: Ctx) -> run_pb2.Run:
        return await self._runs.get(request.run_id, caller(context))

    async def ListRuns(self, request: RS.ListRunsRequest, context: Ctx) -> RS.ListRunsResponse:
        runs, token = await self._runs.list(request, caller(context))
        return RS.ListRunsResponse(runs=runs, next_page_token=token)

    async def CancelRun(self, request: RS.CancelRunRequest, context: Ctx) -> run_pb2.Run:
        return await self._runs.cancel(
            request.run_id, request.workflow_id, request.reason, caller(context)
        )

    async def RerunRun(self, request: RS.RerunRunRequest, context: Ctx) -> RS.StartRunResponse:
        started = await self._runs.rerun(request, caller(context))
        return RS.StartRunResponse(run_id=started.run.id, run=started.run)

    async def DeleteRun(self, request: RS.DeleteRunRequest, context: Ctx) -> RS.DeleteRunResponse:
        await self._runs.delete(request.run_id, caller(context))
        return RS.DeleteRunResponse()

    async def GetRunTimeline(
        self, request: RS.GetRunTimelineRequest, context: Ctx
    ) -> RS.GetRunTimelineResponse:
        events, token = await self._runs.timeline(
            request.run_id, request.page_size, request.page_token, caller(context)
        )
        return RS.GetRunTimelineResponse(events=events, next_page_token=token)

    async def ApproveStep(self, request: RS.ApproveStepRequest, context: Ctx) -> run_pb2.Run:
        approved = request.approved if request.HasField("approved") else True
        return await self._runs.decide(
            request.run_id,
            request.workflow_id,
            request.step_id,
            approved,
            request.reason,
            caller(context),
        )

    async def RejectStep(self, request: RS.RejectStepRequest, context: Ctx) -> run_pb2.Run:
        return await self._runs.decide(
            request.run_id,
            request.workflow_id,
            request.step_id,
            False,
            request.reason,
            caller(context),
        )

    async def WatchRun(
        self, request: RS.WatchRunRequest, context: Ctx
    ) -> AsyncIterator[RS.WatchRunResponse]:
        async for event, run in self._runs.watch(request.run_id, caller(context)):
            yield RS.WatchRunResponse(event=event, run=run)
