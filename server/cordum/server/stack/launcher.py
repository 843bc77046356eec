"""The embedded stack: nats-server (JetStream), valkey-server (AOF), cordum-server, Envoy and
the example worker, started in that order from the pip-installed binaries and stopped in
reverse. `cordumctl up` and the end-to-end tests both use this class.

With `replicas` > 1 the control plane runs as separate processes instead of one
cordum-server: a gateway, a safety kernel, a context engine, and `replicas` schedulers and
workflow engines, so the multi-replica code paths (queue groups, leases, compare-and-set
writes) run on one machine. `Stack.restart` brings a stopped or killed component back as it
first started (same ports, data and environment), which is what the chaos suite uses.

State (pids and endpoints) goes to `<data_dir>/stack.json` so `cordumctl status` and
`cordumctl down` can find a detached stack. Data (JetStream store, AOF) lives under
`<data_dir>` and survives a restart.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cordum.server.api.auth import StartupRefused, probe_key
from cordum.server.stack.binaries import envoy_path, nats_server_path, valkey_server_path
from cordum.server.stack.envoy_config import (
    MAX_REQUEST_BYTES,
    EnvoyConfig,
    EnvoyPorts,
    api_services,
    packaged_descriptor,
)
from cordum.server.stack.process import PortInUseError, can_connect, pick_free_port, port_in_use
from cordum.server.stack.services import (
    RunningService,
    start_envoy,
    start_nats,
    start_python_service,
    start_valkey,
)

logger = logging.getLogger(__name__)

STATE_FILE = "stack.json"

# The roles that run `replicas` processes each in the split layout.
SCALED_ROLES = ("scheduler", "workflow")


@dataclass
class StackSettings:
    data_dir: Path = Path(".cordum")
    host: str = "127.0.0.1"
    grpc_port: int = 8080
    rest_port: int = 8081
    ws_port: int = 8082
    nats_port: int = 4222
    redis_port: int = 6379
    metrics_port: int = 9090
    envoy_admin_port: int = 9901
    # The example worker script; None runs no worker.
    worker_script: Path | None = None
    worker_id: str = "echo-worker"
    config_dir: Path = Path("config")
    # Extra environment for cordum-server (e.g. CORDUM_API_KEYS); it also inherits ours.
    server_env: dict[str, str] = field(default_factory=dict)
    # CORS allowlist for Envoy (and the server's WebSocket bridge): exact origins or `*`;
    # empty: loopback origins only.
    allowed_origins: tuple[str, ...] = ()
    # REST bodies larger than this get 413 from Envoy (the server gets the same limit).
    max_request_bytes: int = MAX_REQUEST_BYTES
    # 1: one cordum-server with every role. N > 1: N scheduler and N workflow-engine
    # processes, plus one gateway (on the ports above), one safety kernel and one context
    # engine (on free loopback ports).
    replicas: int = 1

    def ports(self) -> dict[str, int]:
        ports = {
            "nats-server": self.nats_port,
            "valkey-server": self.redis_port,
            "cordum-server (gRPC)": self.grpc_port,
            "cordum-server (metrics)": self.metrics_port,
            "cordum-server (WebSocket)": self.ws_port,
            "envoy (REST)": self.rest_port,
            "envoy (admin)": self.envoy_admin_port,
        }
        return {name: port for name, port in ports.items() if port}


@dataclass
class Endpoints:
    grpc: str
    rest: str
    websocket: str
    nats: str
    redis: str
    metrics: str
    envoy_admin: str


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.services: list[RunningService] = []
        # How to start each component again exactly as it first started (restart()).
        self._starters: dict[str, Callable[[], RunningService]] = {}

    # -- life cycle -------------------------------------------------------------------

    def check(self) -> None:
        """Fail early, with one clear line, on a missing binary or a busy port."""
        nats_server_path()
        valkey_server_path()
        envoy_path()
        for name, port in self.settings.ports().items():
            if port_in_use(self.settings.host, port):
                raise PortInUseError(self.settings.host, port, name)

    def start(self) -> Endpoints:
        self.check()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        self.write_state()
        return self.endpoints()

    def stop(self) -> None:
        while self.services:
            service = self.services.pop()
            logger.info("stopping %s", service.name)
            service.stop()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)

    def component(self, name: str) -> RunningService:
        """The running component called `name` (as listed by `cordumctl status`)."""
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no component {name!r}; components: {[s.name for s in self.services]}")

    def restart(self, name: str) -> RunningService:
        """Start component `name` again as it first started (same ports, data directory and
        environment), stopping it first if it still runs: a crashed process coming back."""
        index = self.services.index(self.component(name))
        self.services[index].stop()
        service = self._starters[name]()
        self.services[index] = service
        self.write_state()
        return service

    def _add(self, start: Callable[[], RunningService]) -> RunningService:
        service = start()
        self.services.append(service)
        self._starters[service.name] = start
        return service

    def _add_all(self, starters: list[Callable[[], RunningService]]) -> None:
        """Start independent components at once: each Python process spends seconds on its
        imports. Every component that started is kept (so stop() stops it) even when
        another one failed; the first failure is raised."""
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=len(starters)) as pool:
            futures = [pool.submit(start) for start in starters]
            try:
                wait(futures)
            finally:
                # Also on Ctrl-C: what the threads still start must be known to stop().
                wait(futures)
                for start, future in zip(starters, futures, strict=True):
                    error = future.exception()
                    if error is not None:
                        errors.append(error)
                        continue
                    service = future.result()
                    self.services.append(service)
                    self._starters[service.name] = start
        if errors:
            raise errors[0]

    def _start_all(self) -> None:
        s, logs = self.settings, self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        start = functools.partial(
            start_nats,
            data_dir=self.data_dir / "nats",
            host=s.host,
            port=s.nats_port,
            jetstream=True,
            log_path=logs / "nats.log",
        )
        nats = self._add(start)
        # A restart must come back where clients reconnect to, also when the port was picked.
        self._starters[nats.name] = functools.partial(start, port=nats.port)
        start = functools.partial(
            start_valkey,
            data_dir=self.data_dir / "redis",
            host=s.host,
            port=s.redis_port,
            aof=True,
            log_path=logs / "valkey.log",
        )
        redis = self._add(start)
        self._starters[redis.name] = functools.partial(start, port=redis.port)
        env = {
            "NATS_URL": nats.url,
            "REDIS_URL": redis.url,
            "CORDUM_GRPC_HOST": s.host,
            "CORDUM_GRPC_PORT": str(s.grpc_port),
            "CORDUM_METRICS_HOST": s.host,
            "CORDUM_METRICS_PORT": str(s.metrics_port),
            "CORDUM_WS_HOST": s.host,
            "CORDUM_WS_PORT": str(s.ws_port),
            "CORDUM_CONFIG_DIR": str(s.config_dir.resolve()),
            "CORDUM_MAX_REQUEST_BYTES": str(s.max_request_bytes),
            **s.server_env,
        }
        if s.allowed_origins:
            env["CORDUM_ALLOWED_ORIGINS"] = ",".join(s.allowed_origins)
        grpc_target = f"{s.host}:{s.grpc_port}"
        # With API keys configured, the worker probe below needs one.
        key = probe_key({**os.environ, **env})
        context_port = 0
        if s.replicas > 1:
            context_port = self._start_split(env, logs)
        else:
            self._add(
                functools.partial(
                    start_python_service,
                    "cordum-server",
                    [sys.executable, "-m", "cordum.server", "run"],
                    env=env,
                    log_path=logs / "cordum-server.log",
                    ready=functools.partial(grpc_serving, grpc_target),
                    host=s.host,
                    port=s.grpc_port,
                    url=f"grpc://{grpc_target}",
                )
            )
        config_path = self.data_dir / "envoy.yaml"
        descriptor = packaged_descriptor()
        config = EnvoyConfig(
            ports=EnvoyPorts(
                listen_host=s.host,
                listen_port=s.rest_port,
                admin_port=s.envoy_admin_port,
                grpc_host=s.host,
                grpc_port=s.grpc_port,
                ws_host=s.host,
                ws_port=s.ws_port,
                context_port=context_port,
            ),
            descriptor=descriptor,
            services=tuple(api_services(descriptor)),
            allowed_origins=tuple(s.allowed_origins),
            max_request_bytes=s.max_request_bytes,
        )
        config_path.write_text(config.render())
        self._add(
            functools.partial(
                start_envoy,
                config_path=config_path,
                admin_port=s.envoy_admin_port,
                log_path=logs / "envoy.log",
            )
        )
        if s.worker_script is not None:
            worker_env = {
                "NATS_URL": nats.url,
                "REDIS_URL": redis.url,
                "WORKER_ID": s.worker_id,
            }
            self._add(
                functools.partial(
                    start_python_service,
                    s.worker_id,
                    [sys.executable, str(s.worker_script)],
                    env=worker_env,
                    log_path=logs / f"{s.worker_id}.log",
                    ready=functools.partial(
                        worker_registered, grpc_target, s.worker_id, api_key=key
                    ),
                )
            )

    def _start_split(self, env: dict[str, str], logs: Path) -> int:
        """The control plane as one process per role (`replicas` per scaled role), started
        together; returns the context engine's gRPC port (Envoy routes its calls there)."""
        s = self.settings
        ports = {"safety": pick_free_port(s.host), "context": pick_free_port(s.host)}
        processes: list[tuple[str, str, int]] = [
            ("safety", "safety", ports["safety"]),
            ("context", "context", ports["context"]),
            ("gateway", "gateway", s.grpc_port),
        ]
        for i in range(1, s.replicas + 1):
            processes += [(f"{role}-{i}", role, pick_free_port(s.host)) for role in SCALED_ROLES]
        shared = {**env, "CORDUM_SAFETY_ADDR": f"{s.host}:{ports['safety']}"}
        starters = []
        for name, role, port in processes:
            own = {**shared, "CORDUM_ROLES": role, "CORDUM_GRPC_PORT": str(port)}
            if role != "gateway":
                # Only the gateway's metrics port is published; the others take any free one.
                own["CORDUM_METRICS_PORT"] = "0"
            target = f"{s.host}:{port}"
            starters.append(
                functools.partial(
                    start_python_service,
                    name,
                    [sys.executable, "-m", "cordum.server", "run"],
                    env=own,
                    log_path=logs / f"{name}.log",
                    ready=functools.partial(grpc_serving, target),
                    host=s.host,
                    port=port,
                    url=f"grpc://{target}",
                )
            )
        self._add_all(starters)
        return ports["context"]

    # -- state ----------------------------------------------------------------------

    def endpoints(self) -> Endpoints:
        s = self.settings
        return Endpoints(
            grpc=f"{s.host}:{s.grpc_port}",
            rest=f"http://{s.host}:{s.rest_port}",
            websocket=f"ws://{s.host}:{s.rest_port}/api/v1/stream",
            nats=f"nats://{s.host}:{s.nats_port}",
            redis=f"redis://{s.host}:{s.redis_port}/0",
            metrics=f"http://{s.host}:{s.metrics_port}/metrics",
            envoy_admin=f"http://{s.host}:{s.envoy_admin_port}",
        )

    def write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "started_at": time.time(),
            "data_dir": str(self.data_dir),
            "endpoints": asdict(self.endpoints()),
            "components": [
                {"name": svc.name, "pid": svc.process.pid, "url": svc.url} for svc in self.services
            ],
        }
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    def first_dead(self) -> RunningService | None:
        return next((svc for svc in self.services if not svc.process.alive), None)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def grpc_serving(target: str, timeout: float = 0.5) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def worker_registered(
    target: str, worker_id: str, timeout: float = 0.5, api_key: str | None = None
) -> bool:
    from cordum.v1 import status_service_pb2, status_service_pb2_grpc

    metadata = (("x-api-key", api_key),) if api_key else None
    try:
        with grpc.insecure_channel(target) as channel:
            reply = status_service_pb2_grpc.StatusServiceStub(channel).ListWorkers(
                status_service_pb2.ListWorkersRequest(), timeout=timeout, metadata=metadata
            )
        return any(w.worker_id == worker_id for w in reply.workers)
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return 200 <= reply.status < 300
    except OSError:
        return False


def http_answers(url: str, timeout: float = 0.5) -> bool:
    """The server behind `url` answered (a 401 without a key counts; 5xx does not)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except OSError:
        return False


def probe(state: dict[str, Any], api_key: str | None = None) -> dict[str, dict[str, Any]]:
    """Health of each component of a running stack, from its state file (`api_key`: for
    the worker check when the stack requires keys)."""
    ep = state["endpoints"]
    if api_key is None:
        try:
            api_key = probe_key(os.environ)
        except StartupRefused:
            api_key = None
    host, port = ep["nats"].removeprefix("nats://").rsplit(":", 1)
    rhost, rport = ep["redis"].removeprefix("redis://").rsplit("/", 1)[0].rsplit(":", 1)
    checks = {
        "nats-server": can_connect(host, int(port)),
        "valkey-server": can_connect(rhost, int(rport)),
        "cordum-server": grpc_serving(ep["grpc"]),
        "envoy": http_ok(ep["envoy_admin"] + "/ready")
        and http_answers(ep["rest"] + "/api/v1/status"),
    }
    result: dict[str, dict[str, Any]] = {}
    for comp in state["components"]:
        name, url = comp["name"], comp["url"] or ""
        alive = _pid_alive(comp["pid"])
        if name in checks:
            healthy = alive and checks[name]
        elif url.startswith("grpc://"):  # a control-plane process of the split layout
            healthy = alive and grpc_serving(url.removeprefix("grpc://"))
        else:  # the worker: registered with the gateway
            healthy = alive and worker_registered(ep["grpc"], name, api_key=api_key)
        result[name] = {"pid": comp["pid"], "url": comp["url"], "healthy": healthy}
    return result


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
