"""`cordumctl run start | get | list | cancel | rerun | delete | timeline | approve | reject |
watch`: workflow runs, with a live view of their steps."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import typer
from google.protobuf import timestamp_pb2
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cordum.sdk import AsyncClient, CordumError
from cordum.sdk.cli._common import (
    JSON,
    Failure,
    clock,
    details,
    duration,
    err,
    json_object_arg,
    labels_text,
    out,
    parse_labels,
    print_json,
    print_json_line,
    proto_dict,
    run,
    when,
)
from cordum.sdk.convert import (
    from_value,
    is_run_terminal,
    optional_value,
    run_status_name,
    step_status_name,
)
from cordum.v1 import run_pb2, workflow_pb2

app = typer.Typer(no_args_is_help=True, help="Start workflow runs and follow them.")

RUN_ID = typer.Argument(..., help="The run id.")
STYLES = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "TIMED_OUT": "red",
    "CANCELLED": "yellow",
    "WAITING": "magenta",
    "RUNNING": "cyan",
    "PENDING": "white",
    "SKIPPED": "dim",
}
# A for_each parent shows at most this many children; the rest are summed up in one row.
MAX_CHILDREN = 10


def _status(name: str) -> Text:
    return Text(name, style=STYLES.get(name, "cyan"))


def _ms(stamp: timestamp_pb2.Timestamp) -> int:
    return int(stamp.ToMilliseconds()) if stamp.seconds or stamp.nanos else 0


# -- the steps view ---------------------------------------------------------------------------


def step_order(run: run_pb2.Run, workflow: workflow_pb2.Workflow | None) -> list[str]:
    """Top-level step ids in the definition's topological order (ties by id); without the
    definition, in the order they started, then the rest by id."""
    top = [sid for sid in run.steps if "[" not in sid]
    if workflow is not None and set(top) <= set(workflow.steps):
        pending = {sid: set(workflow.steps[sid].depends_on) & set(top) for sid in top}
        order: list[str] = []
        while pending:
            ready = sorted(sid for sid, deps in pending.items() if not deps)
            if not ready:  # a cycle cannot be saved, but never loop on one
                order.extend(sorted(pending))
                break
            for sid in ready:
                order.append(sid)
                del pending[sid]
            for deps in pending.values():
                deps.difference_update(ready)
        return order
    never = 2**63
    return sorted(top, key=lambda s: (_ms(run.steps[s].started_at) or never, s))


def _detail(sr: run_pb2.StepRun) -> str:
    error = sr.error.message if sr.HasField("error") else ""
    name = step_status_name(sr.status)
    if name == "WAITING":
        return "awaiting approval"
    if name == "RUNNING" and _ms(sr.next_attempt_at):  # a delay step
        return f"until {clock(sr.next_attempt_at)}"
    if name == "PENDING" and _ms(sr.next_attempt_at):  # a retry is due
        return f"retry at {clock(sr.next_attempt_at)}" + (f" after: {error}" if error else "")
    return error


def _row(
    table: Table, label: str, sr: run_pb2.StepRun, now_ms: int, live: bool, detail: str = ""
) -> None:
    started, ended = _ms(sr.started_at), _ms(sr.completed_at)
    took = ""
    if started and (ended or live):
        took = duration(max(0, (ended or now_ms) - started) / 1000)
    table.add_row(
        label,
        _status(step_status_name(sr.status)),
        str(sr.attempts) if sr.attempts else "",
        sr.job_id,
        clock(sr.started_at),
        took,
        detail or _detail(sr),
    )


def _progress(run: run_pb2.Run, sr: run_pb2.StepRun) -> str:
    """`3/5 done` for a for_each parent still going ('' otherwise)."""
    if not sr.children or step_status_name(sr.status) not in ("RUNNING", "PENDING"):
        return ""
    children = [run.steps[c] for c in sr.children if c in run.steps]
    done = sum(1 for c in children if c.status == run_pb2.STEP_STATUS_SUCCEEDED)
    return f"{done}/{len(sr.children)} done"


def _settled_or_idle(sr: run_pb2.StepRun) -> bool:
    # Succeeded, or pending with nothing scheduled: the children a long list can sum up.
    if sr.status == run_pb2.STEP_STATUS_SUCCEEDED:
        return True
    return sr.status == run_pb2.STEP_STATUS_PENDING and not _ms(sr.next_attempt_at)


def _children(run: run_pb2.Run, ids: Iterable[str]) -> tuple[list[str], Counter[str]]:
    """The children to show, and a count by status of those left out: all of them when
    there are few, else those running, waiting, retrying or failed (at most MAX_CHILDREN)."""
    present = [c for c in ids if c in run.steps]
    if len(present) <= MAX_CHILDREN:
        return present, Counter()
    shown = [c for c in present if not _settled_or_idle(run.steps[c])][:MAX_CHILDREN]
    rest = Counter(step_status_name(run.steps[c].status) for c in present if c not in shown)
    return shown, rest


def steps_view(
    run: run_pb2.Run, workflow: workflow_pb2.Workflow | None = None, *, now_ms: int | None = None
) -> Group:
    """A heading (run, workflow, status) over a table of the run's steps."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    live = not is_run_terminal(run.status)
    heading = Text(f"run {run.id}  workflow {run.workflow_id}  ").append_text(
        _status(run_status_name(run.status))
    )
    if run.dry_run:
        heading.append("  (dry run)", style="dim")
    started = _ms(run.started_at) or _ms(run.created_at)
    if started:
        heading.append(f"  {duration(max(0, (_ms(run.completed_at) or now) - started) / 1000)}")
    table = Table("step", "status", "attempts", "job", "started", "took", "detail")
    for sid in step_order(run, workflow):
        sr = run.steps[sid]
        _row(table, sid, sr, now, live, _progress(run, sr))
        shown, rest = _children(run, sr.children)
        for child in shown:
            _row(table, f"  {child}", run.steps[child], now, live)
        if rest:
            summary = ", ".join(f"{n} {s}" for s, n in sorted(rest.items()))
            more = Text(f"  … {sum(rest.values())} more", style="dim")
            table.add_row(more, "", "", "", "", "", Text(summary, style="dim"))
    parts: list[Any] = [heading, table]
    if run.HasField("error") and run.error.message:
        parts.append(Text(f"error: {_run_error(run)}", style="red"))
    return Group(*parts)


def _run_error(run: run_pb2.Run) -> str:
    message, step = run.error.message, run.error.step_id
    # The engine's messages usually name the step already ("step x failed: ...").
    return message if not step or f"step {step}" in message else f"step {step}: {message}"


async def _definition(client: AsyncClient, workflow_id: str) -> workflow_pb2.Workflow | None:
    # Only for the step order; a deleted workflow's runs are still shown.
    try:
        return await client.workflows.get(workflow_id)
    except CordumError:
        return None


class _Latest:
    """The run as of the last event; the Live thread renders it (durations keep ticking)."""

    def __init__(self, run: run_pb2.Run, workflow: workflow_pb2.Workflow | None) -> None:
        self.run = run
        self.workflow = workflow

    def render(self) -> Group:
        return steps_view(self.run, self.workflow)


async def follow(
    client: AsyncClient,
    run_id: str,
    *,
    console: Console,
    timeout: float | None,  # noqa: ASYNC109 (gRPC deadline)
) -> run_pb2.Run:
    """Show the steps of a run live on `console`, refreshed from WatchRun until the run is
    terminal; returns the run as it ended. On a console that is not a terminal only the
    final view is printed."""
    first = await client.runs.get(run_id)  # a wrong id fails here, before any drawing
    latest = _Latest(first, await _definition(client, first.workflow_id))
    with Live(
        console=console,
        get_renderable=latest.render,
        refresh_per_second=4,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        async for update in client.runs.watch(run_id, timeout=timeout):
            latest.run = update.run
            live.refresh()
        if not is_run_terminal(latest.run.status):
            # The stream ended with the run terminal, but the run that came with its last
            # event can be older than the event (a run that ended while its history was
            # being replayed): show the run as it is now.
            latest.run = await client.runs.get(run_id)
            live.refresh()
    if not console.is_terminal:
        # Off a terminal Live prints the final view once, without ending its last line.
        console.line()
    return latest.run


def _ended_badly(ended: run_pb2.Run) -> Failure:
    status = run_status_name(ended.status)
    detail = f": {_run_error(ended)}" if ended.HasField("error") and ended.error.message else ""
    return Failure(f"run {ended.id} ended {status}{detail}")


async def _started(
    client: AsyncClient,
    reply: Any,
    *,
    wait: bool,
    timeout: float,  # noqa: ASYNC109
    as_json: bool,
) -> None:
    """What `run start` and `run rerun` print: the run id, or with --wait the live view on
    stderr and the run's output (or the whole run with --json) on stdout."""
    if not wait:
        print_json(proto_dict(reply)) if as_json else typer.echo(reply.run_id)
        return
    ended = await follow(client, reply.run_id, console=err, timeout=timeout)
    if as_json:
        print_json(proto_dict(ended))
    elif ended.status == run_pb2.RUN_STATUS_SUCCEEDED:
        print_json(optional_value(ended, "output"))
    if ended.status != run_pb2.RUN_STATUS_SUCCEEDED:
        raise _ended_badly(ended)


WAIT = typer.Option(False, "--wait", help="Show the steps live until the run ends.")
TIMEOUT = typer.Option(300.0, "--timeout", help="With --wait: seconds to wait.")


# -- commands ---------------------------------------------------------------------------------


@app.command()
def start(
    ctx: typer.Context,
    workflow_id: str = typer.Argument(..., help="The workflow to run."),
    input_: str | None = typer.Option(
        None, "--input", help="The run input, a JSON object: inline, @file or @- (stdin)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve and record every step; dispatch nothing."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Starting again with the same key returns the first run."
    ),
    label: list[str] = typer.Option([], "--label", help="key=value; repeatable."),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Start a run and print its id.

    With --wait, show its steps live (on stderr) until it ends and print its output; the
    exit code is then 1 unless it succeeded.
    """

    async def command(client: AsyncClient) -> None:
        run_input = json_object_arg("--input", input_) if input_ is not None else None
        labels = parse_labels(label) or None
        reply = await client.runs.start(
            workflow_id,
            input=run_input,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            labels=labels,
        )
        await _started(client, reply, wait=wait, timeout=timeout, as_json=as_json)

    run(ctx, command)


@app.command()
def watch(
    ctx: typer.Context,
    run_id: str = RUN_ID,
    timeout: float | None = typer.Option(None, "--timeout", help="Give up after S seconds."),
    as_json: bool = typer.Option(
        False, "--json", help="One protojson WatchRunResponse (event + run) per line."
    ),
) -> None:
    """Show a run's steps live (status, attempts, job, timing) until the run ends."""

    async def command(client: AsyncClient) -> None:
        if as_json:
            async for update in client.runs.watch(run_id, timeout=timeout):
                print_json_line(proto_dict(update))
            return
        await follow(client, run_id, console=out, timeout=timeout)

    run(ctx, command)


@app.command()
def get(ctx: typer.Context, run_id: str = RUN_ID, as_json: bool = JSON) -> None:
    """Show a run and its steps."""

    async def command(client: AsyncClient) -> None:
        found = await client.runs.get(run_id)
        if as_json:
            print_json(proto_dict(found))
            return
        rows = [
            ("tenant", found.tenant_id),
            ("triggered by", found.triggered_by),
            ("created", when(found.created_at)),
            ("completed", when(found.completed_at)),
            ("rerun of", f"{found.rerun_of} {found.rerun_step}".strip()),
            ("idempotency key", found.idempotency_key),
            ("labels", labels_text(found.labels)),
        ]
        definition = await _definition(client, found.workflow_id)
        out.print(steps_view(found, definition))
        out.print(details(rows))

    run(ctx, command)


@app.command("list")
def list_(
    ctx: typer.Context,
    workflow_id: str | None = typer.Option(None, "--workflow", help="Only this workflow's runs."),
    status: str | None = typer.Option(None, "--status", help="e.g. running, WAITING, FAILED"),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many runs."),
    as_json: bool = JSON,
) -> None:
    """List runs, most recently updated first."""

    async def command(client: AsyncClient) -> None:
        runs = [
            r async for r in client.runs.list(workflow_id=workflow_id, status=status, limit=limit)
        ]
        if as_json:
            print_json([proto_dict(r) for r in runs])
            return
        table = Table("id", "workflow", "status", "steps", "created", "updated")
        for item in runs:
            top = [s for s in item.steps if "[" not in s]
            done = sum(1 for s in top if item.steps[s].status == run_pb2.STEP_STATUS_SUCCEEDED)
            table.add_row(
                item.id,
                item.workflow_id,
                _status(run_status_name(item.status)),
                f"{done}/{len(top)}",
                when(item.created_at),
                when(item.updated_at),
            )
        out.print(table)

    run(ctx, command)


@app.command()
def cancel(
    ctx: typer.Context,
    run_id: str = RUN_ID,
    reason: str = typer.Option("", "--reason", help="Recorded with the cancellation."),
    as_json: bool = JSON,
) -> None:
    """Cancel a run: its jobs in flight are cancelled, unfinished steps marked CANCELLED."""

    async def command(client: AsyncClient) -> None:
        ended = await client.runs.cancel(run_id, reason=reason)
        if as_json:
            print_json(proto_dict(ended))
        else:
            out.print(
                Text(f"run {ended.id} ").append_text(_status(run_status_name(ended.status))),
                soft_wrap=True,
            )

    run(ctx, command)


@app.command()
def rerun(
    ctx: typer.Context,
    run_id: str = RUN_ID,
    from_step: str | None = typer.Option(
        None, "--from-step", help="Rerun this step and what follows it (default: everything)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve and record; dispatch nothing."),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Start a new run from a step of an earlier one and print its id.

    Steps that are not downstream of --from-step keep their outputs; the rest run again.
    """

    async def command(client: AsyncClient) -> None:
        reply = await client.runs.rerun(run_id, from_step=from_step, dry_run=dry_run)
        await _started(client, reply, wait=wait, timeout=timeout, as_json=as_json)

    run(ctx, command)


@app.command()
def delete(ctx: typer.Context, run_id: str = RUN_ID) -> None:
    """Delete a run and its timeline (a live run is cancelled first)."""

    async def command(client: AsyncClient) -> None:
        await client.runs.delete(run_id)
        out.print(f"run {run_id} deleted")

    run(ctx, command)


def _event_data(data: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in data.items() if not isinstance(v, dict | list))


@app.command()
def timeline(ctx: typer.Context, run_id: str = RUN_ID, as_json: bool = JSON) -> None:
    """Every event of a run, oldest first."""

    async def command(client: AsyncClient) -> None:
        events = [e async for e in client.runs.timeline(run_id)]
        if as_json:
            print_json([proto_dict(e) for e in events])
            return
        table = Table("seq", "time", "event", "step", "status", "message")
        for event in events:
            status = event.status.removeprefix("RUN_STATUS_").removeprefix("STEP_STATUS_")
            message = event.message
            if not message and event.HasField("data"):
                message = _event_data({k: from_value(v) for k, v in event.data.fields.items()})
            table.add_row(
                str(event.seq),
                clock(event.time),
                event.type,
                event.step_id,
                _status(status) if status else "",
                message,
            )
        out.print(table)

    run(ctx, command)


def _decided(run_id: str, step_id: str, verb: str, after: run_pb2.Run) -> Text:
    return Text(f"step {step_id} of run {run_id} {verb}; run now ").append_text(
        _status(run_status_name(after.status))
    )


@app.command()
def approve(
    ctx: typer.Context,
    run_id: str = RUN_ID,
    step_id: str = typer.Argument(..., help="The approval step."),
    reason: str = typer.Option("", "--reason", help="Why it may go on."),
    as_json: bool = JSON,
) -> None:
    """Approve a waiting approval step; the run resumes at once."""

    async def command(client: AsyncClient) -> None:
        after = await client.runs.approve_step(run_id, step_id, reason=reason)
        if as_json:
            print_json(proto_dict(after))
        else:
            out.print(_decided(run_id, step_id, "approved", after), soft_wrap=True)

    run(ctx, command)


@app.command()
def reject(
    ctx: typer.Context,
    run_id: str = RUN_ID,
    step_id: str = typer.Argument(..., help="The approval step."),
    reason: str = typer.Option("", "--reason", help="Why it may not go on."),
    as_json: bool = JSON,
) -> None:
    """Reject a waiting approval step: the step fails.

    The run fails with it, unless the step has an on_error handler.
    """

    async def command(client: AsyncClient) -> None:
        after = await client.runs.reject_step(run_id, step_id, reason=reason)
        if as_json:
            print_json(proto_dict(after))
        else:
            out.print(_decided(run_id, step_id, "rejected", after), soft_wrap=True)

    run(ctx, command)
