"""The kernel's hooks for policy administration: `on_check` sees every check (cache hits
included) and can never break one; extra sources can be swapped and are re-read on reload."""

from __future__ import annotations

from pathlib import Path

from cordum.agent.v1 import safety_pb2
from cordum.server.safety.kernel import SafetyKernel

D = safety_pb2


def req(topic: str, job_id: str = "j") -> safety_pb2.PolicyCheckRequest:
    return D.PolicyCheckRequest(job_id=job_id, topic=topic, tenant="default")


async def test_on_check_sees_every_decision_and_cannot_break_a_check(tmp_path: Path) -> None:
    path = tmp_path / "safety.yaml"
    path.write_text("rules:\n  - {id: d, match: {topics: [job.d]}, decision: deny}\n")
    seen: list[tuple[str, int]] = []
    kernel = SafetyKernel(
        path, on_check=lambda q, r: seen.append((q.job_id, r.decision)), watch_interval_s=0
    )
    await kernel.start()
    kernel.check(req("job.d", "1"))
    kernel.check(req("job.d", "2"))  # a decision-cache hit is still reported
    kernel.evaluate(req("job.d", "3"))  # evaluate/simulate are not checks
    assert seen == [("1", D.DECISION_TYPE_DENY), ("2", D.DECISION_TYPE_DENY)]

    def broken(q: safety_pb2.PolicyCheckRequest, r: safety_pb2.PolicyCheckResponse) -> None:
        raise RuntimeError("recorder bug")

    kernel.on_check = broken
    assert kernel.check(req("job.d")).decision == D.DECISION_TYPE_DENY


async def test_extra_sources_can_be_attached_after_start(tmp_path: Path) -> None:
    path = tmp_path / "safety.yaml"
    path.write_text("rules: []\n")
    kernel = SafetyKernel(path, watch_interval_s=0)
    await kernel.start()
    base = kernel.snapshot
    bundles = [("secops/x", "rules:\n  - {id: x, decision: deny}\n")]

    async def sources() -> list[tuple[str, str]]:
        return list(bundles)

    kernel.extra_sources = sources
    assert await kernel.reload()
    assert kernel.snapshot.startswith(base + "|cfg:")
    assert kernel.check(req("job.a")).rule_id == "x"
    assert await kernel.check_for_changes() is False  # nothing changed: no reload
    bundles.clear()
    assert await kernel.check_for_changes() is True
    assert kernel.snapshot == base
