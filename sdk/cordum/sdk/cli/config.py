"""`cordumctl config get | set | effective | reload`: scoped configuration."""

from __future__ import annotations

import typer
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import (
    JSON,
    err,
    json_object_arg,
    out,
    parse_labels,
    print_json,
    proto_dict,
    run,
)
from cordum.sdk.convert import from_struct

app = typer.Typer(
    no_args_is_help=True,
    help="Read and write configuration: system → org → team → workflow → step.",
)

SCOPE = typer.Argument("", help="system (default), org, team, workflow or step.")
SCOPE_ID = typer.Argument("", help="The org/team/workflow/step id (system: default).")


def _about(line: str) -> None:
    # Data goes to stdout; what it is goes to stderr, so `config get > file` saves the data.
    err.print(Text(line, style="dim"), soft_wrap=True)


@app.command()
def get(
    ctx: typer.Context, scope: str = SCOPE, scope_id: str = SCOPE_ID, as_json: bool = JSON
) -> None:
    """Print the document stored at one scope."""

    async def command(client: AsyncClient) -> None:
        doc = await client.config.get(scope, scope_id)
        if as_json:
            print_json(proto_dict(doc))
            return
        _about(f"{doc.scope}/{doc.scope_id} revision {doc.revision}")
        print_json(from_struct(doc.data))

    run(ctx, command)


@app.command("set")
def set_(
    ctx: typer.Context,
    scope: str = typer.Argument(..., help="system, org, team, workflow or step."),
    scope_id: str = typer.Argument(..., help="The id within the scope (system: default)."),
    data: str = typer.Option(
        ..., "--data", help="The document, a JSON object: inline, @file or @- (stdin)."
    ),
    expected_revision: int | None = typer.Option(
        None,
        "--expected-revision",
        help="Write only if the stored revision is this one (else ABORTED).",
    ),
    meta: list[str] = typer.Option([], "--meta", help="key=value kept with it; repeatable."),
    as_json: bool = JSON,
) -> None:
    """Replace the document at one scope."""

    async def command(client: AsyncClient) -> None:
        document = json_object_arg("--data", data)
        metadata = parse_labels(meta, "--meta")
        doc = await client.config.set(
            scope, scope_id, document, meta=metadata, expected_revision=expected_revision
        )
        if as_json:
            print_json(proto_dict(doc))
        else:
            out.print(f"{doc.scope}/{doc.scope_id} revision {doc.revision}")

    run(ctx, command)


@app.command()
def effective(
    ctx: typer.Context,
    org_id: str | None = typer.Option(None, "--org"),
    team_id: str | None = typer.Option(None, "--team"),
    workflow_id: str | None = typer.Option(None, "--workflow"),
    step_id: str | None = typer.Option(None, "--step"),
    as_json: bool = JSON,
) -> None:
    """Print the merged configuration for a job or step, with its version and hash."""

    async def command(client: AsyncClient) -> None:
        merged = await client.config.effective(
            org_id=org_id, team_id=team_id, workflow_id=workflow_id, step_id=step_id
        )
        if as_json:
            print_json(proto_dict(merged))
            return
        _about(f"version {merged.version}  hash {merged.hash}")
        print_json(from_struct(merged.data))

    run(ctx, command)


@app.command()
def reload(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Load the server's config/*.yaml defaults into the system scope now."""

    async def command(client: AsyncClient) -> None:
        reply = await client.config.reload()
        if as_json:
            print_json(proto_dict(reply))
            return
        doc = reply.document
        out.print(f"{doc.scope}/{doc.scope_id} revision {doc.revision}")
        for name in reply.files:
            out.print(f"  read {name}")

    run(ctx, command)
