"""The bounded subset of the fault-injection suite that `make test` runs (`make chaos` runs
every fault): against `cordumctl up --replicas 2`'s stack under a steady load of jobs and
workflow runs, a scheduler replica and a workflow-engine replica are each SIGKILLed and
restarted; no accepted job or run may be lost, completed twice or stuck.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from rich.console import Console

from chaos.harness import QUICK_FAULTS, Options, print_report, run_suite

pytestmark = pytest.mark.slow


def test_killed_replicas_lose_no_job_or_run_and_complete_none_twice(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Plain NATS unless the session runs in JetStream mode (`pytest --jetstream`).
    mode = "jetstream" if request.config.getoption("--jetstream") else "plain"
    options = dataclasses.replace(Options(), mode=mode, faults=QUICK_FAULTS, load_s=6.0)
    results = run_suite(options, tmp_path)
    # Shown with -s (and in the report of a failure): the faults x outcomes table.
    print_report(results, Console(width=160))
    assert [r.fault for r in results] == list(QUICK_FAULTS)
    for r in results:
        # The load reached the stack: most submits were accepted, and the work got done.
        assert r.jobs.accepted >= 0.8 * options.job_rate * options.load_s, r
        assert r.runs.accepted >= 1, r
        assert r.jobs.succeeded > 0 and r.runs.succeeded > 0, r
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(
        f"{r.fault}: jobs {r.jobs}, runs {r.runs}, dead {r.dead_after}" for r in bad
    )
