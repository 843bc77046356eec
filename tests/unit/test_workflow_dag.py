"""The scheduling pass as a pure function: joins, skips, retries, fail-fast, on_error,
for_each, timeouts and dry runs, without Redis or NATS."""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf import json_format

from cordum.server.workflows import dag
from cordum.server.workflows.dag import JobOutcome
from cordum.server.workflows.definition import CompiledWorkflow, compile_workflow
from cordum.v1 import run_pb2

from support.workflows import run_status, status, value, workflow

R = run_pb2


class Sim:
    """A run driven by hand: passes at chosen times, job outcomes fed in."""

    def __init__(
        self, steps: dict[str, Any], run_input: dict[str, Any] | None = None, **wf: Any
    ) -> None:
        compiled, problems = compile_workflow(workflow({"id": "wf", "steps": steps, **wf}))
        assert problems == []
        self.wf: CompiledWorkflow = compiled
        self.run = R.Run(id=str(uuid.uuid4()), workflow_id="wf", status=R.RUN_STATUS_PENDING)
        json_format.ParseDict(run_input or {}, self.run.input)
        self.now = 1_000_000
        self.plans: list[dag.Plan] = []
        self.rand = 0.5

    def step(self, outcomes: list[JobOutcome] | None = None, *, at: int | None = None) -> dag.Plan:
        if at is not None:
            self.now = at
        plan = dag.advance(self.run, self.wf, self.now, outcomes or [], rand=lambda: self.rand)
        self.plans.append(plan)
        return plan

    def job(self, key: str) -> str:
        return self.run.steps[key].job_id

    def ok(self, key: str, output: Any = None) -> dag.Plan:
        return self.step([JobOutcome(self.job(key), "SUCCEEDED", output=output)])

    def fail(self, key: str, state: str = "FAILED", message: str = "boom") -> dag.Plan:
        return self.step([JobOutcome(self.job(key), state, error_message=message)])

    def events(self) -> list[tuple[str, str]]:
        return [(e.type, e.step_id) for p in self.plans for e in p.events]


JOB = {"topic": "job.x"}


def test_independent_steps_go_out_in_one_pass_and_the_join_waits_for_both() -> None:
    sim = Sim({"a": JOB, "b": JOB, "c": {**JOB, "depends_on": ["a", "b"]}})
    plan = sim.step()
    assert sorted(d.key for d in plan.dispatches) == ["a", "b"]
    assert sim.ok("a", 1).dispatches == []
    plan = sim.ok("b", 2)
    assert [d.key for d in plan.dispatches] == ["c"]
    sim.ok("c", 3)
    assert run_status(sim.run) == "SUCCEEDED"
    assert value(sim.run.output) == {"c": 3}


def test_a_false_condition_skips_exactly_the_branch_it_alone_feeds() -> None:
    sim = Sim(
        {
            "check": {"type": "condition", "condition": "input.n > 10"},
            "big": {**JOB, "depends_on": ["check"]},
            "after_big": {**JOB, "depends_on": ["big"]},
            "other": JOB,
            "join": {**JOB, "depends_on": ["big", "other"]},
        },
        {"n": 3},
    )
    plan = sim.step()
    assert [d.key for d in plan.dispatches] == ["other"]
    for key in ("check", "big", "after_big"):
        assert status(sim.run, key) == "SKIPPED", key
    assert value(sim.run.steps["check"].output) is False
    plan = sim.ok("other", "o")
    # A join fed by a skipped and a succeeded branch runs.
    assert [d.key for d in plan.dispatches] == ["join"]
    sim.ok("join")
    assert run_status(sim.run) == "SUCCEEDED"
    assert ("step_skipped", "after_big") in sim.events()


def test_retries_back_off_and_a_denied_job_is_never_retried() -> None:
    sim = Sim(
        {
            "a": {
                **JOB,
                "retry": {
                    "max_retries": 2,
                    "initial_backoff_sec": 2,
                    "multiplier": 3,
                    "jitter": 0.1,
                },
            }
        }
    )
    sim.step()
    sim.rand = 1.0
    plan = sim.fail("a")
    assert plan.wake_ms == sim.now + 2200
    assert status(sim.run, "a") == "PENDING"
    assert sim.step(at=sim.now + 2199).dispatches == []
    assert [d.job_id for d in sim.step(at=sim.now + 1).dispatches] == [f"{sim.run.id}:a@2"]
    sim.rand = 0.0
    plan = sim.fail("a", "TIMEOUT")
    assert plan.wake_ms == sim.now + 5400  # 2 * 3, minus 10% jitter
    sim.step(at=plan.wake_ms)
    sim.fail("a", "TIMEOUT")
    assert status(sim.run, "a") == "TIMED_OUT"
    assert run_status(sim.run) == "TIMED_OUT"

    denied = Sim({"a": {**JOB, "retry": {"max_retries": 5}}})
    denied.step()
    denied.fail("a", "DENIED", "denied by policy")
    assert status(denied.run, "a") == "FAILED"
    assert run_status(denied.run) == "FAILED"
    assert denied.run.error.code == "DENIED"


def test_fail_fast_cancels_the_jobs_in_flight_and_the_rest() -> None:
    sim = Sim({"a": JOB, "b": JOB, "c": {**JOB, "depends_on": ["a"]}})
    sim.step()
    plan = sim.fail("a")
    assert run_status(sim.run) == "FAILED"
    assert plan.cancels == [(sim.job("b"), "step a failed: boom")]
    assert status(sim.run, "b") == "CANCELLED"
    assert status(sim.run, "c") == "CANCELLED"
    assert sim.run.error.step_id == "a"


def test_on_error_runs_the_handler_and_the_run_continues_from_it() -> None:
    sim = Sim(
        {
            "risky": {**JOB, "on_error": "cleanup"},
            "after_risky": {**JOB, "depends_on": ["risky"]},
            "cleanup": {**JOB, "input": {"why": "${steps.risky.error}"}},
            "after_cleanup": {**JOB, "depends_on": ["cleanup"]},
        }
    )
    sim.step()
    plan = sim.fail("risky", message="disk full")
    assert [d.key for d in plan.dispatches] == ["cleanup"]
    assert plan.dispatches[0].payload == {"why": "disk full"}
    assert status(sim.run, "after_risky") == "SKIPPED"
    assert [d.key for d in sim.ok("cleanup").dispatches] == ["after_cleanup"]
    sim.ok("after_cleanup", "done")
    assert run_status(sim.run) == "SUCCEEDED"

    fine = Sim({"risky": {**JOB, "on_error": "cleanup"}, "cleanup": JOB})
    fine.step()
    fine.ok("risky")
    assert status(fine.run, "cleanup") == "SKIPPED"
    assert run_status(fine.run) == "SUCCEEDED"


def test_for_each_respects_max_parallel_and_gathers_outputs_in_order() -> None:
    sim = Sim(
        {
            "fan": {
                **JOB,
                "for_each": "input.items",
                "max_parallel": 2,
                "input": {"x": "${item}", "i": "${index}"},
                "output_path": "out.all",
            }
        },
        {"items": ["a", "b", "c", "d"]},
    )
    plan = sim.step()
    assert [d.payload for d in plan.dispatches] == [{"x": "a", "i": 0}, {"x": "b", "i": 1}]
    # Finishing out of order still fills the next slot and keeps item order in the output.
    assert [d.key for d in sim.ok("fan[1]", "B").dispatches] == ["fan[2]"]
    assert [d.key for d in sim.ok("fan[2]", "C").dispatches] == ["fan[3]"]
    sim.ok("fan[3]", "D")
    sim.ok("fan[0]", "A")
    assert status(sim.run, "fan") == "SUCCEEDED"
    assert value(sim.run.steps["fan"].output) == ["A", "B", "C", "D"]
    assert dag.context_view(sim.run)["out"] == {"all": ["A", "B", "C", "D"]}


def test_a_failing_child_fails_its_parent_with_the_same_status() -> None:
    sim = Sim({"fan": {**JOB, "for_each": "input.items"}}, {"items": [1, 2, 3]})
    sim.step()
    plan = sim.fail("fan[1]", "TIMEOUT")
    assert status(sim.run, "fan") == "TIMED_OUT"
    assert run_status(sim.run) == "TIMED_OUT"
    assert sorted(j for j, _ in plan.cancels) == [sim.job("fan[0]"), sim.job("fan[2]")]


def test_expression_errors_fail_the_step_instead_of_hanging() -> None:
    sim = Sim({"a": {**JOB, "condition": "input.missing == 1"}})
    sim.step()
    assert status(sim.run, "a") == "FAILED"
    assert "no such key: missing" in sim.run.steps["a"].error.message
    assert run_status(sim.run) == "FAILED"

    fan = Sim({"fan": {**JOB, "for_each": "input.obj"}}, {"obj": {"a": 1}})
    fan.step()
    assert "must return a list, got map" in fan.run.steps["fan"].error.message


def test_the_run_timeout_ends_the_run_timed_out() -> None:
    sim = Sim({"a": JOB}, timeout_sec=5)
    plan = sim.step()
    assert plan.wake_ms == sim.now + 5000
    plan = sim.step(at=sim.now + 5000)
    assert run_status(sim.run) == "TIMED_OUT"
    assert plan.cancels and status(sim.run, "a") == "CANCELLED"


def test_delays_and_approval_timeouts_are_timers() -> None:
    sim = Sim(
        {"d": {"type": "delay", "delay_sec": 3}, "ap": {"type": "approval", "timeout_sec": 10}}
    )
    plan = sim.step()
    assert plan.wake_ms == sim.now + 3000
    assert run_status(sim.run) == "WAITING"
    sim.step(at=sim.now + 3000)
    assert status(sim.run, "d") == "SUCCEEDED"
    sim.step(at=sim.now + 7000)
    assert status(sim.run, "ap") == "TIMED_OUT"
    assert run_status(sim.run) == "TIMED_OUT"


def test_a_dry_run_records_every_step_without_dispatching() -> None:
    sim = Sim(
        {
            "a": {**JOB, "input": {"n": "${input.n}"}},
            "b": {**JOB, "depends_on": ["a"], "input": {"v": "${steps.a.output.x}"}},
            "fan": {**JOB, "for_each": "input.items", "input": {"x": "${item}"}},
            "wait": {"type": "approval", "depends_on": ["b"]},
            "d": {"type": "delay", "delay_sec": 60},
            "note": {"type": "notify", "input": {"message": "hi"}},
        },
        {"n": 1, "items": [1, 2]},
    )
    sim.run.dry_run = True
    plan = sim.step()
    assert plan.dispatches == [] and plan.alerts == [] and plan.cancels == []
    assert run_status(sim.run) == "SUCCEEDED"
    assert value(sim.run.steps["a"].input) == {"n": 1}
    assert "${steps.a.output.x}" in sim.run.steps["b"].error.message  # recorded, not fatal
    assert value(sim.run.steps["fan[1]"].input) == {"x": 2}
    assert ("step_dry_run", "a") in sim.events()


def test_stale_and_duplicate_outcomes_are_ignored() -> None:
    sim = Sim({"a": {**JOB, "retry": {"max_retries": 1, "initial_backoff_sec": 1}}})
    sim.step()
    first = sim.job("a")
    sim.fail("a")
    sim.step(at=sim.now + 1100)
    # A late success of attempt 1 does not complete attempt 2.
    plan = sim.step([JobOutcome(first, "SUCCEEDED", output=1)])
    assert plan.events == [] and status(sim.run, "a") == "RUNNING"
    sim.ok("a", 2)
    assert sim.step([JobOutcome(sim.job("a"), "FAILED")]).events == []
    assert run_status(sim.run) == "SUCCEEDED"


SUB = {"type": "subworkflow", "workflow_id": "other", "input": {"v": "${input.v}"}}


def test_a_subworkflow_attempt_names_a_derived_child_run_and_takes_its_outcome() -> None:
    sim = Sim(
        {"sub": {**SUB, "retry": {"max_retries": 1}}, "after": {**JOB, "depends_on": ["sub"]}},
        {"v": 3},
    )
    plan = sim.step()
    first = dag.child_run_id(sim.run.id, "sub", 1)
    assert [(c.key, c.run_id, c.payload) for c in plan.children] == [("sub", first, {"v": 3})]
    assert first == dag.child_run_id(sim.run.id, "sub", 1) != dag.child_run_id(sim.run.id, "sub", 2)
    assert sim.run.steps["sub"].child_run_id == first and not plan.dispatches
    failed = JobOutcome("", "FAILED", error_message="child failed")
    sim.plans.append(
        dag.advance(sim.run, sim.wf, sim.now, children=[dag.ChildOutcome("sub", first, failed)])
    )
    assert status(sim.run, "sub") == "PENDING"  # retry backoff
    plan = sim.step(at=sim.now + 60_000)
    second = dag.child_run_id(sim.run.id, "sub", 2)
    assert [c.run_id for c in plan.children] == [second]
    # The first child's late outcome is stale: ignored.
    stale = dag.ChildOutcome("sub", first, JobOutcome("", "SUCCEEDED", output={"x": 1}))
    dag.advance(sim.run, sim.wf, sim.now, children=[stale])
    assert status(sim.run, "sub") == "RUNNING"
    done = dag.ChildOutcome("sub", second, JobOutcome("", "SUCCEEDED", output={"x": 2}))
    plan = dag.advance(sim.run, sim.wf, sim.now, children=[done])
    assert value(sim.run.steps["sub"].output) == {"x": 2}
    assert [d.key for d in plan.dispatches] == ["after"]


def test_ending_a_run_cancels_its_running_children_and_depth_is_bounded() -> None:
    sim = Sim({"sub": SUB, "other": JOB}, {"v": 1})
    sim.step()
    child = sim.run.steps["sub"].child_run_id
    plan = dag.cancel(sim.run, sim.wf, sim.now, "stop")
    assert plan.child_cancels == [(child, "stop")]
    deep = Sim({"sub": SUB}, {"v": 1})
    deep.run.depth = dag.MAX_DEPTH
    plan = deep.step()
    assert not plan.children and run_status(deep.run) == "FAILED"
    assert deep.run.steps["sub"].error.code == "DEPTH_EXCEEDED"


def test_a_subworkflow_step_timeout_cancels_the_child_and_times_the_attempt_out() -> None:
    sim = Sim({"sub": {**SUB, "timeout_sec": 5}}, {"v": 1})
    plan = sim.step()
    child = sim.run.steps["sub"].child_run_id
    assert plan.wake_ms == sim.now + 5000
    plan = sim.step(at=sim.now + 5000)
    assert plan.child_cancels[0][0] == child
    assert status(sim.run, "sub") == "TIMED_OUT" and run_status(sim.run) == "TIMED_OUT"
