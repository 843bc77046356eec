"""The `cordumctl` entry point."""

from __future__ import annotations

import typer

from cordum.sdk.cli import stack

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cordum command line.")
app.command()(stack.up)
app.command()(stack.down)
app.command()(stack.status)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
