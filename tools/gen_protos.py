#!/usr/bin/env python3
"""Generate gen/ from proto/: Python messages, gRPC stubs, .pyi stubs, the Envoy descriptor
set and the OpenAPI document. `--check` regenerates into a temporary directory and fails
when gen/ differs, so CI catches a stale gen/.

Run through `make proto` / `make proto-check`: it needs the codegen venv (grpcio-tools
1.76.0, whose protoc 31.1 writes gencode that runs on protobuf 6.31+ and 7.x).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
THIRD_PARTY = ROOT / "third_party"
GEN = ROOT / "gen"
# Extra types the Envoy transcoder must know to render rich error details as JSON.
ERROR_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def protoc(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"-I{THIRD_PARTY}", *args]
    subprocess.run(cmd, check=True, cwd=ROOT)


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))


def generate(out: Path) -> None:
    files = proto_files()
    protoc(
        [
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out=quiet:{out}",
            f"--mypy_grpc_out=quiet:{out}",
            *files,
        ]
    )
    api = out / "cordum" / "v1"
    protoc(
        [
            "--include_imports",
            f"--descriptor_set_out={api / 'cordum.binpb'}",
            *files,
            *ERROR_PROTOS,
        ]
    )
    plugin = ROOT / "tools" / "protoc_gen_openapi.py"
    api_files = [f for f in files if f.startswith("cordum/v1/")]
    protoc(
        [
            f"--plugin=protoc-gen-openapi={plugin}",
            "--openapi_opt=title=Cordum API,version=v1,package=cordum.v1",
            f"--openapi_out={api}",
            *api_files,
            # Their messages describe the error details Envoy renders.
            *ERROR_PROTOS,
        ]
    )


def tree(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def check(fresh: Path) -> int:
    want, have = tree(fresh), tree(GEN) if GEN.exists() else set()
    stale = sorted(want ^ have)
    stale += sorted(f for f in want & have if not filecmp.cmp(fresh / f, GEN / f, shallow=False))
    if stale:
        print("gen/ is stale; run 'make proto'. Differs:", *stale, sep="\n  ")
        return 1
    print(f"gen/ is current ({len(want)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            return check(fresh)
        shutil.rmtree(GEN, ignore_errors=True)
        shutil.copytree(fresh, GEN)
    print(f"generated {len(tree(GEN))} files under gen/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
