"""The config/*.yaml defaults and the system scope: loaded on start when absent or when the
files changed and nobody edited the document through the API since; otherwise applied only
by ReloadConfig (upstream's Redis copy silently won forever)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from cordum.server.app import App
from cordum.server.jsonvalue import from_struct, to_struct
from cordum.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc

from support.admin import error_reason, field_violations, own_app
from support.cordum import write_config

C = config_service_pb2

SYSTEM_V1 = """\
# platform defaults for the test
safety:
  denied_topics: ["job.never.*"]
limits:
  max_concurrent_runs: 5
"""

SYSTEM_V2 = """\
safety:
  denied_topics: ["job.never.*", "job.also-never.*"]
limits:
  max_concurrent_runs: 7
"""


def stub(app: App) -> tuple[grpc.aio.Channel, config_service_pb2_grpc.ConfigServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    return channel, config_service_pb2_grpc.ConfigServiceStub(channel)


async def system(app: App) -> config_pb2.ConfigDocument:
    channel, config = stub(app)
    async with channel:
        return await config.GetConfig(C.GetConfigRequest(scope="system"))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    directory = write_config(tmp_path / "config")
    (directory / "system.yaml").write_text(SYSTEM_V1)
    return directory


async def test_start_loads_the_files_and_a_changed_file_is_picked_up_on_restart(
    nats_url: str, redis_url: str, files: Path, prefix: str
) -> None:
    settings = {"namespace": f"cfg{prefix}.", "roles": ["gateway"]}
    async with own_app(nats_url, redis_url, files, **settings) as app:
        doc = await system(app)
        data = from_struct(doc.data)
        assert (doc.revision, doc.updated_by) == (1, "config-files")
        assert data["safety"] == {"denied_topics": ["job.never.*"]}
        assert data["limits"] == {"max_concurrent_runs": 5}
        assert data["pools"]["topics"] == {"job.default": "default"}
        assert data["timeouts"]["reconciler"]["scan_interval_seconds"] == 30

    # Unchanged files: a restart writes nothing.
    async with own_app(nats_url, redis_url, files, **settings) as app:
        assert (await system(app)).revision == 1

    # Changed file, document never edited through the API: the restart applies it.
    (files / "system.yaml").write_text(SYSTEM_V2)
    async with own_app(nats_url, redis_url, files, **settings) as app:
        doc = await system(app)
        assert doc.revision == 2
        assert from_struct(doc.data)["limits"] == {"max_concurrent_runs": 7}


async def test_api_edits_win_on_restart_until_reload_applies_the_files(
    nats_url: str, redis_url: str, files: Path, prefix: str
) -> None:
    settings = {"namespace": f"cfg{prefix}.", "roles": ["gateway"]}
    async with own_app(nats_url, redis_url, files, **settings) as app:
        channel, config = stub(app)
        async with channel:
            edited = await config.SetConfig(
                C.SetConfigRequest(
                    scope="system",
                    data=from_dict({"limits": {"max_concurrent_runs": 1}}),
                    expected_revision=1,
                )
            )
        assert (edited.scope_id, edited.revision) == ("default", 2)

    (files / "system.yaml").write_text(SYSTEM_V2)
    async with own_app(nats_url, redis_url, files, **settings) as app:
        kept = await system(app)
        assert kept.revision == 2  # the API edit stays: the changed file is not applied
        assert from_struct(kept.data) == {"limits": {"max_concurrent_runs": 1}}

        channel, config = stub(app)
        async with channel:
            reloaded = await config.ReloadConfig(C.ReloadConfigRequest())
        assert [Path(f).name for f in reloaded.files] == [
            "system.yaml",
            "pools.yaml",
            "timeouts.yaml",
        ]
        assert reloaded.document.revision == 3
        data = from_struct(reloaded.document.data)
        assert data["limits"] == {"max_concurrent_runs": 7}
        assert set(data) == {"safety", "limits", "pools", "timeouts"}
        assert (await system(app)).revision == 3


async def test_reload_of_a_broken_file_names_it_and_changes_nothing(
    nats_url: str, redis_url: str, files: Path, prefix: str
) -> None:
    settings = {"namespace": f"cfg{prefix}.", "roles": ["gateway"]}
    async with own_app(nats_url, redis_url, files, **settings) as app:
        (files / "system.yaml").write_text("safety: [unclosed\n")
        (files / "pools.yaml").write_text("topics: {}\npools: {gpu: {requires: 3}}\nextra: 1\n")
        channel, config = stub(app)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await config.ReloadConfig(C.ReloadConfigRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INVALID_ARGUMENT"
        fields = field_violations(info.value)
        assert "system.yaml" in fields and "not valid YAML" in fields["system.yaml"]
        assert {"pools.yaml.pools.gpu.requires", "pools.yaml.extra"} <= set(fields)
        assert (await system(app)).revision == 1


def from_dict(data: dict[str, object]) -> struct_pb2.Struct:
    return to_struct(data)
