"""`cordumctl artifact put | get | head | list | delete`: blobs, streamed in chunks both ways
(a file is never read or written whole)."""

from __future__ import annotations

import asyncio
import mimetypes
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cordum.sdk import AsyncClient
from cordum.sdk.artifacts import CHUNK_SIZE
from cordum.sdk.cli._common import (
    JSON,
    Failure,
    details,
    err,
    labels_text,
    out,
    parse_labels,
    print_json,
    proto_dict,
    run,
    when,
)
from cordum.v1 import artifact_pb2

app = typer.Typer(no_args_is_help=True, help="Store and fetch artifacts (files, blobs).")

POINTER = typer.Argument(..., help="The artifact pointer, redis://art:<id>.")


def _progress() -> Progress:
    # On stderr and gone when done; off when stderr is not a terminal (a log, a pipe).
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


@contextmanager
def _source(file: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """The file to upload and its size (stdin: unknown)."""
    if file == "-":
        yield typer.get_binary_stream("stdin"), None
        return
    with Path(file).open("rb") as handle:
        yield handle, os.fstat(handle.fileno()).st_size


async def _read(handle: BinaryIO, progress: Progress, task: int) -> AsyncIterator[bytes]:
    while piece := await asyncio.to_thread(handle.read, CHUNK_SIZE):
        progress.advance(task, len(piece))
        yield piece


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _show(ptr: str, meta: artifact_pb2.ArtifactMetadata) -> None:
    rows = [
        ("pointer", ptr),
        ("content type", meta.content_type),
        ("size", f"{meta.size_bytes} bytes"),
        ("sha256", meta.sha256),
        ("retention", meta.retention),
        ("backend", meta.backend),
        ("created", when(meta.created_at)),
        ("expires", when(meta.expires_at)),
        ("labels", labels_text(meta.labels)),
    ]
    out.print(details(rows))


@app.command()
def put(
    ctx: typer.Context,
    file: str = typer.Argument(..., help="The file to store, or - for stdin."),
    content_type: str | None = typer.Option(
        None, "--content-type", help="Default: guessed from the file name."
    ),
    retention: str | None = typer.Option(
        None, "--retention", help="short (24 h), standard (7 d, default) or audit (30 d)."
    ),
    label: list[str] = typer.Option([], "--label", help="key=value; repeatable."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Refuse anything larger."),
    as_json: bool = JSON,
) -> None:
    """Upload a file in chunks and print its pointer."""

    async def command(client: AsyncClient) -> None:
        labels = parse_labels(label)
        guessed = content_type
        if guessed is None and file != "-":
            guessed = mimetypes.guess_type(file)[0]
        try:
            with _source(file) as (handle, total), _progress() as progress:
                task = progress.add_task(f"put {file}", total=total)
                saved = await client.artifacts.put(
                    _read(handle, progress, task),
                    content_type=guessed,
                    retention=retention,
                    labels=labels,
                    max_bytes=max_bytes,
                )
        except OSError as exc:
            raise Failure(f"{file}: cannot read: {exc.strerror or exc}") from exc
        if as_json:
            print_json(proto_dict(saved))
        else:
            typer.echo(saved.artifact_ptr)

    run(ctx, command)


@app.command()
def get(
    ctx: typer.Context,
    artifact_ptr: str = POINTER,
    output: str = typer.Option(
        "-", "--output", "-o", help="Where to write it (- for stdout, the default)."
    ),
) -> None:
    """Download an artifact in chunks, checking its size and SHA-256. A file is written
    under <name>.part and renamed into place only when complete."""

    async def command(client: AsyncClient) -> None:
        if output == "-":
            stdout = typer.get_binary_stream("stdout")
            await client.artifacts.download(artifact_ptr, stdout)
            stdout.flush()
            return
        try:
            meta = await client.artifacts.download(artifact_ptr, Path(output))
        except OSError as exc:
            raise Failure(f"{output}: cannot write: {exc.strerror or exc}") from exc
        out.print(f"{artifact_ptr} → {output} ({_size(meta.size_bytes)}, {meta.content_type})")

    run(ctx, command)


@app.command()
def head(ctx: typer.Context, artifact_ptr: str = POINTER, as_json: bool = JSON) -> None:
    """Show an artifact's metadata (its bytes are not fetched)."""

    async def command(client: AsyncClient) -> None:
        meta = await client.artifacts.head(artifact_ptr)
        if as_json:
            print_json({"artifact_ptr": artifact_ptr, "metadata": proto_dict(meta)})
        else:
            _show(artifact_ptr, meta)

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", min=1),
    as_json: bool = JSON,
) -> None:
    """List artifacts, newest first."""

    async def command(client: AsyncClient) -> None:
        found = [a async for a in client.artifacts.list(limit=limit)]
        if as_json:
            print_json([proto_dict(a) for a in found])
            return
        table = Table("pointer", "type", "size", "retention", "created", "expires")
        for a in found:
            m = a.metadata
            table.add_row(
                a.artifact_ptr,
                m.content_type,
                _size(m.size_bytes),
                m.retention,
                when(m.created_at),
                when(m.expires_at),
            )
        out.print(table)

    run(ctx, command)


@app.command()
def delete(ctx: typer.Context, artifact_ptr: str = POINTER) -> None:
    """Delete an artifact."""

    async def command(client: AsyncClient) -> None:
        await client.artifacts.delete(artifact_ptr)
        out.print(f"artifact {artifact_ptr} deleted")

    run(ctx, command)
