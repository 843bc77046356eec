"""`cordumctl dlq list | get | delete | retry`: the jobs that ended without success."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import JSON, details, out, print_json, proto_dict, run, when
from cordum.v1 import dlq_pb2

app = typer.Typer(no_args_is_help=True, help="Inspect, retry and clear dead-lettered jobs.")

JOB_ID = typer.Argument(..., help="The job id of the entry.")


def _status(entry: dlq_pb2.DLQEntry) -> Text:
    name = agent.JobStatus.Name(entry.status).removeprefix("JOB_STATUS_")
    return Text(name, style="yellow" if name == "CANCELLED" else "red")


def _show(entry: dlq_pb2.DLQEntry) -> None:
    rows: list[tuple[str, str | Text]] = [
        ("job", entry.job_id),
        ("status", _status(entry)),
        ("topic", entry.topic),
        ("reason", entry.reason),
        ("code", entry.reason_code),
        ("last state", entry.last_state),
        ("attempts", str(entry.attempts)),
        ("tenant", entry.tenant_id),
        ("trace", entry.trace_id),
        ("created", when(entry.created_at)),
        ("retries", ", ".join(entry.retry_job_ids)),
    ]
    out.print(details(rows))


@app.command("list")
def list_(
    ctx: typer.Context,
    topic: str | None = typer.Option(None, "--topic"),
    reason_code: str | None = typer.Option(
        None, "--reason-code", help="e.g. safety_denied, max_retries_exceeded, timeout."
    ),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many entries."),
    as_json: bool = JSON,
) -> None:
    """List entries, newest first."""

    async def command(client: AsyncClient) -> None:
        entries = [
            e async for e in client.dlq.list(topic=topic, reason_code=reason_code, limit=limit)
        ]
        if as_json:
            print_json([proto_dict(e) for e in entries])
            return
        table = Table("job", "status", "topic", "code", "reason", "created")
        for e in entries:
            table.add_row(
                e.job_id, _status(e), e.topic, e.reason_code, e.reason, when(e.created_at)
            )
        out.print(table)

    run(ctx, command)


@app.command()
def get(ctx: typer.Context, job_id: str = JOB_ID, as_json: bool = JSON) -> None:
    """Show one entry."""

    async def command(client: AsyncClient) -> None:
        entry = await client.dlq.get(job_id)
        print_json(proto_dict(entry)) if as_json else _show(entry)

    run(ctx, command)


@app.command()
def delete(ctx: typer.Context, job_id: str = JOB_ID) -> None:
    """Delete an entry (the job itself stays)."""

    async def command(client: AsyncClient) -> None:
        await client.dlq.delete(job_id)
        out.print(f"dlq entry {job_id} deleted")

    run(ctx, command)


@app.command()
def retry(ctx: typer.Context, job_id: str = JOB_ID, as_json: bool = JSON) -> None:
    """Submit a new job from the entry (same input, labels, budget, priority) and print
    its id; the entry is kept and names it."""

    async def command(client: AsyncClient) -> None:
        reply = await client.dlq.retry(job_id)
        print_json(proto_dict(reply)) if as_json else typer.echo(reply.job_id)

    run(ctx, command)
