"""Peak memory of a large artifact round trip, on each backend.

Starts nats-server and valkey-server (and moto's S3 server in a process of its own, so the
bytes it keeps are not counted here), runs a Cordum app in this process, streams an artifact
of `--mb` MiB up (UploadArtifact) and down (DownloadArtifact, checking its SHA-256) over
gRPC, and prints this process's peak resident set (VmHWM) before and after: client and
server both live here, so a flat figure means neither side held the artifact.

    .venv/bin/python bench/artifacts_rss.py --mb 200
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import grpc

from cordum.server.app import App
from cordum.server.settings import Settings
from cordum.server.stack.process import pick_free_port
from cordum.server.stack.services import start_nats, start_valkey
from cordum.v1 import artifact_service_pb2, artifact_service_pb2_grpc

A = artifact_service_pb2
MiB = 1024 * 1024
PIECE = 256 * 1024
REPO = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def piece(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return seed * (PIECE // len(seed))


async def upload(pieces: int) -> AsyncIterator[A.UploadArtifactRequest]:
    yield A.UploadArtifactRequest(header=A.ArtifactUploadHeader(retention="short"))
    digest = hashlib.sha256()
    for i in range(pieces):
        digest.update(piece(i))
        yield A.UploadArtifactRequest(chunk=piece(i))
    yield A.UploadArtifactRequest(
        end=A.ArtifactUploadEnd(size_bytes=pieces * PIECE, sha256=digest.hexdigest())
    )


async def round_trip(app: App, mb: int) -> tuple[float, float, float]:
    pieces = mb * MiB // PIECE
    expected = hashlib.sha256()
    for i in range(pieces):
        expected.update(piece(i))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        warm = await stub.UploadArtifact(upload(8))  # 2 MiB: code paths and pools warmed up
        await stub.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=warm.artifact_ptr))
        before = peak_rss_mib()
        started = time.monotonic()
        put = await stub.UploadArtifact(upload(pieces))
        digest = hashlib.sha256()
        async for message in stub.DownloadArtifact(
            A.DownloadArtifactRequest(artifact_ptr=put.artifact_ptr)
        ):
            if message.WhichOneof("part") == "chunk":
                digest.update(message.chunk)
        elapsed = time.monotonic() - started
        assert digest.hexdigest() == put.metadata.sha256 == expected.hexdigest()
        await stub.DeleteArtifact(A.DeleteArtifactRequest(artifact_ptr=put.artifact_ptr))
    return before, peak_rss_mib(), elapsed


def start_moto(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto's server did not start")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cordum-artifacts-rss-"))
    nats = start_nats(data_dir=work / "nats", log_path=work / "nats.log")
    valkey = start_valkey(data_dir=work / "valkey", log_path=work / "valkey.log", aof=False)
    moto_port = pick_free_port()
    moto = start_moto(moto_port)
    endpoint = f"http://127.0.0.1:{moto_port}"
    boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket="bench")
    try:
        for backend in ("redis", "s3"):
            settings = Settings(
                nats_url=nats.url,
                redis_url=valkey.url,
                grpc_port=0,
                metrics_port=0,
                namespace=f"bench-{backend}.",
                config_dir=REPO / "config",
                roles=["gateway", "scheduler", "safety"],
                log_level="WARNING",
                artifact_backend=backend,
                artifact_max_bytes=(args.mb + 1) * MiB,
                artifact_s3_bucket="bench" if backend == "s3" else "",
                artifact_s3_endpoint_url=endpoint,
                artifact_s3_access_key_id="bench",
                artifact_s3_secret_access_key="bench",
            )
            async with App(settings) as app:
                before, after, elapsed = await round_trip(app, args.mb)
            print(
                f"{backend:5}: {args.mb} MiB up and down in {elapsed:.1f} s; peak RSS "
                f"{before:.0f} MiB before, {after:.0f} MiB after (+{after - before:.0f} MiB)"
            )
    finally:
        moto.terminate()
        moto.wait(10)
        valkey.stop()
        nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
