"""The packaging promises: an editable install and a built wheel both import every part of
the `cordum` namespace, and the SDK installs and imports next to cap-sdk-python 2.17 (whose
protobuf<7 pin we must live with) in either import order.

These build a wheel and throw-away venvs (pip downloads from PyPI, cached after the first
run), so they are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CAP_AGENT_FILES = ["job", "buspacket", "heartbeat", "alert", "handshake", "safety", "policy"]

IMPORT_ALL = textwrap.dedent(
    """
    import json, cordum.v1.job_service_pb2, cordum.agent.v1.buspacket_pb2, cordum.sdk.cli.main
    import cordum.server, cordum.v1, google.protobuf
    from pathlib import Path
    data = Path(cordum.v1.job_service_pb2.__file__).parent
    print(json.dumps({
        "v1": cordum.v1.job_service_pb2.__file__,
        "agent": cordum.agent.v1.buspacket_pb2.__file__,
        "sdk": cordum.sdk.cli.main.__file__,
        "server": cordum.server.__file__,
        "descriptor": (data / "cordum.binpb").exists(),
        "openapi": (data / "openapi.json").exists(),
        "protobuf": google.protobuf.__version__,
    }))
    """
)

pytestmark = pytest.mark.slow


def run_python(python: Path | str, code: str) -> dict[str, object]:
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_venv(path: Path, *requirements: str) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = path / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        check=True,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("cordum-*.whl")
    return built


def test_editable_install_imports_every_root() -> None:
    info = run_python(sys.executable, IMPORT_ALL)
    assert str(info["v1"]).startswith(str(ROOT / "gen"))
    assert str(info["agent"]).startswith(str(ROOT / "gen"))
    assert str(info["sdk"]).startswith(str(ROOT / "sdk"))
    assert str(info["server"]).startswith(str(ROOT / "server"))
    assert info["descriptor"] and info["openapi"]
    # The development venv runs our gencode on protobuf 7.
    assert str(info["protobuf"]).startswith("7.")


def test_wheel_imports_every_root(wheel: Path, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv", str(wheel))
    info = run_python(python, IMPORT_ALL)
    site = str(tmp_path / "venv")
    for key in ("v1", "agent", "sdk", "server"):
        assert str(info[key]).startswith(site), (key, info[key])
    assert info["descriptor"] and info["openapi"]


CAP_CHECK = textwrap.dedent(
    """
    import importlib, json, sys
    order = sys.argv[1]
    if order == "cap-first":
        import cap.runtime
        import cordum.sdk.cli.main, cordum.v1.job_service_pb2
    else:
        import cordum.sdk.cli.main, cordum.v1.job_service_pb2
        import cap.runtime
    import google.protobuf
    same = {}
    for name in %r:
        ours = importlib.import_module(f"cordum.agent.v1.{name}_pb2")
        theirs = importlib.import_module(f"cap.pb.cordum.agent.v1.{name}_pb2")
        same[name] = ours.DESCRIPTOR.serialized_pb == theirs.DESCRIPTOR.serialized_pb
    from cordum.agent.v1 import buspacket_pb2 as ours
    from cap.pb.cordum.agent.v1 import buspacket_pb2 as theirs
    wire = ours.BusPacket(trace_id="t", sender_id="s", protocol_version=1)
    wire.job_request.job_id = "j"
    wire.job_request.topic = "job.echo"
    back = theirs.BusPacket.FromString(wire.SerializeToString(deterministic=True))
    print(json.dumps({"same": same, "protobuf": google.protobuf.__version__,
                      "roundtrip": back.job_request.topic}))
    """
) % (CAP_AGENT_FILES,)


def test_side_by_side_with_cap_sdk_python(wheel: Path, tmp_path: Path) -> None:
    # The oldest protobuf cap-sdk-python 2.17 accepts: our gencode must run on it.
    python = make_venv(tmp_path / "venv", str(wheel), "cap-sdk-python==2.17.0", "protobuf==6.31.1")
    for order in ("cap-first", "cordum-first"):
        result = subprocess.run(
            [str(python), "-c", CAP_CHECK, order],
            capture_output=True,
            text=True,
            cwd="/",
            check=False,
        )
        assert result.returncode == 0, (order, result.stderr)
        info = json.loads(result.stdout.strip().splitlines()[-1])
        assert info["protobuf"] == "6.31.1"
        # Wire facts: every CAP file is byte-identical to cap-sdk-python 2.17.0's.
        assert info["same"] == dict.fromkeys(CAP_AGENT_FILES, True), order
        assert info["roundtrip"] == "job.echo"
