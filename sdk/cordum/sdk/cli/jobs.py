"""`cordumctl job submit | get | list | cancel | result | watch`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import (
    Failure,
    details,
    err,
    labels_text,
    out,
    parse_json_arg,
    parse_labels,
    print_json,
    print_json_line,
    proto_dict,
    run,
    when,
)
from cordum.sdk.convert import is_terminal, optional_value, state_name

if TYPE_CHECKING:
    from cordum.v1 import job_pb2

app = typer.Typer(no_args_is_help=True, help="Submit jobs and follow them.")

JSON = typer.Option(False, "--json", help="Print protojson (proto field names).")
_STATE_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "TIMEOUT": "red",
    "DENIED": "red",
    "CANCELLED": "yellow",
    "APPROVAL_REQUIRED": "magenta",
}


def _state(state: int) -> Text:
    name = state_name(state)
    return Text(name, style=_STATE_STYLE.get(name, "cyan"))


def _ended_badly(job: job_pb2.Job) -> Failure:
    detail = job.error_message or job.safety.reason or job.pending_reason
    suffix = f": {detail}" if detail else ""
    return Failure(f"job {job.id} ended {state_name(job.state)}{suffix}")


async def _follow(
    client: AsyncClient,
    job_id: str,
    timeout: float | None,  # noqa: ASYNC109 (gRPC deadline)
) -> job_pb2.Job:
    """Follow WatchJob with a live line on stderr, logging each state change above it."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{job_id} waiting", total=None)
        ended: job_pb2.Job | None = None
        # The stream ends by itself right after the terminal event.
        async for event in client.jobs.watch(job_id, timeout=timeout):
            line = Text(f"{job_id} ").append_text(_state(event.state))
            if event.message:
                line.append(f"  {event.message}", style="dim")
            progress.console.print(line, soft_wrap=True)
            progress.update(task, description=line.markup)
            if is_terminal(event.state):
                ended = event.job
    return ended if ended is not None else await client.jobs.get(job_id)


@app.command()
def submit(
    ctx: typer.Context,
    topic: str = typer.Option(..., "--topic", help="Topic to dispatch on, e.g. job.echo."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text for the worker."),
    input_: str | None = typer.Option(
        None, "--input", help="The worker's input document: JSON, @file or @- (stdin)."
    ),
    context: str | None = typer.Option(
        None, "--context", help="JSON passed under `context` in the default input document."
    ),
    label: list[str] = typer.Option([], "--label", help="key=value; repeatable."),
    priority: str | None = typer.Option(None, "--priority", help="interactive|batch|critical"),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    max_retries: int | None = typer.Option(None, "--max-retries"),
    deadline_ms: int | None = typer.Option(None, "--deadline-ms", help="Run-time budget."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job until it ends."),
    timeout: float = typer.Option(60.0, "--timeout", help="With --wait: seconds to wait."),
    as_json: bool = JSON,
) -> None:
    """Submit a job and print its id.

    With --wait, follow the job until it ends and print its result; the exit code is then 1
    unless it succeeded.
    """

    async def command(client: AsyncClient) -> None:
        fields: dict[str, Any] = {
            "topic": topic,
            "prompt": prompt,
            "input": parse_json_arg("--input", input_) if input_ is not None else None,
            "context": parse_json_arg("--context", context) if context is not None else None,
            "labels": parse_labels(label) or None,
            "priority": priority,
            "idempotency_key": idempotency_key,
            "max_retries": max_retries,
            "deadline_ms": deadline_ms,
        }
        submitted = await client.jobs.submit(**fields)
        if not wait:
            print_json(proto_dict(submitted)) if as_json else typer.echo(submitted.job_id)
            return
        job = await _follow(client, submitted.job_id, timeout)
        result = optional_value(await client.jobs.get_result(job.id), "result")
        if as_json:
            # The shape of SubmitJobAndWaitResponse, so scripts see one format either way.
            print_json(
                {
                    "job_id": job.id,
                    "trace_id": job.trace_id,
                    "job": proto_dict(job),
                    "result": result,
                    "done": True,
                    "idempotent_replay": submitted.idempotent_replay,
                }
            )
        elif state_name(job.state) == "SUCCEEDED":
            print_json(result)
        if state_name(job.state) != "SUCCEEDED":
            raise _ended_badly(job)

    run(ctx, command)


@app.command()
def get(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    as_json: bool = JSON,
) -> None:
    """Show one job."""

    async def command(client: AsyncClient) -> None:
        job = await client.jobs.get(job_id)
        if as_json:
            print_json(proto_dict(job))
            return
        rows: list[tuple[str, str | Text]] = [
            ("id", job.id),
            ("state", _state(job.state)),
            ("topic", job.topic),
            ("tenant", job.tenant_id),
            ("trace", job.trace_id),
            ("worker", job.worker_id),
            ("attempts", f"{job.attempts} (max retries {job.max_retries})"),
            ("created", when(job.created_at)),
            ("updated", when(job.updated_at)),
            ("safety", job.safety.reason or job.safety.rule_id),
            ("pending", job.pending_reason),
            ("error", " ".join(filter(None, (job.error_code, job.error_message)))),
            ("labels", labels_text(job.labels)),
        ]
        out.print(details(rows))

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: str | None = typer.Option(None, "--state", help="e.g. RUNNING"),
    topic: str | None = typer.Option(None, "--topic"),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many jobs."),
    as_json: bool = JSON,
) -> None:
    """List jobs, newest first."""

    async def command(client: AsyncClient) -> None:
        jobs = [j async for j in client.jobs.list(state=state, topic=topic, limit=limit)]
        if as_json:
            print_json([proto_dict(j) for j in jobs])
            return
        table = Table("id", "state", "topic", "worker", "updated")
        for job in jobs:
            table.add_row(job.id, _state(job.state), job.topic, job.worker_id, when(job.updated_at))
        out.print(table)

    run(ctx, command)


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    reason: str = typer.Option("", "--reason", help="Recorded with the cancellation."),
    as_json: bool = JSON,
) -> None:
    """Cancel a job that has not ended yet."""

    async def command(client: AsyncClient) -> None:
        job = await client.jobs.cancel(job_id, reason)
        if as_json:
            print_json(proto_dict(job))
        else:
            out.print(Text(f"{job.id} ").append_text(_state(job.state)), soft_wrap=True)

    run(ctx, command)


@app.command()
def result(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    as_json: bool = JSON,
) -> None:
    """Print a job's output.

    The exit code is 1 when there is none: the job has not ended, or did not succeed.
    """

    async def command(client: AsyncClient) -> None:
        record = await client.jobs.get_result(job_id)
        if as_json:
            print_json(proto_dict(record))
            return
        if state_name(record.state) != "SUCCEEDED":
            if not is_terminal(record.state):
                raise Failure(f"job {job_id} is {state_name(record.state)}: no result yet")
            detail = " ".join(filter(None, (record.error_code, record.error_message)))
            raise Failure(
                f"job {job_id} ended {state_name(record.state)}" + (f": {detail}" if detail else "")
            )
        print_json(optional_value(record, "result"))

    run(ctx, command)


@app.command()
def watch(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    timeout: float | None = typer.Option(None, "--timeout", help="Give up after S seconds."),
    as_json: bool = typer.Option(False, "--json", help="One protojson JobEvent per line."),
) -> None:
    """Print each state change of a job until it ends."""

    async def command(client: AsyncClient) -> None:
        async for event in client.jobs.watch(job_id, timeout=timeout):
            if as_json:
                print_json_line(proto_dict(event))
                continue
            line = Text(f"{when(event.time)}  ").append_text(_state(event.state))
            if event.message:
                line.append(f"  {event.message}")
            out.print(line, soft_wrap=True)

    run(ctx, command)
