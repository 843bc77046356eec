"""SafetyKernel: decision cache, loading, hot reload, snapshot history, in-process client."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from cordum.agent.v1 import safety_pb2
from cordum.server.errors import CordumError
from cordum.server.safety.client import KernelUnavailable, LocalSafetyClient
from cordum.server.safety.kernel import SafetyKernel, cache_key
from cordum.server.safety.model import build_policy_set
from cordum.v1 import error_reason_pb2

D = safety_pb2
SHIPPED_POLICY = Path(__file__).resolve().parents[2] / "config" / "safety.yaml"

POLICY = """\
version: v1
rules:
  - id: approve-deploys
    match: {topics: ["job.deploy.*"]}
    decision: require_approval
    reason: deploys need a human
  - id: deny-x
    match: {topics: ["job.x"]}
    decision: deny
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def req(topic: str = "job.a", job_id: str = "job-1", **kw: object) -> safety_pb2.PolicyCheckRequest:
    return safety_pb2.PolicyCheckRequest(job_id=job_id, topic=topic, **kw)  # type: ignore[arg-type]


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Stamp an exact, ever-increasing mtime: coarse filesystem clocks could otherwise give two
    # quick same-size writes one stat signature.
    stamp = time.time_ns()
    os.utime(path, ns=(stamp, stamp))


def remove(path: Path) -> None:
    path.unlink()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "safety.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def kernel(policy_file: Path, clock: FakeClock) -> AsyncIterator[SafetyKernel]:
    k = SafetyKernel(policy_file, cache_ttl_s=5.0, clock=clock, watch_interval_s=0)
    await k.start()
    yield k
    await k.stop()


# -- cache -----------------------------------------------------------------------------------


async def test_cache_hit_and_miss(kernel: SafetyKernel) -> None:
    cache = kernel.cache
    assert cache is not None
    first = kernel.check(req("job.x"))
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    second = kernel.check(req("job.x", job_id="job-2"))
    assert (cache.hits, cache.misses) == (1, 1)
    assert second == first
    kernel.check(req("job.y"))
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)


async def test_cache_entries_expire_after_the_ttl(kernel: SafetyKernel, clock: FakeClock) -> None:
    cache = kernel.cache
    assert cache is not None
    kernel.check(req("job.x"))
    clock.now += 4.9
    kernel.check(req("job.x"))
    assert cache.hits == 1
    clock.now += 0.2  # 5.1 s after the entry was written
    kernel.check(req("job.x"))
    assert (cache.hits, cache.misses) == (1, 2)


async def test_cache_hit_rewrites_approval_ref_to_the_current_job(kernel: SafetyKernel) -> None:
    first = kernel.check(req("job.deploy.web", job_id="job-a"))
    assert first.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert first.approval_ref == "job-a"
    second = kernel.check(req("job.deploy.web", job_id="job-b"))
    assert kernel.cache is not None and kernel.cache.hits == 1
    assert second.approval_ref == "job-b"
    assert second.approval_required
    assert second.policy_snapshot == kernel.snapshot
    # The cached copy itself is not tied to any job.
    assert first.approval_ref == "job-a"


async def test_cache_is_bounded_lru(policy_file: Path, clock: FakeClock) -> None:
    k = SafetyKernel(policy_file, cache_size=3, clock=clock, watch_interval_s=0)
    await k.start()
    for i in range(5):
        k.check(req(f"job.t{i}"))
    assert k.cache is not None and len(k.cache) == 3
    k.check(req("job.t2"))  # still cached, becomes most recent
    assert k.cache.hits == 1
    k.check(req("job.t0"))  # evicted earlier
    assert k.cache.hits == 1


async def test_cache_key_ignores_job_id_unless_cel_reads_it(tmp_path: Path) -> None:
    r1, r2 = req(job_id="a"), req(job_id="b")
    assert cache_key("s", r1) == cache_key("s", r2)
    assert cache_key("s", r1, keep_job_id=True) != cache_key("s", r2, keep_job_id=True)
    assert r1.job_id == "a"  # the caller's request is not modified
    with_content = req(job_id="a", input_content=b"x" * 10)
    assert cache_key("s", with_content) == cache_key("s", r1)
    assert with_content.input_content == b"x" * 10
    path = tmp_path / "cel.yaml"
    path.write_text('rules:\n  - {id: one, match: {cel: job_id == "a"}, decision: deny}\n')
    k = SafetyKernel(path, watch_interval_s=0)
    await k.start()
    assert k.check(r1).decision == D.DECISION_TYPE_DENY
    assert k.check(r2).decision == D.DECISION_TYPE_ALLOW


async def test_topic_rejections_are_not_cached(kernel: SafetyKernel) -> None:
    assert kernel.check(req("")).reason == "missing topic"
    assert kernel.cache is not None and len(kernel.cache) == 0


async def test_cache_disabled(policy_file: Path) -> None:
    k = SafetyKernel(policy_file, cache_ttl_s=0, watch_interval_s=0)
    await k.start()
    assert k.cache is None
    assert k.check(req("job.x")).decision == D.DECISION_TYPE_DENY


async def test_evaluate_explain_simulate_bypass_the_cache(kernel: SafetyKernel) -> None:
    kernel.evaluate(req("job.x"))
    kernel.explain(req("job.x"))
    kernel.simulate(req("job.x"))
    assert kernel.cache is not None and len(kernel.cache) == 0
    ev = kernel.explain(req("job.x"))
    assert ev.response.rule_id == "deny-x"
    assert [t.rule_id for t in ev.rules] == ["approve-deploys", "deny-x"]


async def test_simulate_against_a_candidate_policy(kernel: SafetyKernel) -> None:
    candidate = build_policy_set(("draft", "rules:\n  - {id: all, decision: deny}\n"))
    resp = kernel.simulate(req("job.a"), candidate)
    assert (resp.decision, resp.rule_id) == (D.DECISION_TYPE_DENY, "all")
    assert resp.policy_snapshot == candidate.snapshot
    assert kernel.simulate(req("job.a")).decision == D.DECISION_TYPE_ALLOW


# -- loading and reload ----------------------------------------------------------------------


async def test_start_fails_on_an_invalid_policy_naming_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - id: a\n    decision: maybe\n    match: {topic: job.a}\n")
    k = SafetyKernel(path, watch_interval_s=0)
    with pytest.raises(CordumError) as caught:
        await k.start()
    assert caught.value.reason == error_reason_pb2.ERROR_REASON_POLICY_INVALID
    assert {v.field for v in caught.value.violations} == {
        "rules[0].decision",
        "rules[0].match.topic",
    }
    assert str(path) in str(caught.value)


async def test_start_fails_when_the_policy_file_is_missing(tmp_path: Path) -> None:
    k = SafetyKernel(tmp_path / "nope.yaml", watch_interval_s=0)
    with pytest.raises(CordumError) as caught:
        await k.start()
    assert caught.value.violations[0].field == "policy_path"
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_not_loaded_kernel_is_unavailable_not_a_verdict(policy_file: Path) -> None:
    k = SafetyKernel(policy_file, watch_interval_s=0)
    with pytest.raises(CordumError) as caught:
        k.check(req())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(KernelUnavailable):
        await LocalSafetyClient(k).check(req())


async def test_local_client_returns_the_kernel_decision(kernel: SafetyKernel) -> None:
    resp = await LocalSafetyClient(kernel).check(req("job.x"))
    assert resp.decision == D.DECISION_TYPE_DENY


async def test_reload_installs_only_a_changed_snapshot(
    kernel: SafetyKernel, policy_file: Path
) -> None:
    before = kernel.snapshot
    assert before.startswith("v1:")
    assert await kernel.reload() is False
    assert kernel.snapshots() == [before]
    write(policy_file, POLICY.replace("deny-x", "deny-x2"))
    assert await kernel.reload() is True
    assert kernel.snapshot != before
    assert kernel.snapshots() == [kernel.snapshot, before]
    assert kernel.check(req("job.x")).rule_id == "deny-x2"


async def test_reload_drops_the_decision_cache(kernel: SafetyKernel, policy_file: Path) -> None:
    kernel.check(req("job.x"))
    write(policy_file, POLICY + "  - {id: extra, decision: allow}\n")
    assert await kernel.reload()
    assert kernel.cache is not None and len(kernel.cache) == 0


async def test_bad_reload_keeps_the_last_good_policy(
    kernel: SafetyKernel, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = kernel.snapshot
    write(policy_file, "rules:\n  - decision: nope\n")
    assert await kernel.reload() is False
    assert kernel.snapshot == good
    assert kernel.check(req("job.x")).rule_id == "deny-x"
    assert "rules[0].decision" in caplog.text
    remove(policy_file)
    assert await kernel.reload() is False
    assert kernel.snapshot == good


async def test_hot_reload_via_the_watcher_poll(kernel: SafetyKernel, policy_file: Path) -> None:
    assert await kernel.check_for_changes() is False  # nothing changed
    write(policy_file, POLICY.replace("version: v1", "version: v2"))
    assert await kernel.check_for_changes() is True
    assert kernel.snapshot.startswith("v2:")
    # A broken edit is seen once, logged, and not retried until the content changes again.
    write(policy_file, "rules: 5\n")
    assert await kernel.check_for_changes() is False
    assert kernel.snapshot.startswith("v2:")
    write(policy_file, POLICY.replace("version: v1", "version: v3"))
    assert await kernel.check_for_changes() is True
    assert kernel.snapshot.startswith("v3:")


async def test_watcher_skips_parsing_when_only_the_mtime_changed(
    kernel: SafetyKernel, policy_file: Path
) -> None:
    write(policy_file, POLICY)  # same bytes, new mtime
    assert await kernel.check_for_changes() is False
    assert len(kernel.snapshots()) == 1


async def test_watcher_full_check_catches_same_stat_edits(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    k = SafetyKernel(path, watch_interval_s=0, full_check_every=2)
    await k.start()
    st = path.stat()
    same_size = POLICY.replace("deny-x", "deny-y")
    path.write_text(same_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # identical stat signature
    assert await k.check_for_changes() is False  # poll 1: stat unchanged, trusted
    assert await k.check_for_changes() is True  # poll 2: full check reads the content
    assert k.check(req("job.x")).rule_id == "deny-y"


async def test_running_watcher_hot_reloads(policy_file: Path) -> None:
    k = SafetyKernel(policy_file, watch_interval_s=0.01)
    await k.start()
    try:
        write(policy_file, POLICY.replace("version: v1", "version: hot"))
        await eventually(lambda: k.snapshot.startswith("hot:"))
        assert k.check(req("job.x")).decision == D.DECISION_TYPE_DENY
    finally:
        await k.stop()


async def test_stop_is_idempotent(kernel: SafetyKernel) -> None:
    await kernel.stop()
    await kernel.stop()


async def test_snapshot_history_is_bounded_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: r0\n")
    k = SafetyKernel(path, watch_interval_s=0)
    await k.start()
    for i in range(1, 13):
        write(path, f"version: r{i}\n")
        assert await k.reload()
    history = k.snapshots()
    assert len(history) == 10
    assert [s.split(":")[0] for s in history] == [f"r{i}" for i in range(12, 2, -1)]
    assert history[0] == k.snapshot


# -- extra sources ---------------------------------------------------------------------------


def sources(
    holder: dict[str, list[tuple[str, str]] | Exception],
) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    async def extra() -> list[tuple[str, str]]:
        value = holder["value"]
        if isinstance(value, Exception):
            raise value
        return value

    return extra


async def test_extra_sources_are_merged_after_the_file(policy_file: Path) -> None:
    holder: dict[str, list[tuple[str, str]] | Exception] = {
        "value": [("secops/a", "rules:\n  - {id: bundle-deny, decision: deny}\n")]
    }
    k = SafetyKernel(policy_file, extra_sources=sources(holder), watch_interval_s=0)
    await k.start()
    assert "|cfg:" in k.snapshot
    assert k.check(req("job.x")).rule_id == "deny-x"  # file rules first
    assert k.check(req("job.other")).rule_id == "bundle-deny"
    holder["value"] = []
    assert await k.check_for_changes() is True
    assert k.check(req("job.other")).decision == D.DECISION_TYPE_ALLOW
    holder["value"] = RuntimeError("config service down")
    assert await k.check_for_changes() is False  # logged, last good kept
    assert k.check(req("job.x")).rule_id == "deny-x"


async def test_kernel_without_a_file_uses_extra_sources_only() -> None:
    holder: dict[str, list[tuple[str, str]] | Exception] = {"value": []}
    k = SafetyKernel(None, extra_sources=sources(holder), watch_interval_s=0)
    await k.start()
    assert k.snapshot == ""
    assert k.snapshots() == []
    assert k.check(req("job.a")).decision == D.DECISION_TYPE_ALLOW
    holder["value"] = [("b", "rules:\n  - {decision: deny}\n")]
    assert await k.reload()
    assert k.snapshot.startswith("cfg:")
    assert k.check(req("job.a")).decision == D.DECISION_TYPE_DENY


async def test_the_shipped_config_loads() -> None:
    k = SafetyKernel(SHIPPED_POLICY, watch_interval_s=0)
    await k.start()
    assert k.check(req("job.anything")).decision == D.DECISION_TYPE_ALLOW
    assert k.check(req("sys.anything")).decision == D.DECISION_TYPE_DENY
