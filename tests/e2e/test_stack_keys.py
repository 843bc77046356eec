"""`cordumctl up` with API keys and a CORS allowlist: the keys reach cordum-server (and stay
off command lines), the launcher's own probes present one, and Envoy applies the origins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from cordum.server.stack.launcher import read_state
from cordum.server.stack.process import pick_free_port

ROOT = Path(__file__).resolve().parents[2]
CORDUMCTL = Path(sys.executable).parent / "cordumctl"
OPS = "ops-key-0123456789abcdef"
VIEW = "view-key-0123456789abcdef"
ORIGIN = "https://console.example"


def cordumctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CORDUM_")}
    return subprocess.run(
        [str(CORDUMCTL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**clean, **(env or {})},
        check=False,
    )


def test_up_with_keys_and_origins(tmp_path: Path) -> None:
    ports = {
        n: pick_free_port() for n in ("grpc", "rest", "ws", "nats", "redis", "metrics", "admin")
    }
    data = ["--data-dir", str(tmp_path / "data")]
    up = cordumctl(
        "up",
        "--detach",
        *data,
        *(f"--{n}-port={p}" for n, p in ports.items()),
        f"--api-keys=ops:{OPS}@*:admin, dash:{VIEW}@acme:viewer",
        f"--allowed-origins={ORIGIN}",
    )
    # The example worker's readiness probe (ListWorkers) needs a key: up only returns once
    # it was registered.
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        state = read_state(tmp_path / "data")
        assert state is not None
        for pid in [state["supervisor_pid"], *(c["pid"] for c in state["components"])]:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert OPS.encode() not in cmdline and VIEW.encode() not in cmdline
        rest = state["endpoints"]["rest"]
        assert httpx.get(rest + "/api/v1/workers", timeout=5).status_code == 401
        seen = httpx.get(rest + "/api/v1/workers", headers={"x-api-key": VIEW}, timeout=5)
        assert seen.status_code == 200, seen.text
        assert any(w["live"] for w in seen.json()["workers"])
        preflight = httpx.options(
            rest + "/api/v1/jobs",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
            timeout=5,
        )
        assert preflight.headers["access-control-allow-origin"] == ORIGIN

        status = cordumctl("status", "--json", *data, env={"CORDUM_API_KEY": VIEW})
        assert status.returncode == 0, status.stderr + status.stdout
        assert json.loads(status.stdout)["healthy"] is True
    finally:
        assert cordumctl("down", *data).returncode == 0
