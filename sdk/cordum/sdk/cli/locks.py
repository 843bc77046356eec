"""`cordumctl lock acquire | release | renew | get | list`: distributed locks."""

from __future__ import annotations

import getpass
import socket

import typer
from rich.table import Table

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import JSON, out, print_json, proto_dict, run, when
from cordum.v1 import lock_pb2

app = typer.Typer(no_args_is_help=True, help="Take, renew and release distributed locks.")

RESOURCE = typer.Argument(..., help="The lock's name, e.g. reports/daily.")


def default_owner() -> str:
    # The same in every command run by this user on this host, so `lock release` after
    # `lock acquire` needs no flag.
    return f"{getpass.getuser()}@{socket.gethostname()}"


OWNER = typer.Option(
    None,
    "--owner",
    envvar="CORDUM_LOCK_OWNER",
    help="Who holds it (default: user@host).",
    show_default=False,
)
TTL = typer.Option(None, "--ttl-ms", help="How long the hold lasts unless renewed (30000).")


def _owners(lock: lock_pb2.Lock) -> str:
    return ", ".join(
        name if count == 1 else f"{name} ({count} holds)"
        for name, count in sorted(lock.owners.items())
    )


def _summary(lock: lock_pb2.Lock) -> str:
    token = f", fencing token {lock.fencing_token}" if lock.fencing_token else ""
    return f"({lock.mode}{token}, expires {when(lock.expires_at)})"


def _show(lock: lock_pb2.Lock) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in (
        ("resource", lock.resource),
        ("mode", lock.mode),
        ("owners", _owners(lock)),
        ("fencing token", str(lock.fencing_token)),
        ("updated", when(lock.updated_at)),
        ("expires", when(lock.expires_at)),
    ):
        table.add_row(name, value)
    out.print(table)


@app.command()
def acquire(
    ctx: typer.Context,
    resource: str = RESOURCE,
    owner: str | None = OWNER,
    shared: bool = typer.Option(False, "--shared", help="A shared hold (default exclusive)."),
    ttl_ms: int | None = TTL,
    wait_ms: int | None = typer.Option(
        None, "--wait-ms", help="Wait up to this long for a held lock instead of failing."
    ),
    as_json: bool = JSON,
) -> None:
    """Take a hold on a lock; held by someone else: exit 1 (LOCK_HELD)."""

    async def command(client: AsyncClient) -> None:
        who = owner or default_owner()
        lock = await client.locks.acquire(
            resource,
            who,
            mode="shared" if shared else "exclusive",
            ttl_ms=ttl_ms,
            wait_ms=wait_ms,
        )
        if as_json:
            print_json(proto_dict(lock))
        else:
            out.print(f"lock {lock.resource} acquired by {who} {_summary(lock)}", soft_wrap=True)

    run(ctx, command)


@app.command()
def release(
    ctx: typer.Context, resource: str = RESOURCE, owner: str | None = OWNER, as_json: bool = JSON
) -> None:
    """Drop one hold of the owner's."""

    async def command(client: AsyncClient) -> None:
        who = owner or default_owner()
        reply = await client.locks.release(resource, who)
        if as_json:
            print_json(proto_dict(reply) | {"released": reply.released})
        elif reply.HasField("lock"):
            out.print(f"lock {resource} released by {who}; held by {_owners(reply.lock)}")
        else:
            out.print(f"lock {resource} released")

    run(ctx, command)


@app.command()
def renew(
    ctx: typer.Context,
    resource: str = RESOURCE,
    owner: str | None = OWNER,
    ttl_ms: int | None = TTL,
    as_json: bool = JSON,
) -> None:
    """Extend the owner's hold to now + the TTL."""

    async def command(client: AsyncClient) -> None:
        lock = await client.locks.renew(resource, owner or default_owner(), ttl_ms=ttl_ms)
        if as_json:
            print_json(proto_dict(lock))
        else:
            out.print(f"lock {lock.resource} renewed {_summary(lock)}", soft_wrap=True)

    run(ctx, command)


@app.command()
def get(ctx: typer.Context, resource: str = RESOURCE, as_json: bool = JSON) -> None:
    """Show a lock: its mode, owners, fencing token and expiry."""

    async def command(client: AsyncClient) -> None:
        lock = await client.locks.get(resource)
        print_json(proto_dict(lock)) if as_json else _show(lock)

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    prefix: str | None = typer.Option(None, "--prefix", help="Only resources starting so."),
    limit: int = typer.Option(100, "--limit", min=1),
    as_json: bool = JSON,
) -> None:
    """List held locks, in resource order."""

    async def command(client: AsyncClient) -> None:
        locks = [lock async for lock in client.locks.list(prefix=prefix, limit=limit)]
        if as_json:
            print_json([proto_dict(lock) for lock in locks])
            return
        table = Table("resource", "mode", "owners", "token", "expires")
        for lock in locks:
            table.add_row(
                lock.resource,
                lock.mode,
                _owners(lock),
                str(lock.fencing_token or ""),
                when(lock.expires_at),
            )
        out.print(table)

    run(ctx, command)
