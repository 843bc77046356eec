"""The steps view of `cordumctl run watch | get | start --wait`: step order, long for_each
lists summed up, and what the detail column says."""

from __future__ import annotations

from rich.console import Console

from cordum.sdk.cli.runs import step_order, steps_view
from cordum.sdk.workflows import parse_workflow
from cordum.v1 import run_pb2 as R

NOW = 1_800_000_000_000

WORKFLOW = parse_workflow(
    {
        "id": "wf",
        "steps": {
            "z_first": {"type": "notify"},
            "fan": {"topic": "job.x", "for_each": "input.items", "depends_on": ["z_first"]},
            "a_last": {"type": "approval", "depends_on": ["fan"]},
        },
    }
)


def step(sid: str, status: int, *, started: int = 0, **fields: object) -> R.StepRun:
    sr = R.StepRun(step_id=sid, status=status, **fields)  # type: ignore[arg-type]
    if started:
        sr.started_at.FromMilliseconds(started)
    return sr


def a_run(children: int) -> R.Run:
    run = R.Run(id="r1", workflow_id="wf", status=R.RUN_STATUS_RUNNING)
    run.created_at.FromMilliseconds(NOW - 9000)
    run.steps["a_last"].CopyFrom(step("a_last", R.STEP_STATUS_PENDING))
    run.steps["z_first"].CopyFrom(step("z_first", R.STEP_STATUS_SUCCEEDED, started=NOW - 8000))
    fan = step("fan", R.STEP_STATUS_RUNNING, started=NOW - 7000)
    for i in range(children):
        cid = f"fan[{i}]"
        fan.children.append(cid)
        if i < 3:
            child = step(cid, R.STEP_STATUS_SUCCEEDED, started=NOW - 6000, attempts=1)
            child.completed_at.FromMilliseconds(NOW - 5000)
        elif i == 3:
            child = step(cid, R.STEP_STATUS_PENDING, attempts=1)
            child.next_attempt_at.FromMilliseconds(NOW + 2000)
            child.error.message = "handler failed: flaky"
        elif i == 4:
            child = step(cid, R.STEP_STATUS_RUNNING, started=NOW - 1500, attempts=1)
            child.job_id = f"r1:{cid}@1"
        else:
            child = step(cid, R.STEP_STATUS_PENDING)
        run.steps[cid].CopyFrom(child)
    run.steps["fan"].CopyFrom(fan)
    return run


def render(run: R.Run, workflow: object = WORKFLOW) -> list[str]:
    console = Console(width=200, record=True, color_system=None)
    console.print(steps_view(run, workflow, now_ms=NOW))  # type: ignore[arg-type]
    return [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]


def test_steps_follow_the_definition_else_their_start_times() -> None:
    run = a_run(2)
    assert step_order(run, WORKFLOW) == ["z_first", "fan", "a_last"]
    assert step_order(run, None) == ["z_first", "fan", "a_last"]  # by start, unstarted last
    other = parse_workflow({"id": "wf", "steps": {"x": {"type": "notify"}}})
    assert step_order(run, other) == ["z_first", "fan", "a_last"]  # a changed definition


def test_few_children_are_all_shown_under_their_parent() -> None:
    lines = render(a_run(5))
    rows = [line for line in lines if line.startswith(("z_first", "fan", "a_last"))]
    assert [r.split()[0] for r in rows] == [
        "z_first",
        "fan",
        *(f"fan[{i}]" for i in range(5)),
        "a_last",
    ]
    assert lines[0] == "run r1 workflow wf RUNNING 9.0s"
    fan = next(r for r in rows if r.startswith("fan "))
    assert fan.endswith("3/5 done")
    retry = next(r for r in rows if r.startswith("fan[3]"))
    assert "retry at " in retry and retry.endswith("after: handler failed: flaky")
    running = next(r for r in rows if r.startswith("fan[4]"))
    assert "r1:fan[4]@1" in running and "1.5s" in running


def test_a_long_fan_out_shows_the_busy_children_and_sums_up_the_rest() -> None:
    lines = render(a_run(200))
    shown = [line.split()[0] for line in lines if line.startswith("fan[")]
    assert shown == ["fan[3]", "fan[4]"]
    summary = next(line for line in lines if line.startswith("… "))
    assert summary == "… 198 more 195 PENDING, 3 SUCCEEDED"


def test_a_failed_run_shows_its_error_once() -> None:
    run = a_run(1)
    run.status = R.RUN_STATUS_FAILED
    run.completed_at.FromMilliseconds(NOW - 1000)
    run.error.CopyFrom(R.RunError(step_id="fan", message="step fan failed: boom"))
    lines = render(run)
    assert lines[0] == "run r1 workflow wf FAILED 8.0s"
    assert lines[-1] == "error: step fan failed: boom"
