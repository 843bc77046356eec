"""`cordumctl memory get <pointer>`: what a job pointer points at."""

from __future__ import annotations

import typer
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import JSON, err, print_json, proto_dict, run
from cordum.sdk.memory import decode, is_cut

app = typer.Typer(no_args_is_help=True, help="Read job inputs, results, artifacts and memory.")


def _about(line: str, style: str = "dim") -> None:
    # Data goes to stdout; what it is goes to stderr, so `memory get ... > file` saves data.
    err.print(Text(line, style=style), soft_wrap=True)


@app.command()
def get(
    ctx: typer.Context,
    pointer: str = typer.Argument(
        ...,
        help="redis://ctx:<job>, redis://res:<job>, redis://art:<id>, mem:<memory>:events, "
        "or the bare key.",
    ),
    as_json: bool = JSON,
) -> None:
    """Print the value: JSON pretty-printed, text as it is, other bytes raw."""

    async def command(client: AsyncClient) -> None:
        value = await client.memory.read(pointer)
        if as_json:
            print_json(proto_dict(value))
            return
        kind = value.redis_type or "string"
        count = f"{value.length} entries" if value.length else f"{value.size_bytes} bytes"
        _about(f"{value.key} ({value.kind}, {kind}, {count})")
        if is_cut(value):
            _about("cut at the server's size limit: showing the first part only", "yellow")
        data = decode(value)
        if isinstance(data, bytes):
            stdout = typer.get_binary_stream("stdout")
            stdout.write(data)
            stdout.flush()
        elif isinstance(data, str):
            typer.echo(data)
        else:
            print_json(data)

    run(ctx, command)
