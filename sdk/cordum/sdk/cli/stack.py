"""`cordumctl up | down | status`: the embedded stack on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)

DEFAULT_WORKER = Path("examples/echo_worker.py")


def _stack_module() -> Any:
    try:
        from cordum.server.stack import launcher
    except ImportError as exc:
        err.print(f"cordumctl: the stack needs 'pip install cordum[server]' ({exc})")
        raise typer.Exit(1) from exc
    return launcher


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]cordumctl:[/red] {message}")
    return typer.Exit(1)


def up(
    ctx: typer.Context,
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background."),
    data_dir: Path = typer.Option(Path(".cordum"), help="Where data, logs and state live."),
    worker: bool = typer.Option(True, help="Also run the example worker."),
    worker_script: Path = typer.Option(DEFAULT_WORKER, help="The example worker to run."),
    grpc_port: int = typer.Option(8080, help="cordum-server gRPC port."),
    rest_port: int = typer.Option(8081, help="Envoy REST/WebSocket port."),
    nats_port: int = typer.Option(4222, help="nats-server port."),
    redis_port: int = typer.Option(6379, help="valkey-server port."),
    metrics_port: int = typer.Option(9090, help="Prometheus metrics port."),
    ws_port: int = typer.Option(8082, help="Internal WebSocket bridge port."),
    admin_port: int = typer.Option(9901, help="Envoy admin port."),
    replicas: int = typer.Option(
        1,
        "--replicas",
        min=1,
        help="Scheduler and workflow-engine processes each. Above 1, the gateway, safety "
        "kernel and context engine run in processes of their own too.",
    ),
    api_keys: str = typer.Option(
        "",
        "--api-keys",
        envvar="CORDUM_API_KEYS",
        help="API keys with tenants and roles (README: Security).",
        show_default=False,
    ),
    api_keys_file: Path | None = typer.Option(
        None, envvar="CORDUM_API_KEYS_FILE", help="A YAML/JSON file of API keys."
    ),
    allowed_origins: str = typer.Option(
        "",
        "--allowed-origins",
        envvar="CORDUM_ALLOWED_ORIGINS",
        help="Browser origins allowed by CORS, comma-separated (`*`: any).",
        show_default=False,
    ),
) -> None:
    """Start nats-server, valkey-server, cordum-server, Envoy and the example worker.

    With --replicas N the control plane runs as separate processes: N schedulers, N workflow
    engines, a gateway, a safety kernel and a context engine (`cordumctl status` lists them).

    Without API keys the stack serves an open API on loopback only; with them (or the
    global --api-key, which becomes an admin key for every tenant) every call needs one."""
    launcher = _stack_module()
    server_env: dict[str, str] = {}
    if api_keys.strip():
        server_env["CORDUM_API_KEYS"] = api_keys
    if api_keys_file is not None:
        server_env["CORDUM_API_KEYS_FILE"] = str(api_keys_file.resolve())
    global_key = getattr(ctx.obj, "api_key", None)
    if global_key:
        server_env["CORDUM_API_KEY"] = global_key
    script = worker_script.resolve() if worker and worker_script.exists() else None
    if worker and script is None:
        err.print(f"note: {worker_script} not found; starting without the example worker")
    settings = launcher.StackSettings(
        data_dir=data_dir,
        grpc_port=grpc_port,
        rest_port=rest_port,
        nats_port=nats_port,
        redis_port=redis_port,
        metrics_port=metrics_port,
        ws_port=ws_port,
        envoy_admin_port=admin_port,
        worker_script=script,
        server_env=server_env,
        replicas=replicas,
        allowed_origins=tuple(o.strip() for o in allowed_origins.split(",") if o.strip()),
    )
    if launcher.read_state(data_dir.resolve()):
        raise _fail(f"a stack is already running from {data_dir} (cordumctl down stops it)")
    if detach:
        _up_detached(launcher, settings)
    else:
        _up_foreground(launcher, settings)


def _print_endpoints(endpoints: Any) -> None:
    table = Table(title="Cordum is up", show_header=False)
    for name, value in asdict(endpoints).items():
        table.add_row(name, value)
    console.print(table)


def _up_foreground(launcher: Any, settings: Any) -> None:
    stack = launcher.Stack(settings)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with console.status("starting the stack..."):
            endpoints = stack.start()
    except Exception as exc:  # startup errors are already one clear line
        raise _fail(str(exc)) from exc
    _print_endpoints(endpoints)
    console.print("Press Ctrl-C to stop.")
    reason = "stop requested"
    while not stop.wait(0.5):
        dead = stack.first_dead()
        if dead is not None:
            reason = f"{dead.name} exited with code {dead.process.returncode}"
            break
    console.print(f"stopping ({reason})...")
    stack.stop()
    if reason != "stop requested":
        raise typer.Exit(1)


def _up_detached(launcher: Any, settings: Any) -> None:
    stack = launcher.Stack(settings)
    try:
        stack.check()
    except Exception as exc:
        raise _fail(str(exc)) from exc
    data_dir = stack.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "supervisor.log"
    raw = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    # Keys travel in the environment (readable by this user only), never on the command
    # line (readable by everyone through ps).
    secret_env = raw.pop("server_env")
    env = {**os.environ, "CORDUM_STACK_SERVER_ENV": json.dumps(secret_env)}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cordum.server.stack.supervisor", json.dumps(raw)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + 90
    with console.status("starting the stack in the background..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                raise _fail("the stack failed to start:\n  " + "\n  ".join(tail))
            state = launcher.read_state(data_dir)
            if state is not None and state["supervisor_pid"] == proc.pid:
                _print_endpoints(stack.endpoints())
                console.print(f"supervisor pid {proc.pid}; stop it with: cordumctl down")
                return
            time.sleep(0.1)
    proc.terminate()
    raise _fail("the stack did not become ready within 90 s; see " + str(log_path))


def down(
    data_dir: Path = typer.Option(Path(".cordum"), help="The stack's data directory."),
) -> None:
    """Stop a stack started with `cordumctl up --detach`."""
    launcher = _stack_module()
    state = launcher.read_state(data_dir.resolve())
    if state is None:
        console.print(f"no stack is running from {data_dir}")
        return
    pid = int(state["supervisor_pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        (data_dir.resolve() / launcher.STATE_FILE).unlink(missing_ok=True)
        console.print("the stack was not running any more; removed its stale state")
        return
    deadline = time.monotonic() + 60
    with console.status("stopping the stack..."):
        while time.monotonic() < deadline:
            if not launcher._pid_alive(pid):
                console.print("stack stopped")
                return
            time.sleep(0.1)
    raise _fail(f"supervisor {pid} did not stop within 60 s")


def status(
    ctx: typer.Context,
    data_dir: Path = typer.Option(Path(".cordum"), help="The stack's data directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show each component of the local stack and whether it is healthy."""
    launcher = _stack_module()
    state = launcher.read_state(data_dir.resolve())
    if state is None:
        if as_json:
            console.print_json(json.dumps({"running": False}))
        else:
            console.print(f"no stack is running from {data_dir}")
        raise typer.Exit(1)
    components = launcher.probe(state, api_key=getattr(ctx.obj, "api_key", None))
    healthy = all(c["healthy"] for c in components.values())
    if as_json:
        doc = {
            "running": True,
            "healthy": healthy,
            "endpoints": state["endpoints"],
            "components": components,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        table = Table(title="Cordum stack")
        for col in ("component", "pid", "healthy", "endpoint"):
            table.add_column(col)
        for name, comp in components.items():
            mark = "[green]yes[/green]" if comp["healthy"] else "[red]no[/red]"
            table.add_row(name, str(comp["pid"]), mark, comp["url"])
        console.print(table)
        for name, value in state["endpoints"].items():
            console.print(f"{name:12} {value}")
    if not healthy:
        raise typer.Exit(1)
