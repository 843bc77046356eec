"""The `cordumctl` entry point."""

from __future__ import annotations

import typer

from cordum.sdk import DEFAULT_TARGET
from cordum.sdk.cli import (
    approvals,
    artifacts,
    config,
    context,
    dlq,
    events,
    jobs,
    locks,
    memory,
    policy,
    runs,
    schemas,
    stack,
    workflows,
)
from cordum.sdk.cli._common import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cordum command line.")


@app.callback()
def _global_options(
    ctx: typer.Context,
    target: str = typer.Option(
        DEFAULT_TARGET, "--target", envvar="CORDUM_TARGET", help="The Cordum gRPC address."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="CORDUM_API_KEY", help="Sent as x-api-key.", show_default=False
    ),
) -> None:
    # Read once here and handed down; commands never look at the environment themselves.
    ctx.obj = Settings(target=target, api_key=api_key)


app.command()(stack.up)
app.command()(stack.down)
app.command()(stack.status)
app.command()(events.events)
app.add_typer(jobs.app, name="job")
app.add_typer(approvals.app, name="approval")
app.add_typer(workflows.app, name="workflow")
app.add_typer(runs.app, name="run")
app.add_typer(config.app, name="config")
app.add_typer(policy.app, name="policy")
app.add_typer(schemas.app, name="schema")
app.add_typer(locks.app, name="lock")
app.add_typer(artifacts.app, name="artifact")
app.add_typer(dlq.app, name="dlq")
app.add_typer(memory.app, name="memory")
app.add_typer(context.app, name="context")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
