"""Workflow definitions are checked as a whole: every problem, as a field violation."""

from __future__ import annotations

from typing import Any

import pytest

from cordum.server.workflows.definition import (
    Backoff,
    compile_workflow,
    validate_workflow,
)

from support.workflows import workflow


def problems(data: dict[str, Any]) -> dict[str, str]:
    _, found = compile_workflow(workflow({"id": "wf", **data}))
    return {p.field: p.description for p in found}


# The upstream example of reference part A.1 (pack YAML, same shape as JSON).
UPSTREAM_EXAMPLE = {
    "id": "hello-pack.echo",
    "org_id": "default",
    "steps": {
        "echo": {
            "type": "worker",
            "topic": "job.hello-pack.echo",
            "input_schema_id": "hello-pack/EchoInput",
            "input": {"message": "${input.message}", "author": "${input.author}"},
            "meta": {"pack_id": "hello-pack", "capability": "hello-pack.echo"},
        }
    },
}


class Schemas:
    def __init__(self, known: dict[str, dict[str, Any]]) -> None:
        self.known = known

    async def get_schema(self, schema_id: str) -> dict[str, Any] | None:
        return self.known.get(schema_id)


async def test_the_upstream_example_definition_loads() -> None:
    schema = {"type": "object", "required": ["message"]}
    compiled, found = await validate_workflow(
        workflow(UPSTREAM_EXAMPLE), Schemas({"hello-pack/EchoInput": schema})
    )
    assert found == []
    assert compiled.order == ["echo"]
    assert compiled.steps["echo"].kind == "job"


async def test_a_missing_registry_schema_is_a_violation() -> None:
    _, found = await validate_workflow(workflow(UPSTREAM_EXAMPLE), Schemas({}))
    assert [(p.field, p.description) for p in found] == [
        ("steps.echo.input_schema_id", "no schema 'hello-pack/EchoInput' is registered")
    ]


def test_every_problem_is_listed_with_its_field() -> None:
    found = problems(
        {
            "timeout_sec": -1,
            "input_schema": {"type": "nope"},
            "steps": {
                "fetch": {"topic": "job.x", "depends_on": ["missing", "fetch"]},
                "bad:id": {"topic": "job.x"},
                "weird": {"type": "teleport"},
                "cond": {"type": "condition"},
                "fan": {"topic": "job.x", "for_each": "input.items +", "max_parallel": -1},
                "tmpl": {"topic": "job.x", "input": {"a": "${item}", "b": "${input.x"}},
                "wait": {"type": "approval", "topic": "job.x"},
                "d": {"type": "delay"},
                "r": {"topic": "job.x", "retry": {"multiplier": 0.5, "jitter": 2}},
                "io": {"topic": "bad topic", "input_schema": {"type": 3}},
            },
        }
    )
    expected = {
        "timeout_sec",
        "input_schema",
        "steps.fetch.depends_on[0]",
        "steps.fetch.depends_on[1]",
        "steps.bad:id",
        "steps.weird.type",
        "steps.cond.condition",
        "steps.fan.for_each",
        "steps.fan.max_parallel",
        "steps.tmpl.input.a",
        "steps.tmpl.input.b",
        "steps.wait.topic",
        "steps.d.delay_sec",
        "steps.r.retry.multiplier",
        "steps.r.retry.jitter",
        "steps.io.topic",
        "steps.io.input_schema",
    }
    assert expected <= set(found), sorted(set(expected) - set(found))
    assert "cannot depend on itself" in found["steps.fetch.depends_on[1]"]
    assert "no step 'missing'" in found["steps.fetch.depends_on[0]"]
    assert "job-id routing" in found["steps.bad:id"]


def test_cycles_are_refused_and_named() -> None:
    found = problems(
        {
            "steps": {
                "a": {"topic": "job.x", "depends_on": ["c"]},
                "b": {"topic": "job.x", "depends_on": ["a"]},
                "c": {"topic": "job.x", "depends_on": ["b"]},
                "d": {"topic": "job.x"},
            }
        }
    )
    assert found == {"steps.a.depends_on": "cycle: a → c → b → a"}


def test_expressions_may_only_read_steps_that_run_before() -> None:
    found = problems(
        {
            "steps": {
                "a": {"topic": "job.x"},
                "b": {"topic": "job.x", "input": {"v": "${steps.a.output}"}},
                "c": {"topic": "job.x", "depends_on": ["a"], "condition": "steps.zz.output"},
            }
        }
    )
    assert "add 'a' to depends_on" in found["steps.b.input"]
    assert "no step 'zz'" in found["steps.c.condition"]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"type": "subworkflow"}, "steps.s.workflow_id"),
        ({"type": "subworkflow", "workflow_id": "x", "topic": "job.x"}, "steps.s.topic"),
        ({"topic": "job.x", "workflow_id": "x"}, "steps.s.workflow_id"),
        ({"type": "notify", "retry": {"max_retries": 1}}, "steps.s.retry"),
        ({"type": "condition", "condition": "true", "input": {"a": 1}}, "steps.s.input"),
        ({"topic": "job.x", "delay_sec": 3}, "steps.s.delay_sec"),
        ({"topic": "job.x", "route_labels": {"run_id": "x"}}, "steps.s.route_labels[run_id]"),
        ({"type": "delay", "delay_until": "tomorrow"}, "steps.s.delay_until"),
        ({"topic": "job.x", "output_path": "steps.x"}, "steps.s.output_path"),
        ({"topic": "job.x", "on_error": "nope"}, "steps.s.on_error"),
    ],
)
def test_fields_a_step_type_would_ignore_are_refused(step: dict[str, Any], field: str) -> None:
    assert field in problems({"steps": {"s": step}})


def test_item_and_index_exist_in_for_each_inputs() -> None:
    found = problems(
        {
            "steps": {
                "fan": {
                    "topic": "job.x",
                    "for_each": "input.items",
                    "input": {"x": "${item}", "i": "${index}"},
                }
            }
        }
    )
    assert found == {}


def test_an_error_handler_counts_as_running_after_the_step_it_handles() -> None:
    compiled, found = compile_workflow(
        workflow(
            {
                "id": "wf",
                "steps": {
                    "risky": {"topic": "job.x", "on_error": "cleanup"},
                    "cleanup": {"topic": "job.x", "input": {"why": "${steps.risky.error}"}},
                },
            }
        )
    )
    assert found == []
    assert compiled.order == ["risky", "cleanup"]
    assert compiled.steps["cleanup"].triggers == ("risky",)


def test_backoff_is_exponential_capped_and_constant_with_multiplier_one() -> None:
    b = Backoff(max_retries=5, initial_s=1, max_s=10, multiplier=2, jitter=0)
    assert [b.base_ms(n) for n in range(1, 7)] == [1000, 2000, 4000, 8000, 10000, 10000]
    constant = Backoff(max_retries=3, initial_s=0.25, multiplier=1, jitter=0)
    assert [constant.delay_ms(n, 0.5) for n in (1, 2, 3)] == [250, 250, 250]
    jittered = Backoff(initial_s=1, jitter=0.1)
    assert jittered.delay_ms(1, 0.0) == 900
    assert jittered.delay_ms(1, 1.0) == 1100
