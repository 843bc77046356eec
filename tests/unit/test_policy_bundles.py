"""Pure helpers of policy administration: ids, content checks, diffs, rule views, pointers."""

from __future__ import annotations

import pytest

from cordum.server.errors import Violations
from cordum.server.services.policy_bundles import (
    build_candidate,
    bundle_id_from_url,
    bundle_source,
    check_bundle_id,
    check_content,
    diff_bundles,
    rule_views,
)
from cordum.server.services.schemas import json_pointer
from cordum.v1 import policy_pb2


def bundle(bundle_id: str, content: str, enabled: bool = True) -> policy_pb2.PolicyBundle:
    return policy_pb2.PolicyBundle(id=bundle_id, content=content, enabled=enabled)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("secops/deny-prod", True),
        ("core", True),
        ("pack.a/overlay_1/v2", True),
        ("", False),
        ("/lead", False),
        ("trail/", False),
        ("a//b", False),
        ("has space", False),
        ("colon:no", False),
        ("x" * 201, False),
    ],
)
def test_bundle_ids(raw: str, ok: bool) -> None:
    problems = Violations()
    check_bundle_id("bundle_id", raw, problems)
    assert (not problems) is ok


def test_url_ids_and_sources() -> None:
    assert bundle_id_from_url("secops~deny-prod") == "secops/deny-prod"
    assert [bundle_source(i) for i in ("secops/a", "pack/a", "core")] == ["secops", "pack", "core"]


def test_content_errors_are_prefixed_with_the_field() -> None:
    problems = Violations()
    check_content("bundles[x]", "rules:\n  - decision: nope\n    extra: 1\n", problems)
    assert {v.field for v in problems.items} == {
        "bundles[x].rules[0].decision",
        "bundles[x].rules[0].extra",
    }


def test_diff_names_changed_bundles_and_flag_flips() -> None:
    a1, a2 = bundle("a", "rules: []\n"), bundle("a", "rules:\n  - id: x\n")
    b_on, b_off = bundle("b", "x: 1\n"), bundle("b", "x: 1\n", enabled=False)
    c = bundle("c", "same: 1")
    text, changed = diff_bundles([a1, b_on, c], [a2, b_off, c, bundle("d", "new: 1")])
    assert changed == ["a", "b", "d"]
    assert "--- a/a\n+++ b/a\n" in text and "-rules: []\n" in text and "+  - id: x\n" in text
    assert "--- a/b\n+++ b/b (disabled)\n" in text
    assert "--- /dev/null\n+++ b/d\n" in text and "+new: 1\n" in text
    assert diff_bundles([c], [c]) == ("", [])


def test_candidate_snapshot_depends_on_enabled_bundles_only() -> None:
    base = ("file:x", "rules: []\n")
    on = build_candidate(base, [bundle("a", "rules: []\n")])
    off = build_candidate(base, [bundle("a", "rules: []\n", enabled=False)])
    none = build_candidate(base, [])
    assert off.snapshot == none.snapshot != on.snapshot
    assert on.snapshot.startswith(none.snapshot + "|cfg:")


def test_rule_views_list_rules_and_legacy_tenant_rules() -> None:
    views, errors = rule_views(
        [
            ("file:base", "tenants:\n  default:\n    deny_topics: ['job.x.*']\n", True),
            ("secops/a", "rules:\n  - id: r\n    match: {topics: [job.a]}\n", False),
            ("secops/broken", "rules: [", True),
        ]
    )
    assert [(v.id, v.bundle_id, v.enabled) for v in views] == [
        ("legacy:default:deny:1", "file:base", True),
        ("r", "secops/a", False),
    ]
    assert [e.bundle_id for e in errors] == ["secops/broken"]


def test_json_pointers_escape_like_rfc_6901() -> None:
    assert json_pointer([]) == ""
    assert json_pointer(["items", 0, "name"]) == "/items/0/name"
    assert json_pointer(["a/b", "c~d"]) == "/a~1b/c~0d"
