"""What every API command shares: the global options, one way to run a command against the
server, error lines, and output helpers (data to stdout, everything else to stderr)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient, CordumError, Unavailable

out = Console()
err = Console(stderr=True)

JSON = typer.Option(False, "--json", help="Print protojson (proto field names).")


@dataclass(frozen=True)
class Settings:
    """The global options, read once by the app callback and handed down in ``ctx.obj``."""

    target: str
    api_key: str | None


class Failure(Exception):
    """A problem found by the CLI itself (bad flag value, job ended badly): one line, exit 1."""


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_object(Settings)
    # Commands are always reached through the app callback, which stores the settings.
    assert obj is not None, "the cordumctl callback did not run"
    return obj


def error_line(message: str) -> None:
    line = Text("cordumctl: ", style="red")
    line.append(message)
    # soft_wrap: one logical line, whatever the terminal width.
    err.print(line, soft_wrap=True)


def violation_lines(violations: Mapping[str, str] | list[tuple[str, str]]) -> None:
    """One indented ``field: description`` line per problem, under an error line."""
    items = violations.items() if isinstance(violations, Mapping) else violations
    for name, description in items:
        err.print(Text(f"  {name or '(document)'}: {description}"), soft_wrap=True)


def report(error: CordumError, target: str) -> None:
    if isinstance(error, Unavailable) and error.connection_failed:
        first = error.message.splitlines()[0] if error.message else "unavailable"
        error_line(f"cannot reach Cordum at {target}: {first}")
        return
    error_line(f"{error.reason or error.code.name}: {error.message}")
    violation_lines(error.field_violations)


def run(ctx: typer.Context, command: Callable[[AsyncClient], Coroutine[Any, Any, None]]) -> None:
    """Run ``command`` with a client for the global target; turn failures into one line
    on stderr and exit code 1 (typer has no async commands, hence ``asyncio.run``)."""
    conf = settings(ctx)

    async def main() -> None:
        async with AsyncClient(conf.target, api_key=conf.api_key) as client:
            await command(client)

    try:
        asyncio.run(main())
    except CordumError as error:
        report(error, conf.target)
        raise typer.Exit(1) from None
    except Failure as failure:
        error_line(str(failure))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def proto_dict(message: Message) -> dict[str, Any]:
    """protojson, with the proto's own (snake_case) field names as the REST API uses."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(data: Any) -> None:
    # Plain text, not rich: no wrapping or colour codes in output meant for other programs.
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def print_json_line(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False), nl=True)


def details(rows: Iterable[tuple[str, str | Text]]) -> Table:
    """A two-column "name value" table of one thing, leaving out the empty values."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def labels_text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    moment = stamp.ToDatetime(tzinfo=datetime.UTC).astimezone()
    return moment.isoformat(timespec="milliseconds")


def parse_json_arg(option: str, raw: str) -> Any:
    """A JSON flag value: inline JSON, ``@path`` for a file, or ``@-`` for stdin."""
    text = raw
    if raw.startswith("@"):
        path = raw[1:]
        try:
            text = typer.get_text_stream("stdin").read() if path == "-" else _read(path)
        except OSError as exc:
            raise Failure(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Failure(f"{option}: not valid JSON ({exc})") from exc


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def read_text(option: str, path: str) -> str:
    """A file's text (``-`` for stdin), or a one-line Failure naming the option."""
    try:
        return typer.get_text_stream("stdin").read() if path == "-" else _read(path)
    except OSError as exc:
        raise Failure(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc


def read_document(option: str, path: str) -> Any:
    """A JSON or YAML document from a file (``-``: stdin). ``.json`` files are read as JSON,
    anything else as YAML (which accepts JSON too)."""
    text = read_text(option, path)
    try:
        if Path(path).suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if Path(path).suffix.lower() == ".json" else "YAML"
        raise Failure(
            f"{option}: {path} is not valid {kind} ({' '.join(str(exc).split())})"
        ) from exc


def json_object_arg(option: str, raw: str) -> dict[str, Any]:
    """A flag value that must be a JSON object (inline, ``@file`` or ``@-``)."""
    value = parse_json_arg(option, raw)
    if not isinstance(value, dict):
        raise Failure(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def duration(seconds: float) -> str:
    """``0.4s``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def clock(stamp: timestamp_pb2.Timestamp) -> str:
    """A timestamp as local ``HH:MM:SS`` ('' when unset)."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime(tzinfo=datetime.UTC).astimezone().strftime("%H:%M:%S")


def parse_labels(values: list[str], option: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Failure(f"{option}: expected key=value, got {item!r}")
        labels[key] = value
    return labels
