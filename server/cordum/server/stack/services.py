"""Start NATS, Valkey, Envoy and our own Python services, and wait until they are ready.

Used by ``cordumctl up`` and by the test-suite alike. Every ``start_*`` function either returns
a ready :class:`RunningService` or stops what it started and raises
:class:`~cordum.server.stack.process.StartupError` with the tail of the process log.
"""

import functools
import http.client
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cordum.server.stack.binaries import envoy_path, nats_server_path, valkey_server_path
from cordum.server.stack.process import (
    ManagedProcess,
    PortInUseError,
    StartupError,
    can_connect,
    pick_free_port,
    port_in_use,
    wait_until,
)

logger = logging.getLogger(__name__)

# A freshly picked free port can be taken by someone else before valkey binds it.
_VALKEY_BIND_ATTEMPTS = 5

StrPath = str | os.PathLike[str]


@dataclass
class RunningService:
    """A started, ready service. ``url`` is what clients connect to."""

    name: str
    process: ManagedProcess
    host: str
    port: int
    url: str
    # nats-server's HTTP monitor, when it was asked for.
    monitor_url: str | None = None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        return self.process.stop(timeout)

    def __enter__(self) -> "RunningService":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _launch(
    process: ManagedProcess, ready: Callable[[], bool], *, timeout: float, what: str
) -> None:
    process.start()
    try:
        wait_until(ready, timeout=timeout, what=what, process=process)
    except BaseException:
        # Never leave a half-started child behind, also not on Ctrl-C.
        process.stop()
        raise


def _require_free(host: str, port: int, wanted_by: str) -> None:
    if port_in_use(host, port):
        raise PortInUseError(host, port, wanted_by)


# --- NATS -----------------------------------------------------------------------------------


def _read_ports_file(directory: Path, pid: int | None) -> dict[str, list[str]] | None:
    """nats-server's ports file (``<executable>_<pid>.ports``), once it is fully written."""
    if pid is None:
        return None
    # Globbed on the PID because the prefix is the executable's file name (nats-server.exe on
    # Windows).
    for path in directory.glob(f"*_{pid}.ports"):
        try:
            ports = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not written completely yet
        if isinstance(ports, dict) and ports.get("nats"):
            return ports
    return None


def _url_port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise StartupError(f"nats-server reported a URL without a port: {url}")
    return port


def start_nats(
    *,
    data_dir: StrPath,
    log_path: StrPath,
    host: str = "127.0.0.1",
    port: int = 0,
    jetstream: bool = True,
    monitor_port: int | None = None,
    timeout: float = 15.0,
) -> RunningService:
    """Start nats-server on ``host``; ``port=0`` lets nats-server pick a free port itself.

    JetStream stores its data in ``<data_dir>/jetstream``. The HTTP monitor is off unless
    ``monitor_port`` is given (``0`` = any free port); its URL is in ``monitor_url``.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if port:
        _require_free(host, port, "nats-server")
    if monitor_port:
        _require_free(host, monitor_port, "nats-server monitor")
    argv = [
        os.fspath(nats_server_path()),
        "--addr",
        host,
        # -1 makes nats-server bind a random free port itself: no pick-then-bind race. The
        # ports file tells us which one it got.
        "--port",
        str(port or -1),
        "--ports_file_dir",
        os.fspath(data_dir),
    ]
    if monitor_port is not None:
        argv += ["--http_port", str(monitor_port or -1)]
    if jetstream:
        # nats-server always appends "jetstream" to the store dir, so this is <data_dir>/jetstream.
        argv += ["--jetstream", "--store_dir", os.fspath(data_dir)]
    process = ManagedProcess("nats-server", argv, log_path=log_path)
    found: dict[str, list[str]] = {}

    def ready() -> bool:
        # The ports file is written once all listeners are up; the connect proves it.
        ports = _read_ports_file(data_dir, process.pid)
        if ports is None or not can_connect(host, _url_port(ports["nats"][0])):
            return False
        found.update(ports)
        return True

    _launch(process, ready, timeout=timeout, what=f"nats-server to listen on {host}")
    client_port = _url_port(found["nats"][0])
    monitoring = found.get("monitoring") or [None]
    service = RunningService(
        name="nats-server",
        process=process,
        host=host,
        port=client_port,
        url=f"nats://{_netloc(host, client_port)}",
        monitor_url=monitoring[0],
    )
    logger.info("nats-server ready at %s", service.url)
    return service


# --- Valkey ---------------------------------------------------------------------------------


def _valkey_ping(host: str, port: int) -> bool:
    """True once valkey answers PING (it answers -LOADING while it replays the AOF)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_valkey_once(
    binary: Path,
    *,
    data_dir: Path,
    log_path: StrPath,
    host: str,
    port: int,
    aof: bool,
    timeout: float,
) -> RunningService:
    argv = [
        os.fspath(binary),
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        os.fspath(data_dir),
        "--appendonly",
        "yes" if aof else "no",
        # No RDB snapshots: durability comes from the AOF alone.
        "--save",
        "",
        "--daemonize",
        "no",
        # Bound to loopback only; protected mode would also refuse local clients without a
        # password in some setups.
        "--protected-mode",
        "no",
    ]
    process = ManagedProcess("valkey-server", argv, log_path=log_path)
    what = f"valkey-server to answer PING on {_netloc(host, port)}"
    _launch(process, functools.partial(_valkey_ping, host, port), timeout=timeout, what=what)
    service = RunningService(
        name="valkey-server",
        process=process,
        host=host,
        port=port,
        url=f"redis://{_netloc(host, port)}/0",
    )
    logger.info("valkey-server ready at %s", service.url)
    return service


def start_valkey(
    *,
    data_dir: StrPath,
    log_path: StrPath,
    host: str = "127.0.0.1",
    port: int = 0,
    aof: bool = True,
    timeout: float = 15.0,
) -> RunningService:
    """Start valkey-server on ``host``; ``port=0`` picks a free port.

    Data (the AOF) lives in ``data_dir``. Valkey cannot pick a port itself (``--port 0``
    disables TCP), so with ``port=0`` a free port is picked and, if someone else takes it
    before valkey binds it, the start is retried on another one.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = valkey_server_path()
    if port:
        _require_free(host, port, "valkey-server")
        return _start_valkey_once(
            binary,
            data_dir=data_dir,
            log_path=log_path,
            host=host,
            port=port,
            aof=aof,
            timeout=timeout,
        )
    for attempt in range(1, _VALKEY_BIND_ATTEMPTS + 1):
        chosen = pick_free_port(host)
        try:
            return _start_valkey_once(
                binary,
                data_dir=data_dir,
                log_path=log_path,
                host=host,
                port=chosen,
                aof=aof,
                timeout=timeout,
            )
        except StartupError as exc:
            if attempt == _VALKEY_BIND_ATTEMPTS or "Address already in use" not in str(exc):
                raise
            logger.warning("port %d was taken before valkey-server bound it; retrying", chosen)
    raise AssertionError("unreachable")


# --- Envoy ----------------------------------------------------------------------------------


def _envoy_live(host: str, port: int) -> bool:
    """True once the admin endpoint's /ready answers 200 LIVE (http.client ignores proxies)."""
    connection = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        connection.request("GET", "/ready")
        response = connection.getresponse()
        return response.status == 200 and response.read().strip() == b"LIVE"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def start_envoy(
    *,
    config_path: StrPath,
    admin_port: int,
    log_path: StrPath,
    admin_host: str = "127.0.0.1",
    base_id: int | None = None,
    concurrency: int = 2,
    log_level: str = "warn",
    timeout: float = 30.0,
) -> RunningService:
    """Start envoy with a static config whose admin listener is ``admin_host:admin_port``.

    Without ``base_id`` hot restart is disabled: no shared-memory region and no base-id
    collisions between concurrently running envoys (and nothing left behind in /dev/shm, which
    hot-restart mode leaks even on a clean exit). Pass ``base_id`` only to get hot restart.

    Envoy sets PR_SET_PDEATHSIG: it receives SIGTERM when the process (strictly: the thread)
    that started it exits. Call this from a thread that outlives envoy, e.g. the main thread.
    """
    _require_free(admin_host, admin_port, "envoy admin")
    argv = [
        os.fspath(envoy_path()),
        "-c",
        os.fspath(config_path),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
    ]
    argv += ["--disable-hot-restart"] if base_id is None else ["--base-id", str(base_id)]
    process = ManagedProcess("envoy", argv, log_path=log_path)
    what = f"envoy admin {_netloc(admin_host, admin_port)}/ready to report LIVE"
    _launch(
        process, functools.partial(_envoy_live, admin_host, admin_port), timeout=timeout, what=what
    )
    service = RunningService(
        name="envoy",
        process=process,
        host=admin_host,
        port=admin_port,
        url=f"http://{_netloc(admin_host, admin_port)}",
    )
    logger.info("envoy ready, admin at %s", service.url)
    return service


# --- Our own processes ----------------------------------------------------------------------


def start_python_service(
    name: str,
    argv: Sequence[StrPath],
    *,
    log_path: StrPath,
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    timeout: float = 30.0,
    host: str = "127.0.0.1",
    port: int = 0,
    url: str = "",
) -> RunningService:
    """Start one of our own processes (cordum-server, an example worker) and wait for ``ready``.

    ``argv`` is complete, typically ``[sys.executable, "-m", "cordum.server", ...]``; ``env``
    is added on top of the launcher's environment. ``host``/``port``/``url`` are only recorded
    on the returned service.
    """
    # Unbuffered so the log file (and any StartupError tail) shows output as it happens.
    process = ManagedProcess(
        name, argv, log_path=log_path, env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd
    )
    _launch(process, ready, timeout=timeout, what=f"{name} to become ready")
    logger.info("%s ready (pid %s)", name, process.pid)
    return RunningService(name=name, process=process, host=host, port=port, url=url)
