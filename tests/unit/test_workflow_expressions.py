"""CEL expressions and `${...}` templates of workflow steps."""

from __future__ import annotations

import pytest

from cordum.server.workflows.expressions import (
    ExpressionError,
    Scope,
    compile_expression,
    compile_template,
    template_split_for_tests,
    text,
)


def render(value: object, **scope: object) -> object:
    template, problems = compile_template(value, {"input", "steps", "ctx", "item", "index"})
    assert problems == []
    return template.render(Scope(scope))


def test_a_whole_template_yields_the_typed_value() -> None:
    scope = {"input": {"n": 3, "obj": {"a": [1, 2]}, "flag": True, "none": None}}
    assert render("${input.n}", **scope) == 3
    assert render("${input.obj}", **scope) == {"a": [1, 2]}
    assert render("${input.flag}", **scope) is True
    assert render("${input.none}", **scope) is None
    assert render({"x": ["${input.n + 1}"]}, **scope) == {"x": [4]}


def test_interpolation_renders_json_text_without_go_quirks() -> None:
    scope = {"input": {"name": "core", "big": 1000000, "f": 0.5, "tiny": 0.00001, "l": [1, "a"]}}
    assert render("hello ${input.name}", **scope) == "hello core"
    assert render("n=${input.big} f=${input.f} t=${input.tiny}", **scope) == (
        "n=1000000 f=0.5 t=0.00001"
    )
    assert render("${input.l} ${null} ${true}", **scope) == '[1,"a"] null true'
    assert render("${1234567.0}x", **scope) == "1234567x"
    assert text({"k": 1.5}) == '{"k":1.5}'


def test_escapes_and_braces_inside_expressions() -> None:
    assert render("$${not} ${'}'}", input={}) == "${not} }"
    assert render("${ {'k': 'v}'}.k }", input={}) == "v}"
    assert template_split_for_tests("a${x}b$${y}") == ["a", "${x}", "b${y}"]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("${input.name", "unterminated"),
        ("${}", "empty template expression"),
        ("${input.(}", "Syntax error"),
        ("${item}", "unknown variable(s) item"),
        ("${nope.x}", "unknown variable(s) nope"),
    ],
)
def test_template_problems_are_reported_with_their_path(template: str, problem: str) -> None:
    _, problems = compile_template({"a": {"b": template}})
    assert len(problems) == 1
    path, description = problems[0]
    assert path == "a.b"
    assert problem in description


def test_evaluation_errors_name_the_expression() -> None:
    template, _ = compile_template({"x": "${input.missing}"})
    with pytest.raises(ExpressionError, match=r"x: \$\{input.missing\}: no such key: missing"):
        template.render(Scope({"input": {}}))


def test_whole_numbers_are_ints_so_index_arithmetic_works() -> None:
    expr = compile_expression("input.items[index + 1] * 2", {"input", "index"})
    assert expr.evaluate(Scope({"input": {"items": [1, 5]}, "index": 0})) == 10
    assert compile_expression("has(input.x) ? input.x : 0").evaluate(Scope({"input": {}})) == 0


def test_step_references_are_extracted_for_validation() -> None:
    expr = compile_expression('steps.a.output == steps["b-c"].status && "steps.zz" != ""')
    assert expr.step_refs == frozenset({"a", "b-c"})
    assert compile_expression("steps.exists(k, k == 'a')").step_refs is None
    assert compile_expression("input.x").step_refs == frozenset()


def test_scope_values_are_computed_lazily() -> None:
    calls = []

    def steps() -> dict[str, object]:
        calls.append(1)
        return {"a": {"output": 1}}

    scope = Scope({"input": {"x": 1}, "steps": steps})
    compile_expression("input.x").evaluate(scope)
    assert calls == []
    assert compile_expression("steps.a.output").evaluate(scope) == 1
    compile_expression("steps.a.output").evaluate(scope)
    assert calls == [1]


def test_results_that_are_not_json_are_converted_or_refused() -> None:
    scope = Scope({})
    assert compile_expression('timestamp("2030-01-01T00:00:00Z")').evaluate(scope) == (
        "2030-01-01T00:00:00Z"
    )
    assert compile_expression('duration("1.5s")').evaluate(scope) == "1.5s"
    with pytest.raises(ExpressionError):
        compile_expression("1.0/0.0").evaluate(scope)
