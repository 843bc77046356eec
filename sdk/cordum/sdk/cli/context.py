"""`cordumctl context build | update`: model windows from a memory, and recording turns."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import JSON, Failure, out, print_json, proto_dict, read_text, run
from cordum.sdk.context import context_mode

app = typer.Typer(no_args_is_help=True, help="Build model windows and update chat memory.")

MEMORY_ID = typer.Argument(..., help="The memory id, e.g. chat-42.")
PAYLOAD = typer.Option(
    ...,
    "--payload",
    "-p",
    help='The current request: text, JSON such as {"prompt": "..."}, @file or @- (stdin).',
)
MODE = typer.Option("chat", "--mode", help="raw, chat or rag.")


def _payload(raw: str) -> str:
    return read_text("--payload", raw[1:]) if raw.startswith("@") else raw


def _mode(raw: str) -> int:
    try:
        return context_mode(raw)
    except ValueError as exc:
        raise Failure(f"--mode: {exc}") from exc


@app.command()
def build(
    ctx: typer.Context,
    memory_id: str = MEMORY_ID,
    payload: str = PAYLOAD,
    mode: str = MODE,
    model: str = typer.Option("", "--model", help="Picks the tokenizer, e.g. gpt-4o."),
    max_input_tokens: int | None = typer.Option(None, "--max-input-tokens", help="(8000)"),
    max_output_tokens: int | None = typer.Option(None, "--max-output-tokens", help="(1024)"),
    as_json: bool = JSON,
) -> None:
    """Show the window the context engine builds: the messages, in order, within budget."""

    async def command(client: AsyncClient) -> None:
        window = await client.context.build_window(
            memory_id,
            _payload(payload),
            mode=_mode(mode),
            model=model,
            max_input_tokens=max_input_tokens,
            max_output_tokens=max_output_tokens,
        )
        if as_json:
            print_json(proto_dict(window))
            return
        table = Table("#", "role", "content")
        for n, message in enumerate(window.messages, 1):
            table.add_row(str(n), message.role, message.content)
        out.print(table)
        summary = (
            f"{window.input_tokens} input tokens, {window.output_tokens} for the output, "
            f"{window.dropped_messages} message(s) left out"
        )
        out.print(Text(summary, style="dim"), soft_wrap=True)

    run(ctx, command)


@app.command()
def update(
    ctx: typer.Context,
    memory_id: str = MEMORY_ID,
    payload: str = PAYLOAD,
    response: str = typer.Option("", "--response", "-r", help="The model's answer."),
    mode: str = MODE,
) -> None:
    """Append a turn (the request and the model's response) to a memory."""

    async def command(client: AsyncClient) -> None:
        await client.context.update_memory(
            memory_id, _payload(payload), model_response=response, mode=_mode(mode)
        )
        out.print(f"memory {memory_id} updated")

    run(ctx, command)
