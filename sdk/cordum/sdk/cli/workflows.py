"""`cordumctl workflow create | validate | get | list | delete`: workflow definitions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import (
    JSON,
    Failure,
    details,
    error_line,
    out,
    print_json,
    proto_dict,
    run,
    violation_lines,
    when,
)
from cordum.sdk.workflows import load_workflow

if TYPE_CHECKING:
    from cordum.v1 import workflow_pb2

app = typer.Typer(no_args_is_help=True, help="Save, check, show and delete workflow definitions.")

FILE = typer.Option(
    ..., "--file", "-f", help="The definition: a .json file, or .yaml/.yml.", show_default=False
)


def _load(path: str) -> workflow_pb2.Workflow:
    try:
        return load_workflow(path)
    except OSError as exc:
        raise Failure(f"--file: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise Failure(f"--file: {exc}") from exc


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _step_type(step: workflow_pb2.Step) -> str:
    return step.type or "job"


def _step_detail(step: workflow_pb2.Step) -> str:
    kind = _step_type(step)
    parts: list[str] = []
    if step.for_each:
        parts.append(f"for_each {step.for_each}")
        if step.max_parallel:
            parts.append(f"max_parallel {step.max_parallel}")
    if step.condition:
        parts.append(f"if {step.condition}" if kind != "condition" else step.condition)
    if step.HasField("retry") and step.retry.max_retries:
        parts.append(f"retries {step.retry.max_retries}")
    if step.timeout_sec:
        parts.append(f"timeout {step.timeout_sec}s")
    if step.delay_sec:
        parts.append(f"delay {step.delay_sec}s")
    if step.delay_until:
        parts.append(f"until {step.delay_until}")
    if step.on_error:
        parts.append(f"on_error {step.on_error}")
    return ", ".join(parts)


@app.command()
def create(ctx: typer.Context, file: str = FILE, as_json: bool = JSON) -> None:
    """Create or replace a workflow from a JSON or YAML file.

    An invalid definition is refused with every problem listed, and nothing is stored.
    """

    async def command(client: AsyncClient) -> None:
        definition = _load(file)
        saved = await client.workflows.upsert(definition)
        if as_json:
            print_json(proto_dict(saved))
            return
        out.print(
            Text(f"workflow {saved.id} saved (revision {saved.revision}, ")
            .append(_plural(len(saved.steps), "step"))
            .append(")"),
            soft_wrap=True,
        )

    run(ctx, command)


@app.command()
def validate(ctx: typer.Context, file: str = FILE, as_json: bool = JSON) -> None:
    """Check a definition without storing it; the exit code is 1 when it is invalid."""

    async def command(client: AsyncClient) -> None:
        definition = _load(file)
        reply = await client.workflows.validate(definition)
        if as_json:
            print_json(proto_dict(reply) | {"valid": reply.valid})
        elif reply.valid:
            name = definition.id or file
            out.print(f"workflow {name} is valid ({_plural(len(definition.steps), 'step')})")
        if not reply.valid:
            if not as_json:
                name = definition.id or file
                error_line(
                    f"workflow {name} is invalid ({_plural(len(reply.problems), 'problem')})"
                )
                violation_lines([(p.field, p.description) for p in reply.problems])
            raise typer.Exit(1)

    run(ctx, command)


@app.command()
def get(
    ctx: typer.Context,
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    as_json: bool = JSON,
) -> None:
    """Show a workflow and its steps."""

    async def command(client: AsyncClient) -> None:
        wf = await client.workflows.get(workflow_id)
        if as_json:
            print_json(proto_dict(wf))
            return
        rows = [
            ("id", wf.id),
            ("name", wf.name),
            ("description", wf.description),
            ("org", wf.org_id),
            ("revision", str(wf.revision)),
            ("timeout", f"{wf.timeout_sec}s" if wf.timeout_sec else ""),
            ("updated", when(wf.updated_at)),
        ]
        out.print(details(rows))
        steps = Table("step", "type", "topic", "depends on", "details")
        for sid in sorted(wf.steps):
            step = wf.steps[sid]
            steps.add_row(
                sid, _step_type(step), step.topic, ", ".join(step.depends_on), _step_detail(step)
            )
        out.print(steps)

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many workflows."),
    as_json: bool = JSON,
) -> None:
    """List workflows."""

    async def command(client: AsyncClient) -> None:
        found = [w async for w in client.workflows.list(limit=limit)]
        if as_json:
            print_json([proto_dict(w) for w in found])
            return
        table = Table("id", "name", "steps", "revision", "updated")
        for wf in found:
            table.add_row(wf.id, wf.name, str(len(wf.steps)), str(wf.revision), when(wf.updated_at))
        out.print(table)

    run(ctx, command)


@app.command()
def delete(
    ctx: typer.Context, workflow_id: str = typer.Argument(..., help="The workflow id.")
) -> None:
    """Delete a workflow. Runs already started finish with the definition they had."""

    async def command(client: AsyncClient) -> None:
        await client.workflows.delete(workflow_id)
        out.print(f"workflow {workflow_id} deleted")

    run(ctx, command)
