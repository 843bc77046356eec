"""Merge rules and defaults of the config service (pure logic, no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cordum.server.errors import CordumError
from cordum.server.jsonvalue import canonical_json, normalize
from cordum.server.services.config_service import deep_merge, read_defaults


def test_objects_merge_key_by_key_at_every_depth() -> None:
    base = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    over = {"a": {"b": {"d": 20, "x": 9}}}
    assert deep_merge(base, over) == {"a": {"b": {"c": 1, "d": 20, "x": 9}, "e": 3}, "f": 4}
    assert base == {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}  # inputs untouched


@pytest.mark.parametrize(
    ("base", "over", "merged"),
    [
        ({"l": [1, 2]}, {"l": [3]}, {"l": [3]}),  # arrays replace, never concatenate
        ({"l": [1, 2]}, {"l": []}, {"l": []}),
        ({"s": "a"}, {"s": "b"}, {"s": "b"}),
        ({"s": {"deep": 1}}, {"s": "flat"}, {"s": "flat"}),  # a scalar replaces an object
        ({"s": "flat"}, {"s": {"deep": 1}}, {"s": {"deep": 1}}),
        ({"s": 1}, {"s": None}, {"s": None}),  # null is a value, not a deletion
        ({"keep": 1}, {}, {"keep": 1}),
    ],
)
def test_arrays_and_scalars_replace(base: dict, over: dict, merged: dict) -> None:  # type: ignore[type-arg]
    assert deep_merge(base, over) == merged


def test_canonical_json_is_sorted_compact_and_number_stable() -> None:
    assert (
        canonical_json({"b": 1.0, "a": [2.0, 2.5], "c": "é"})
        == '{"a":[2,2.5],"b":1,"c":"é"}'.encode()
    )
    assert normalize({"x": [1.0, {"y": 3.0}]}) == {"x": [1, {"y": 3}]}


def test_defaults_come_from_the_three_files(tmp_path: Path) -> None:
    (tmp_path / "system.yaml").write_text("safety: {denied_topics: [a]}\nflag: yes\n")
    (tmp_path / "pools.yaml").write_text("topics: {job.a: p}\npools: {p: {requires: []}}\n")
    (tmp_path / "safety.yaml").write_text("rules: []\n")  # the policy: not config
    defaults = read_defaults(tmp_path)
    assert defaults.data == {
        "safety": {"denied_topics": ["a"]},
        "flag": "yes",  # YAML 1.2: `yes` is a string
        "pools": {"topics": {"job.a": "p"}, "pools": {"p": {"requires": []}}},
    }
    assert [Path(f).name for f in defaults.files] == ["system.yaml", "pools.yaml"]
    again = read_defaults(tmp_path)
    assert again.sha256 == defaults.sha256
    (tmp_path / "timeouts.yaml").write_text("topics: {}\n")
    assert read_defaults(tmp_path).sha256 != defaults.sha256


def test_no_files_means_no_defaults(tmp_path: Path) -> None:
    defaults = read_defaults(tmp_path)
    assert (defaults.data, defaults.files, defaults.sha256) == ({}, [], "")


def test_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "system.yaml").write_text("- a list\n")
    (tmp_path / "timeouts.yaml").write_text("reconciler: {scan_interval_seconds: -1}\n")
    with pytest.raises(CordumError) as info:
        read_defaults(tmp_path)
    fields = {v.field for v in info.value.violations}
    assert fields == {"system.yaml", "timeouts.yaml.reconciler.scan_interval_seconds"}

    (tmp_path / "system.yaml").write_text("pools: {}\n")
    (tmp_path / "timeouts.yaml").unlink()
    (tmp_path / "pools.yaml").write_text("topics: {}\n")
    with pytest.raises(CordumError) as clash:
        read_defaults(tmp_path)
    assert {v.field for v in clash.value.violations} == {"system.yaml.pools"}
