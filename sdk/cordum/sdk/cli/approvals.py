"""`cordumctl approval list | approve | reject`: human decisions on gated jobs."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import out, print_json, proto_dict, run, when
from cordum.sdk.convert import state_name

app = typer.Typer(no_args_is_help=True, help="Approve or reject jobs that policy gated.")

JSON = typer.Option(False, "--json", help="Print protojson (proto field names).")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Jobs waiting for approval, oldest first."""

    async def command(client: AsyncClient) -> None:
        approvals = [a async for a in client.approvals.list()]
        if as_json:
            print_json([proto_dict(a) for a in approvals])
            return
        table = Table("job", "topic", "rule", "reason", "created")
        for item in approvals:
            job, decision = item.job, item.decision
            table.add_row(
                job.id, job.topic, decision.rule_id, decision.reason, when(job.created_at)
            )
        out.print(table)

    run(ctx, command)


def _decided(job_id: str, verb: str, state: int) -> Text:
    return Text(f"{job_id} {verb}; now {state_name(state)}")


@app.command()
def approve(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    reason: str = typer.Option("", "--reason", help="Why it may run."),
    note: str = typer.Option("", "--note", help="A free-form note kept with the approval."),
    as_json: bool = JSON,
) -> None:
    """Approve a job; it is re-checked against the current policy, then scheduled."""

    async def command(client: AsyncClient) -> None:
        job = await client.approvals.approve(job_id, reason, note)
        if as_json:
            print_json(proto_dict(job))
        else:
            out.print(_decided(job.id, "approved", job.state), soft_wrap=True)

    run(ctx, command)


@app.command()
def reject(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    reason: str = typer.Option("", "--reason", help="Why it may not run."),
    note: str = typer.Option("", "--note", help="A free-form note kept with the rejection."),
    as_json: bool = JSON,
) -> None:
    """Reject a job: it becomes DENIED."""

    async def command(client: AsyncClient) -> None:
        job = await client.approvals.reject(job_id, reason, note)
        if as_json:
            print_json(proto_dict(job))
        else:
            out.print(_decided(job.id, "rejected", job.state), soft_wrap=True)

    run(ctx, command)
