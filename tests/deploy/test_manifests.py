"""The scale-out deployment under deploy/: Kubernetes manifests, Dockerfile, Grafana dashboard.

`kubectl` is not available here, so the manifests are checked without a cluster:

- every object against the Kubernetes OpenAPI schemas (kubernetes-validate, which ships the
  JSON schemas in its wheel and needs no network), strictly (unknown fields fail), for the
  oldest and the newest Kubernetes version we claim;
- the references between objects that a schema cannot see: Service selectors, named ports,
  probes, ConfigMaps and Secrets, the Service DNS names in env vars, NATS routes and the
  Envoy clusters, the Settings the env vars produce;
- the configs inside the ConfigMaps with the real binaries: `envoy --mode validate`,
  `nats-server -t`, valkey-server started on the Redis config;
- the generated ConfigMaps are current (deploy/generate.py) and the Envoy routes and filters
  are the ones `cordumctl up` uses;
- the dashboard's structure and that its queries use metrics the server exports.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from cordum.server.api import roles
from cordum.server.api.auth import edge_from_settings
from cordum.server.metrics import Metrics
from cordum.server.settings import Settings
from cordum.server.stack.binaries import envoy_path, nats_server_path, valkey_server_path
from cordum.server.stack.envoy_config import REPO_DESCRIPTOR, default_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "cordum-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
CORDUM_IMAGE = "ghcr.io/cordum-py/cordum"
# The oldest Kubernetes we claim (native gRPC probes are GA since 1.27) and the newest schema
# the validator ships.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())
WORKLOADS = ("Deployment", "StatefulSet")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CLUSTER_SCOPED = {"Namespace"}
SAFETY_CHECK = "/cordum.agent.v1.SafetyKernel/Check"
# Env var names the server reads without the CORDUM_ prefix (settings.py aliases).
SETTINGS_ALIASES = {"NATS_URL", "REDIS_URL", "NATS_USE_JETSTREAM", "SAFETY_KERNEL_ADDR"}
# Only spliced into other values ($(REDIS_PASSWORD) in REDIS_URL).
HELPER_ENV = {"REDIS_PASSWORD"}


# --- loading ---------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text(encoding="utf-8"))


@functools.cache
def _parsed(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_LOADER) if d)


def _docs(path: Path) -> list[dict[str, Any]]:
    """The objects in one manifest file (a fresh copy: tests may change theirs)."""
    return copy.deepcopy(list(_parsed(path)))


def _resources() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in _kustomization()["resources"] for doc in _docs(KUBE / name)]


def _templates() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBE.glob("*.example.yaml")) for doc in _docs(path)]


def _all_objects() -> list[dict[str, Any]]:
    return [doc for _, doc in _resources()]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in _all_objects() if o["kind"] == kind]


def _get(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _of_kind(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads() -> list[dict[str, Any]]:
    return [o for o in _all_objects() if o["kind"] in WORKLOADS]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _is_cordum_server(container: dict[str, Any]) -> bool:
    return container["image"].startswith(CORDUM_IMAGE + ":") and "command" not in container


def _cordum_servers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w in _workloads() for c in _containers(w) if _is_cordum_server(c)]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _workloads_selected_by(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        w
        for w in _workloads()
        if _matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values, args and commands."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet builds it; Secrets hold their template's values."""
    secrets = {
        o["metadata"]["name"]: o["stringData"] for o in _templates() if o["kind"] == "Secret"
    }
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = _expand(item["value"], env)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = "from-the-downward-api"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the base and its files ------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = _kustomization()["resources"]
    on_disk = sorted(
        p.name
        for p in KUBE.glob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    )
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


def test_generated_manifests_are_current() -> None:
    spec = importlib.util.spec_from_file_location("cordum_deploy_generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: .venv/bin/python deploy/generate.py"
    # The ConfigMap holds the repository's config files verbatim.
    data = _get("ConfigMap", "cordum-config")["data"]
    assert data == {
        p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "config").glob("*.yaml"))
    }
    assert {"safety.yaml", "pools.yaml", "timeouts.yaml", "system.yaml"} <= set(data)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    objects = [*_all_objects(), *_templates()]
    assert len(objects) > 20
    failures = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{where}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_the_validator_is_not_vacuous() -> None:
    gateway = _get("Deployment", "cordum-gateway")
    typo = copy.deepcopy(gateway)
    typo["spec"]["replicaz"] = 2
    wrong_type = copy.deepcopy(gateway)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = (
        "grpc"
    )
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_objects_are_unique_and_in_the_namespace() -> None:
    namespace = _kustomization()["namespace"]
    assert _get("Namespace", namespace)
    keys = [(o["kind"], o["metadata"]["name"]) for o in _all_objects()]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in [*_all_objects(), *_templates()]:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]


# --- references between objects --------------------------------------------------------------


def test_workload_selectors_match_their_pods() -> None:
    for w in _workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert _matches(w["spec"]["selector"]["matchLabels"], labels), w["metadata"]["name"]
    # No two workloads share a selector (a Service or PDB would span both).
    selectors = [tuple(sorted(w["spec"]["selector"]["matchLabels"].items())) for w in _workloads()]
    assert len(selectors) == len(set(selectors))


def test_services_select_workloads_and_their_ports() -> None:
    for svc in _of_kind("Service"):
        name = svc["metadata"]["name"]
        targets = _workloads_selected_by(svc["spec"]["selector"])
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in _containers(targets[0]) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in ports, f"Service {name}: no container port named {target}"
            else:
                assert target in ports.values(), f"Service {name}: no container port {target}"


def test_disruption_budgets_and_autoscalers_point_at_workloads() -> None:
    for pdb in _of_kind("PodDisruptionBudget"):
        targets = _workloads_selected_by(pdb["spec"]["selector"]["matchLabels"])
        assert len(targets) == 1, pdb["metadata"]["name"]
        replicas = targets[0]["spec"].get("replicas", 1)
        assert replicas > 1, f"PDB on single-replica {targets[0]['metadata']['name']} blocks drains"
    autoscaled = set()
    for hpa in _of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = _get(ref["kind"], ref["name"])
        assert (
            hpa["spec"]["minReplicas"] <= target["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        )
        # CPU utilization needs CPU requests on every container.
        assert all("cpu" in c["resources"]["requests"] for c in _containers(target))
        autoscaled.add(ref["name"])
    assert {"cordum-gateway", "cordum-scheduler"} <= autoscaled


def test_statefulsets_have_their_headless_service() -> None:
    for sts in _of_kind("StatefulSet"):
        svc = _get("Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None"
        assert _workloads_selected_by(svc["spec"]["selector"]) == [sts]


def test_configmaps_and_secrets_referenced_exist() -> None:
    configmaps = {o["metadata"]["name"]: o for o in _of_kind("ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in _of_kind("Secret")}
    # Secrets created out of band have a template (never applied, see secrets.example.yaml).
    templates = {o["metadata"]["name"]: o for o in _templates() if o["kind"] == "Secret"}

    def secret_keys(name: str) -> set[str]:
        obj = secrets.get(name) or templates.get(name)
        assert obj is not None, f"Secret {name} is neither a manifest nor a template"
        return {*obj.get("data", {}), *obj.get("stringData", {})}

    for w in _workloads():
        for volume in _pod_spec(w).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "secret" in volume:
                secret_keys(volume["secret"]["secretName"])
        for c in _containers(w):
            for item in c.get("env", []):
                ref = item.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = configmaps[ref["configMapKeyRef"]["name"]]
                    assert ref["configMapKeyRef"]["key"] in cm["data"]
                if "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]["key"]
                    assert key in secret_keys(ref["secretKeyRef"]["name"]), key
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    secret_keys(source["secretRef"]["name"])


def _service_port(host: str, port: int) -> str | None:
    """Why host:port is not a Service address in our namespace (None when it is)."""
    namespace = _kustomization()["namespace"]
    labels = host.split(".")
    suffixes = ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"])
    services = {s["metadata"]["name"]: s for s in _of_kind("Service")}
    for suffix in suffixes:
        n = len(suffix)
        if n and labels[-n:] != suffix:
            continue
        names = labels[: len(labels) - n]
        if len(names) == 1 and names[0] in services:
            svc = services[names[0]]
            break
        if len(names) == 2 and names[1] in services:
            # <statefulset>-<ordinal>.<headless service>: one pod of a StatefulSet.
            svc = services[names[1]]
            sts = [s for s in _of_kind("StatefulSet") if s["spec"]["serviceName"] == names[1]]
            pod = re.fullmatch(r"(.+)-(\d+)", names[0])
            if not sts or not pod or pod[1] != sts[0]["metadata"]["name"]:
                return f"{host}: {names[0]} is not a pod of a StatefulSet behind {names[1]}"
            if int(pod[2]) >= sts[0]["spec"]["replicas"]:
                return f"{host}: ordinal {pod[2]} beyond the StatefulSet's replicas"
            break
    else:
        return f"{host}: no such Service"
    if port not in {p["port"] for p in svc["spec"]["ports"]}:
        return f"{host}:{port}: the Service has no port {port}"
    return None


def _addresses(value: str) -> list[tuple[str, int]]:
    if "://" in value:
        parts = urlsplit(value)
        if parts.hostname and parts.port:
            return [(parts.hostname, parts.port)]
        return []
    match = re.fullmatch(r"([a-z0-9][a-z0-9.-]*):(\d+)", value)
    return [(match[1], int(match[2]))] if match else []


def test_addresses_in_env_vars_are_services() -> None:
    checked = 0
    for w in _workloads():
        for c in _containers(w):
            for name, value in _container_env(c).items():
                for host, port in _addresses(value):
                    problem = _service_port(host, port)
                    assert problem is None, f"{w['metadata']['name']} {name}: {problem}"
                    checked += 1
    assert checked >= 10  # NATS_URL, REDIS_URL, SAFETY_KERNEL_ADDR of every role


def test_probes_use_container_ports() -> None:
    for w in _workloads():
        for c in _containers(w):
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        ok = port in ports if isinstance(port, str) else port in ports.values()
                        assert ok, f"{w['metadata']['name']} {kind}: port {port}"


def test_cordum_servers_probe_grpc_health_and_healthz() -> None:
    servers = _cordum_servers()
    assert len(servers) == 4  # gateway (+ context), scheduler, safety, workflow
    for w, c in servers:
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"] == 8080
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert ports["metrics"] == 9090
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["metrics"])
        assert annotations["prometheus.io/path"] == "/metrics"


# --- what the cordum-server processes get ----------------------------------------------------


def test_cordum_env_produces_the_intended_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    roles_seen: set[str] = set()
    for w, c in _cordum_servers():
        where = w["metadata"]["name"]
        env = _container_env(c)
        for name in env:
            field = name.removeprefix("CORDUM_").lower()
            known = name in SETTINGS_ALIASES or name in HELPER_ENV
            known = known or (name.startswith("CORDUM_") and field in Settings.model_fields)
            assert known, f"{where}: {name} is no setting"
        for name in list(os.environ):
            if name.startswith("CORDUM_") or name in SETTINGS_ALIASES:
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s = Settings()
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert s.grpc_host == s.metrics_host == "0.0.0.0", where
        assert s.grpc_port == ports["grpc"] and s.metrics_port == ports["metrics"], where
        if "gateway" in s.roles:
            assert s.ws_host == "0.0.0.0" and s.ws_port == ports["ws"]
        assert str(s.config_dir) == mounts["config"]
        if "safety" not in s.roles:
            assert s.safety_addr.startswith("cordum-safety:")
        assert s.redis_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
        assert s.use_jetstream and s.jetstream_replicas == 3
        # The server starts with these settings (it refuses a public bind without keys), and
        # a process without the kernel presents a key the kernel accepts for Check.
        edge = edge_from_settings(s)
        assert edge.authenticator.enabled, where
        if "safety" not in s.roles:
            key = edge.authenticator.identify(edge.internal_key)
            assert key is not None and key.tenant is None, where
            assert roles.RANK[key.role] >= roles.RANK[roles.METHOD_ACCESS[SAFETY_CHECK]]
        # CORDUM_* is the settings namespace: no Service link variables in it.
        assert _pod_spec(w)["enableServiceLinks"] is False
        roles_seen.update(s.roles)
    assert roles_seen == {"gateway", "scheduler", "safety", "workflow", "context"}
    # The API's services are all reachable through the gateways: the context engine's
    # (served only where the role runs) shares their process.
    gateway_roles = {
        e["value"]
        for e in _pod_spec(_get("Deployment", "cordum-gateway"))["containers"][0]["env"]
        if e["name"] == "CORDUM_ROLES"
    }
    assert gateway_roles == {"gateway,context"}


def test_pods_are_hardened() -> None:
    for w in _workloads():
        spec = _pod_spec(w)
        where = w["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in _containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
    namespace = _get("Namespace", _kustomization()["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_cordum_image_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    images = [c["image"] for w in _workloads() for c in _containers(w)]
    cordum = [i for i in images if i.startswith(CORDUM_IMAGE + ":")]
    assert len(cordum) == 5  # four role Deployments and Envoy
    assert set(cordum) == {f"{CORDUM_IMAGE}:{version}"}
    assert _kustomization()["images"] == [{"name": CORDUM_IMAGE, "newTag": version}]
    for w in _workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") == "cordum":
            assert labels["app.kubernetes.io/version"] == version
    assert f"{CORDUM_IMAGE}:{version}" in DOCKERFILE.read_text(encoding="utf-8")
    # Every other image is pinned to a version.
    for image in images:
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), image


# --- Envoy -----------------------------------------------------------------------------------


def _envoy_bootstrap() -> dict[str, Any]:
    return yaml.safe_load(_get("ConfigMap", "cordum-envoy")["data"]["envoy.yaml"])


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]


def _transcoder(hcm: dict[str, Any]) -> dict[str, Any]:
    (found,) = [
        f["typed_config"]
        for f in hcm["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    return found


def _openapi_body(hcm: dict[str, Any]) -> dict[str, Any]:
    (route,) = [
        r
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
        if "filename" in r.get("direct_response", {}).get("body", {})
    ]
    return route["direct_response"]["body"]  # type: ignore[no-any-return]


def _openapi_file(hcm: dict[str, Any]) -> str:
    return str(_openapi_body(hcm)["filename"])


def _image_descriptor() -> str:
    return _transcoder(_hcm(_envoy_bootstrap()))["proto_descriptor"]


def test_envoy_configmap_passes_envoy_validate(tmp_path: Path) -> None:
    # The descriptor and the OpenAPI document next to it live in the image; validate against
    # the repository's copies.
    text = _get("ConfigMap", "cordum-envoy")["data"]["envoy.yaml"]
    descriptor = _image_descriptor()
    assert descriptor in text
    image_dir, repo_dir = str(Path(descriptor).parent), str((ROOT / REPO_DESCRIPTOR).parent)
    path = tmp_path / "envoy.yaml"
    path.write_text(text.replace(image_dir + "/", repo_dir + "/"), encoding="utf-8")
    args = _get("Deployment", "cordum-envoy")["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = [a for a in args if a not in ("--config-path", "/etc/envoy/envoy.yaml")]
    result = subprocess.run(
        [str(envoy_path()), "--mode", "validate", "-c", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_configmap_matches_the_local_renderer() -> None:
    ours, local = _envoy_bootstrap(), default_config().build()
    # Same routes, filters (with the same API services) and connection manager settings: only
    # the addresses, the descriptor path and the cluster discovery differ.
    ours_hcm, local_hcm = _hcm(ours), _hcm(local)
    _transcoder(ours_hcm)["proto_descriptor"] = "DESCRIPTOR"
    _transcoder(local_hcm)["proto_descriptor"] = "DESCRIPTOR"
    # The OpenAPI document Envoy serves sits next to the descriptor, in the image too.
    assert _openapi_file(ours_hcm) == str(Path(_image_descriptor()).with_name("openapi.json"))
    for hcm in (ours_hcm, local_hcm):
        _openapi_body(hcm)["filename"] = "OPENAPI"
    assert ours_hcm == local_hcm
    local_clusters = {c["name"]: c for c in local["static_resources"]["clusters"]}
    ours_clusters = {c["name"]: c for c in ours["static_resources"]["clusters"]}
    assert ours_clusters.keys() == local_clusters.keys()
    for name, cluster in ours_clusters.items():
        assert cluster["type"] == "STRICT_DNS"
        assert cluster.get("typed_extension_protocol_options") == local_clusters[name].get(
            "typed_extension_protocol_options"
        )


def test_envoy_deployment_fits_its_configmap() -> None:
    config = _envoy_bootstrap()
    namespace = _kustomization()["namespace"]
    envoy = _get("Deployment", "cordum-envoy")
    (container,) = _pod_spec(envoy)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(envoy)["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == "cordum-envoy"
    args = container["args"]
    assert args[args.index("--config-path") + 1] == f"{mounts[config_volume]}/envoy.yaml"
    (listener,) = config["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]
    assert listen["address"] == "0.0.0.0"
    assert listen["port_value"] == container["ports"][0]["containerPort"] == 8081
    # The admin interface must stay inside the pod.
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    gateway = _get("Deployment", "cordum-gateway")
    gateway_ports = {p["containerPort"] for p in _pod_spec(gateway)["containers"][0]["ports"]}
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                # Fully qualified: Envoy does not use the pod's DNS search path.
                assert host.endswith(f".{namespace}.svc.cluster.local"), host
                assert _service_port(host, port) is None
                svc = _get("Service", host.split(".")[0])
                assert svc["spec"]["clusterIP"] == "None", "Envoy must see every gateway pod"
                assert port in gateway_ports
    # The Dockerfile puts the descriptor and the envoy binary where the Deployment expects.
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert _image_descriptor() in dockerfile
    assert container["command"] == ["envoy"] and "/usr/local/bin/envoy" in dockerfile


# --- NATS and Redis --------------------------------------------------------------------------


def test_nats_config_is_valid_and_routes_every_node(tmp_path: Path) -> None:
    sts = _get("StatefulSet", "nats")
    conf = _get("ConfigMap", "nats-config")["data"]["nats.conf"]
    path = tmp_path / "nats.conf"
    path.write_text(conf, encoding="utf-8")
    result = subprocess.run(
        [str(nats_server_path()), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "POD_NAME": "nats-0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (container,) = _pod_spec(sts)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    routes = re.findall(r"nats://([\w.-]+):(\d+)", conf)
    assert len(routes) == sts["spec"]["replicas"] == 3
    for host, port in routes:
        assert int(port) == ports["cluster"]
        assert _service_port(host, int(port)) is None
    assert re.search(rf"store_dir:\s*{re.escape(mounts['data'])}\s", conf)
    assert "jetstream" in conf and container["command"][-1] == f"{mounts['config']}/nats.conf"
    assert _get("Service", sts["spec"]["serviceName"])["spec"]["publishNotReadyAddresses"]


def test_redis_config_starts_valkey_with_aof(tmp_path: Path) -> None:
    conf = _get("ConfigMap", "redis-config")["data"]["valkey.conf"]
    # The data directory must exist when the config is read: point it here.
    local = re.sub(r"^dir .*$", f"dir {tmp_path}", conf, flags=re.M)
    (tmp_path / "valkey.conf").write_text(local, encoding="utf-8")
    port = _free_port()
    # The config as the pod runs it; only where and how to listen changes here.
    argv = [
        str(valkey_server_path()),
        str(tmp_path / "valkey.conf"),
        "--requirepass",
        "test-password",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--daemonize",
        "no",
    ]
    log = (tmp_path / "valkey.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(
        host="127.0.0.1", port=port, password="test-password", decode_responses=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "valkey.log").read_text(encoding="utf-8")
                assert time.monotonic() < deadline, "valkey-server did not start"
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        # Without the password: refused (a raw PING; redis-py would retry for seconds).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(128).startswith(b"-NOAUTH")
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    sts = _get("StatefulSet", "redis")
    (container,) = _pod_spec(sts)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert re.search(rf"^dir {re.escape(mounts['data'])}$", conf, re.M)
    assert container["command"][1] == f"{mounts['config']}/valkey.conf"
    # maxmemory stays below the container limit, so Redis refuses writes before an OOM kill.
    limit_mib = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
    maxmemory_mib = int(re.search(r"^maxmemory (\d+)mb$", conf, re.M)[1])  # type: ignore[index]
    assert maxmemory_mib < limit_mib
    assert sts["spec"]["replicas"] == 1, "Cordum's Lua scripts need one primary (docs/deploy.md)"


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_builds_what_the_manifests_run() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "'.[server]'" in text
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and user[-1] != ("0", "0")
    assert re.search(r'^ENTRYPOINT \["cordum-server"\]$', text, re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / source).exists(), source
    for w, c in _cordum_servers():
        assert _pod_spec(w)["securityContext"]["runAsUser"] == int(user[-1][0])
        assert c["args"] == ["run"]
    # The lookups the image build runs to link the envoy binary, the descriptor and the
    # OpenAPI document Envoy serves work.
    snippets = re.findall(r"python -c '([^']+)'", text)
    assert len(snippets) == 3
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()).is_file(), snippet


# --- the Grafana dashboard -------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    """The sample names /metrics exposes for every metric the server defines."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def _is_placeholder(panel: dict[str, Any]) -> bool:
    return panel["title"].startswith("Placeholder:")


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            assert expr.count("[") == expr.count("]")


def test_dashboard_queries_use_exported_metrics() -> None:
    exported = _exported_metric_names()
    used: set[str] = set()
    placeholders = 0
    for panel in _panels():
        if panel["type"] == "row":
            continue
        names = {n for t in panel["targets"] for n in re.findall(r"\bcordum_\w+", t["expr"])}
        assert names, panel["title"]
        if _is_placeholder(panel):
            # Its metric is still to be added (issue 7); the title and description say so.
            placeholders += 1
            assert "not exported yet" in panel["title"] and panel["description"]
            continue
        missing = names - exported
        assert not missing, f"{panel['title']}: {sorted(missing)} not in metrics.py"
        used |= names
    assert placeholders == 0  # every metric issue 7 asked for is exported and shown
    wanted = {
        "cordum_grpc_requests_total",
        "cordum_grpc_request_duration_seconds_bucket",
        "cordum_bus_packets_dropped_total",
        "cordum_workers_live",
        "cordum_jobs_submitted_total",
        "cordum_jobs_transitions_total",
        "cordum_safety_decisions_total",
        "cordum_dispatch_latency_seconds_bucket",
        "cordum_jobs_queue_depth",
        "cordum_dlq_entries",
        "cordum_reconciler_actions_total",
        "cordum_workflow_runs_total",
        "cordum_workflow_runs_active",
        "cordum_context_builds_total",
        "cordum_context_window_tokens_bucket",
    }
    assert wanted <= used, sorted(wanted - used)


def _exported_labels() -> dict[str, set[str]]:
    """Label names of every metric the server defines, under each of its sample names."""
    labels: dict[str, set[str]] = {}
    for metric in vars(Metrics(CollectorRegistry())).values():
        names = getattr(metric, "_labelnames", None)
        if names is None:
            continue
        base = metric._name  # prometheus_client keeps counters' names without _total
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            labels[base + suffix] = set(names) | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_dashboard_queries_use_exported_labels() -> None:
    """Every label a query groups by or selects on belongs to a metric the query reads
    (`instance` comes from Prometheus), so a renamed label cannot leave a panel empty."""
    exported = _exported_labels()
    for panel in _panels():
        if panel["type"] == "row":
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bcordum_\w+", expr))
            known = set().union(*(exported[n] for n in names)) | {"instance"}
            used = {
                label.strip()
                for group in re.findall(r"\bby \(([^)]*)\)", expr)
                for label in group.split(",")
            }
            used |= set(re.findall(r"[{,]\s*(\w+)\s*[=!]~?", expr))
            assert used <= known, f"{panel['title']}: {sorted(used - known)} in {expr}"


# --- documentation ---------------------------------------------------------------------------


def test_readme_and_docs_explain_the_deployment() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Scale-out" in readme
    section = readme[readme.index("## Scale-out") :]
    for needle in ("kubectl apply -k deploy/kubernetes", "deploy/grafana/cordum-dashboard.json"):
        assert needle in section
    guide = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for needle in ("Sentinel", "Redis Cluster", "hash slot", "NATS_URL", "REDIS_URL"):
        assert needle in guide
