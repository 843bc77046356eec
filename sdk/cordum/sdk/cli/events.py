"""`cordumctl events`: follow live bus events (EventService.StreamEvents)."""

from __future__ import annotations

import typer
from rich.text import Text

from cordum.sdk import AsyncClient
from cordum.sdk.cli._common import Failure, clock, out, print_json_line, proto_dict, run
from cordum.sdk.convert import state_name
from cordum.v1 import event_pb2

_KIND_STYLE = {
    "stream_start": "dim",
    "stream_end": "red",
    "job_state": "cyan",
    "job_result": "green",
    "run_event": "magenta",
    "alert": "yellow",
}


def _summary(event: event_pb2.Event) -> str:
    """What happened, in a few words: the state or timeline entry, then the message."""
    if event.HasField("job_event"):
        parts = [state_name(event.job_event.state), event.job_event.message]
    elif event.HasField("run_event"):
        entry = event.run_event
        parts = [entry.type, entry.step_id, entry.status, entry.message]
    else:
        parts = [event.message]
    return "  ".join(part for part in parts if part)


def _line(event: event_pb2.Event) -> Text:
    line = Text(f"{clock(event.received_at) or '--:--:--'}  ")
    line.append(f"{event.kind:<12}", style=_KIND_STYLE.get(event.kind, "blue"))
    for part in (event.job_id or event.run_id, event.topic):
        if part:
            line.append(f"  {part}", style="bold")
    summary = _summary(event)
    if summary:
        line.append(f"  {summary}")
    return line


def events(
    ctx: typer.Context,
    kind: list[str] = typer.Option(
        [], "--kind", help="Only this kind (job_state, job_result, run_event...); repeatable."
    ),
    topic: str | None = typer.Option(None, "--topic", help="Only jobs whose topic matches."),
    job_id: str | None = typer.Option(None, "--job", help="Only events about this job."),
    run_id: str | None = typer.Option(None, "--run", help="Only events about this run."),
    count: int | None = typer.Option(
        None, "--count", min=1, help="Stop after N events (stream_start not counted)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One protojson Event per line."),
) -> None:
    """Print live events, one line each, until Ctrl-C (or --count events)."""

    async def command(client: AsyncClient) -> None:
        seen = 0
        stream = client.events.stream(kinds=kind, topic=topic, job_id=job_id, run_id=run_id)
        async for event in stream:
            if as_json:
                print_json_line(proto_dict(event))
            else:
                out.print(_line(event), soft_wrap=True, highlight=False)
            if event.kind == "stream_end":
                # The server closed the stream (too slow a reader, shutting down).
                raise Failure(f"stream ended: {event.message or 'closed by the server'}")
            if event.kind != "stream_start":
                seen += 1
                if count is not None and seen >= count:
                    # Closing the generator ends the stream on the server too.
                    await stream.aclose()
                    return

    run(ctx, command)
