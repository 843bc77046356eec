"""`cordum-server`: run the roles of the control plane in one process."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

import typer
import uvloop
from pydantic import ValidationError

from cordum.server import logs
from cordum.server.api.auth import StartupRefused
from cordum.server.app import App
from cordum.server.connections import ConnectError
from cordum.server.settings import ALL_ROLES, Settings

logger = logging.getLogger("cordum.server")

cli = typer.Typer(add_completion=False, help="Run Cordum control-plane roles.")


@cli.callback()
def _root() -> None:
    """Cordum control-plane server."""


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings):
        # Everything allocated at start-up lives for the process; keep it out of the
        # collector, and collect young objects less often: a full collection stalls the
        # event loop for ~50 ms at load (measured), straight into tail latency.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        await stop.wait()
        logger.info("shutting down")


@cli.command()
def run(
    roles: str = typer.Option(
        None, help=f"Comma-separated roles ({','.join(ALL_ROLES)}); default all."
    ),
    grpc_port: int = typer.Option(None, help="gRPC port (default 8080, env CORDUM_GRPC_PORT)."),
    metrics_port: int = typer.Option(None, help="Metrics port (default 9090)."),
) -> None:
    overrides = {
        k: v
        for k, v in {"roles": roles, "grpc_port": grpc_port, "metrics_port": metrics_port}.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        typer.echo(f"cordum-server: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    logs.configure(settings.log_level, settings.log_format)
    # grpc.aio's completion-queue poller is a thread of its own: with the default 5 ms switch
    # interval it waits up to 5 ms for the GIL whenever the event loop is busy, and calls
    # queue before they reach a handler (measured: a busy loop cut a bare unary call from
    # ~4k/s to ~190/s). 1 ms lets it in promptly at a small cost in context switches.
    sys.setswitchinterval(0.001)
    try:
        uvloop.run(serve(settings))
    except (ConnectError, StartupRefused) as exc:
        typer.echo(f"cordum-server: {exc}", err=True)
        raise typer.Exit(1) from exc
    except OSError as exc:
        typer.echo(f"cordum-server: {exc}", err=True)
        raise typer.Exit(1) from exc


def main() -> None:
    cli(sys.argv[1:])


if __name__ == "__main__":
    main()
