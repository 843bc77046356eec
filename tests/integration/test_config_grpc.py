"""ConfigService over native gRPC: scopes, merge rules, revision compare-and-set, effective
config version and hash, and bad input (named fields, nothing written)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from google.protobuf import struct_pb2

from cordum.server.app import App
from cordum.v1 import config_service_pb2, config_service_pb2_grpc

from support.admin import error_reason, field_violations, keys_with

C = config_service_pb2


def stub(channel: grpc.aio.Channel) -> config_service_pb2_grpc.ConfigServiceStub:
    return config_service_pb2_grpc.ConfigServiceStub(channel)


def struct(data: dict[str, object]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def plain(message: struct_pb2.Struct) -> dict[str, object]:
    from cordum.server.jsonvalue import from_struct

    return from_struct(message)


def canonical_hash(data: object) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


async def test_set_get_and_the_revision_really_increments(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    first = await config.SetConfig(
        C.SetConfigRequest(scope="org", scope_id=f"org-{prefix}", data=struct({"a": 1}))
    )
    assert (first.scope, first.scope_id, first.revision) == ("org", f"org-{prefix}", 1)
    assert first.HasField("updated_at")
    second = await config.SetConfig(
        C.SetConfigRequest(
            scope="org", scope_id=f"org-{prefix}", data=struct({"a": 2}), meta={"why": "test"}
        )
    )
    assert second.revision == 2  # upstream stored revision 1 on every write
    got = await config.GetConfig(C.GetConfigRequest(scope="org", scope_id=f"org-{prefix}"))
    assert got.revision == 2
    assert plain(got.data) == {"a": 2}
    assert dict(got.meta) == {"why": "test"}


async def test_compare_and_set_on_expected_revision(channel: grpc.aio.Channel, prefix: str) -> None:
    config = stub(channel)
    ref = {"scope": "team", "scope_id": f"team-{prefix}"}
    created = await config.SetConfig(
        C.SetConfigRequest(**ref, data=struct({"v": "one"}), expected_revision=0)
    )
    assert created.revision == 1
    # 0 means "must not exist": a second create loses.
    with pytest.raises(grpc.aio.AioRpcError) as lost:
        await config.SetConfig(
            C.SetConfigRequest(**ref, data=struct({"v": "x"}), expected_revision=0)
        )
    assert lost.value.code() == grpc.StatusCode.ABORTED
    assert error_reason(lost.value) == "REVISION_MISMATCH"

    updated = await config.SetConfig(
        C.SetConfigRequest(**ref, data=struct({"v": "two"}), expected_revision=1)
    )
    assert updated.revision == 2
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await config.SetConfig(
            C.SetConfigRequest(**ref, data=struct({"v": "stale"}), expected_revision=1)
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert "revision 2, not 1" in (stale.value.details() or "")
    got = await config.GetConfig(C.GetConfigRequest(**ref))
    assert (got.revision, plain(got.data)) == (2, {"v": "two"})


async def test_concurrent_writers_each_get_their_own_revision(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    ref = {"scope": "workflow", "scope_id": f"wf-{prefix}"}
    written = await asyncio.gather(
        *(config.SetConfig(C.SetConfigRequest(**ref, data=struct({"n": i}))) for i in range(20))
    )
    assert sorted(d.revision for d in written) == list(range(1, 21))
    assert (await config.GetConfig(C.GetConfigRequest(**ref))).revision == 20


async def test_effective_config_deep_merges_objects_and_replaces_arrays_and_scalars(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    org, team, wf, step = f"o-{prefix}", f"t-{prefix}", f"w-{prefix}", "build"
    await config.SetConfig(
        C.SetConfigRequest(
            scope="org",
            scope_id=org,
            data=struct(
                {
                    "retry": {"max_retries": 3, "backoff": {"base_ms": 100, "cap_ms": 1000}},
                    "safety": {"denied_topics": ["job.a.*", "job.b.*"]},
                    "model": "small",
                    "tags": ["org"],
                }
            ),
        )
    )
    await config.SetConfig(
        C.SetConfigRequest(
            scope="team",
            scope_id=team,
            data=struct(
                {
                    "retry": {"backoff": {"cap_ms": 5000}},
                    "safety": {"denied_topics": ["job.c.*"]},
                    "tags": [],
                }
            ),
        )
    )
    await config.SetConfig(
        C.SetConfigRequest(scope="workflow", scope_id=wf, data=struct({"model": "large"}))
    )
    await config.SetConfig(
        C.SetConfigRequest(
            scope="step", scope_id=f"{wf}/{step}", data=struct({"retry": {"max_retries": None}})
        )
    )
    # A bare step id is another step's document (steps are keyed within their workflow).
    await config.SetConfig(
        C.SetConfigRequest(scope="step", scope_id=step, data=struct({"model": "unrelated"}))
    )

    effective = await config.GetEffectiveConfig(
        C.GetEffectiveConfigRequest(org_id=org, team_id=team, workflow_id=wf, step_id=step)
    )
    expected = {
        # objects merge key by key, at every depth
        "retry": {"max_retries": None, "backoff": {"base_ms": 100, "cap_ms": 5000}},
        # arrays replace (no concatenation), also by an empty array
        "safety": {"denied_topics": ["job.c.*"]},
        "tags": [],
        # scalars replace
        "model": "large",
    }
    system_data, system_rev = await system_doc(config)
    expected = {**system_data, **expected}  # the session's system document: pools, timeouts
    assert plain(effective.data) == expected
    assert effective.version == f"system:{system_rev}|org:1|team:1|workflow:1|step:1"
    assert effective.hash == canonical_hash(expected)

    partial = await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(org_id=org))
    assert partial.version.endswith("|org:1|team:0|workflow:0|step:0")
    assert plain(partial.data)["tags"] == ["org"]


async def system_doc(
    config: config_service_pb2_grpc.ConfigServiceStub,
) -> tuple[dict[str, object], int]:
    doc = await config.GetConfig(C.GetConfigRequest())
    assert (doc.scope, doc.scope_id) == ("system", "default")
    return plain(doc.data), doc.revision


async def test_effective_version_and_hash_are_stable_and_change_with_content(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    org = f"stable-{prefix}"
    await config.SetConfig(C.SetConfigRequest(scope="org", scope_id=org, data=struct({"x": 1})))
    one = await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(org_id=org))
    again = await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(org_id=org))
    assert (one.version, one.hash) == (again.version, again.hash)

    # Same content written again: a new revision (version changes), same content hash.
    await config.SetConfig(C.SetConfigRequest(scope="org", scope_id=org, data=struct({"x": 1})))
    same = await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(org_id=org))
    assert same.version != one.version and "|org:2|" in same.version
    assert same.hash == one.hash

    await config.SetConfig(C.SetConfigRequest(scope="org", scope_id=org, data=struct({"x": 2})))
    changed = await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(org_id=org))
    assert "|org:3|" in changed.version
    assert changed.hash != one.hash


async def test_effective_for_job_attaches_what_the_kernel_reads(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    org = f"job-{prefix}"
    await config.SetConfig(
        C.SetConfigRequest(
            scope="org", scope_id=org, data=struct({"safety": {"denied_topics": ["job.x.*"]}})
        )
    )
    assert cordum.config is not None
    payload, version, digest = await cordum.config.effective_for_job(org, "", "", "")
    doc = json.loads(payload)
    assert doc == {
        "version": version,
        "hash": digest,
        "data": doc["data"],
    }
    assert doc["data"]["safety"]["denied_topics"] == ["job.x.*"]
    assert "|org:1|" in version
    # Served from the in-process cache: a second call is the same object's bytes.
    assert (await cordum.config.effective_for_job(org, "", "", ""))[0] == payload


async def test_bad_input_names_every_field_and_writes_nothing(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    config = stub(channel)
    cases = [
        (C.SetConfigRequest(scope_id=f"x-{prefix}", data=struct({})), {"scope"}),
        (C.SetConfigRequest(scope="galaxy", scope_id=f"x-{prefix}", data=struct({})), {"scope"}),
        (C.SetConfigRequest(scope="org", data=struct({})), {"scope_id"}),
        (
            C.SetConfigRequest(scope="org", scope_id=f"bad id {prefix}", data=struct({})),
            {"scope_id"},
        ),
        (C.SetConfigRequest(scope="team", scope_id=f"t-{prefix}"), {"data"}),
        (
            C.SetConfigRequest(
                scope="team", scope_id=f"t-{prefix}", data=struct({}), expected_revision=-1
            ),
            {"expected_revision"},
        ),
        (
            C.SetConfigRequest(scope="step", data=None, meta={"": "x"}),
            {"scope_id", "data", "meta."},
        ),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await config.SetConfig(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert error_reason(info.value) == "INVALID_ARGUMENT"
        assert set(field_violations(info.value)) == fields, request
    assert await keys_with(cordum, prefix) == []

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await config.GetConfig(C.GetConfigRequest(scope="org", scope_id=f"none-{prefix}"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(missing.value) == "CONFIG_NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as bad_effective:
        await config.GetEffectiveConfig(C.GetEffectiveConfigRequest(team_id="no spaces"))
    assert set(field_violations(bad_effective.value)) == {"team_id"}
