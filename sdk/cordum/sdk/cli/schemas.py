"""`cordumctl schema register | get | list | delete | validate`: the JSON Schema registry."""

from __future__ import annotations

import typer
from rich.table import Table

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import (
    JSON,
    Failure,
    error_line,
    out,
    print_json,
    proto_dict,
    read_document,
    run,
    violation_lines,
    when,
)
from cordum.sdk.convert import from_struct

app = typer.Typer(no_args_is_help=True, help="Register JSON Schemas and validate documents.")

SCHEMA_ID = typer.Argument(..., help="The schema id, e.g. order/v1.")


@app.command()
def register(
    ctx: typer.Context,
    schema_id: str = SCHEMA_ID,
    file: str = typer.Option(
        ...,
        "--file",
        "-f",
        help="The schema (draft 2020-12): a .json file, YAML, or - for stdin.",
        show_default=False,
    ),
    as_json: bool = JSON,
) -> None:
    """Register (or replace) a schema."""

    async def command(client: AsyncClient) -> None:
        schema = read_document("--file", file)
        if not isinstance(schema, dict):
            raise Failure(f"--file: a schema is a JSON object, not {type(schema).__name__}")
        saved = await client.schemas.register(schema_id, schema)
        if as_json:
            print_json(proto_dict(saved))
        else:
            out.print(f"schema {saved.id} registered (sha256 {saved.sha256[:12]})")

    run(ctx, command)


@app.command()
def get(ctx: typer.Context, schema_id: str = SCHEMA_ID, as_json: bool = JSON) -> None:
    """Print a schema (with --json: with its id, hash and times)."""

    async def command(client: AsyncClient) -> None:
        found = await client.schemas.get(schema_id)
        print_json(proto_dict(found) if as_json else from_struct(found.schema))

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(100, "--limit", min=1),
    as_json: bool = JSON,
) -> None:
    """List registered schemas."""

    async def command(client: AsyncClient) -> None:
        found = [s async for s in client.schemas.list(limit=limit)]
        if as_json:
            print_json([proto_dict(s) for s in found])
            return
        table = Table("id", "title", "sha256", "updated")
        for s in found:
            title = from_struct(s.schema).get("title", "")
            table.add_row(s.id, str(title), s.sha256[:12], when(s.updated_at))
        out.print(table)

    run(ctx, command)


@app.command()
def delete(ctx: typer.Context, schema_id: str = SCHEMA_ID) -> None:
    """Delete a schema."""

    async def command(client: AsyncClient) -> None:
        await client.schemas.delete(schema_id)
        out.print(f"schema {schema_id} deleted")

    run(ctx, command)


@app.command()
def validate(
    ctx: typer.Context,
    schema_id: str = SCHEMA_ID,
    file: str = typer.Option(
        ...,
        "--file",
        "-f",
        help="The document: a .json file, YAML, or - for stdin.",
        show_default=False,
    ),
    as_json: bool = JSON,
) -> None:
    """Validate a document against a schema; the exit code is 1 when it does not conform,
    and each violation is listed with its JSON pointer."""

    async def command(client: AsyncClient) -> None:
        document = read_document("--file", file)
        reply = await client.schemas.validate(schema_id, document)
        if as_json:
            print_json(proto_dict(reply) | {"valid": reply.valid})
        elif reply.valid:
            out.print(f"{file} conforms to {schema_id}")
        if not reply.valid:
            if not as_json:
                count = len(reply.violations)
                error_line(
                    f"{file} does not conform to {schema_id} "
                    f"({count} violation{'' if count == 1 else 's'})"
                )
                violation_lines([(v.pointer or "/", v.message) for v in reply.violations])
            raise typer.Exit(1)

    run(ctx, command)
