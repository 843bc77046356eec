"""The chaos suite's verdicts (tests/chaos/harness.py): what counts as lost, stuck,
completed twice and re-run, from a job's event log and the workers' execution records."""

from __future__ import annotations

import json
from pathlib import Path

from chaos.harness import Outcome, classify_job, completions, executions, mid_job


def log(*entries: str) -> list[str]:
    return [f"{1000 + i}|{entry}" for i, entry in enumerate(entries)]


def test_a_late_result_or_a_retry_is_not_a_second_completion() -> None:
    assert completions(log("PENDING|submitted", "DISPATCHED|x", "SUCCEEDED|succeeded on w1")) == 1
    late = log(
        "PENDING|submitted",
        "DISPATCHED|x",
        "SUCCEEDED|succeeded on w2",
        "SUCCEEDED|ignored late result SUCCEEDED from w1",
    )
    assert completions(late) == 1
    retried = log("PENDING|submitted", "PENDING|attempt 1 FAILED: boom", "SUCCEEDED|ok")
    assert completions(retried) == 1
    assert completions(log("PENDING|s", "SUCCEEDED|ok", "FAILED|FAILED: again")) == 2


def verdict(exists: bool, state: str, events: list[str], runs: int) -> Outcome:
    out = Outcome(accepted=1)
    classify_job(out, "j1", exists, state, events, runs)
    return out


def test_each_job_gets_one_verdict_and_reruns_are_counted_apart() -> None:
    assert verdict(False, "", [], 0).lost == 1
    assert verdict(True, "DISPATCHED", log("PENDING|s", "DISPATCHED|x"), 0).stuck == 1
    assert verdict(True, "TIMEOUT", log("PENDING|s", "TIMEOUT|deadline"), 0).failed == 1
    ok = verdict(True, "SUCCEEDED", log("PENDING|s", "SUCCEEDED|ok"), 2)
    assert (ok.succeeded, ok.rerun, ok.duplicated, ok.ok) == (1, 1, 0, True)
    twice = verdict(True, "SUCCEEDED", log("SUCCEEDED|ok", "SUCCEEDED|again"), 2)
    assert twice.duplicated == 1 and not twice.ok
    # A success no worker ever ran is as wrong as a second one.
    assert verdict(True, "SUCCEEDED", log("PENDING|s", "SUCCEEDED|ok"), 0).duplicated == 1


def test_execution_records_count_finished_runs_and_show_jobs_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    lines = [
        {"ev": "start", "job": "a", "dispatch": "a@1"},
        {"ev": "done", "job": "a", "dispatch": "a@1"},
        {"ev": "start", "job": "a", "dispatch": "a@2"},
        {"ev": "done", "job": "a", "dispatch": "a@2"},
        {"ev": "start", "job": "b", "dispatch": "b@1"},
        {"ev": "cancelled", "job": "b", "dispatch": "b@1"},
        {"ev": "start", "job": "c", "dispatch": "c@1"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"ev": "sta')
    assert executions([path]) == {"a": 2}
    assert mid_job(path) == {"c@1"}
