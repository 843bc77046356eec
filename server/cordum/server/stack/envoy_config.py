"""The Envoy configuration: REST (gRPC-JSON transcoding), native gRPC and the WebSocket
stream on one port in front of the gateway.

One renderer serves `cordumctl up`, the test-suite and `envoy/envoy.yaml` (the default-port
rendering kept in the repository and validated in CI). Run as a module:
`--write PATH` renders the defaults, `--check PATH` fails when PATH is stale,
`--validate PATH` runs `envoy --mode validate`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2

from cordum.server.stack.binaries import envoy_path

API_PACKAGE = "cordum.v1"
REPO_DESCRIPTOR = Path("gen/cordum/v1/cordum.binpb")
WS_PATH = "/api/v1/stream"
# The OpenAPI document `make proto` writes next to the descriptor set, served by Envoy itself
# (a direct response read at start-up) with no API key: it describes the API, holds no data.
OPENAPI_PATH = "/api/v1/openapi.json"
OPENAPI_FILE = "openapi.json"
# Envoy's direct responses are capped at 4 KiB unless raised; the document is a few 100 KiB.
MAX_OPENAPI_BYTES = 8 * 1024 * 1024

# The same default as the gRPC server's largest request (Settings.max_request_bytes).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Every method and header our REST API and WebSocket use, so browsers may send them.
CORS_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CORS_HEADERS = (
    "Content-Type",
    "Authorization",
    "X-API-Key",
    "Idempotency-Key",
    "X-Idempotency-Key",
    "X-Principal-Id",
    "X-Requested-With",
    "Sec-WebSocket-Protocol",
)
CORS_EXPOSE = ("grpc-status", "grpc-message", "x-request-id")
CORS_MAX_AGE_S = 600
# With no allowlist: pages served from this machine only (any port), as upstream did.
LOOPBACK_ORIGIN = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$"


def packaged_descriptor() -> Path:
    """The descriptor set shipped inside the installed `cordum.v1` package."""
    import cordum.v1

    for root in cordum.v1.__path__:
        candidate = Path(root) / "cordum.binpb"
        if candidate.exists():
            return candidate
    raise FileNotFoundError("cordum.binpb not found in the cordum.v1 package; run 'make proto'")


def api_services(descriptor: Path) -> list[str]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    return sorted(
        f"{f.package}.{s.name}" for f in fds.file if f.package == API_PACKAGE for s in f.service
    )


@dataclass(frozen=True)
class EnvoyPorts:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8081
    admin_port: int = 9901
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8080
    ws_host: str = "127.0.0.1"
    ws_port: int = 8082
    # The context engine's gRPC port when it runs in a process of its own (`cordumctl up
    # --replicas`); 0: the gateway serves it.
    context_port: int = 0


@dataclass(frozen=True)
class EnvoyConfig:
    ports: EnvoyPorts = field(default_factory=EnvoyPorts)
    descriptor: Path = REPO_DESCRIPTOR
    services: tuple[str, ...] = ()
    # CORDUM_ALLOWED_ORIGINS: exact origins, or `*` for any; empty: loopback origins only.
    allowed_origins: tuple[str, ...] = ()
    # Larger REST bodies get 413 before they reach the gateway.
    max_request_bytes: int = MAX_REQUEST_BYTES
    # None: the openapi.json next to `descriptor` (gen/cordum/v1 or the installed package).
    openapi: Path | None = None

    @property
    def openapi_document(self) -> Path:
        return self.openapi or self.descriptor.with_name(OPENAPI_FILE)

    def render(self) -> str:
        return yaml.safe_dump(self.build(), sort_keys=False, width=100)

    def build(self) -> dict[str, Any]:
        p = self.ports
        return {
            "admin": {"address": _address("127.0.0.1", p.admin_port)},
            "static_resources": {
                "listeners": [
                    {
                        "name": "api",
                        "address": _address(p.listen_host, p.listen_port),
                        "filter_chains": [{"filters": [self._http_connection_manager()]}],
                    }
                ],
                "clusters": [
                    _cluster("gateway_grpc", p.grpc_host, p.grpc_port, http2=True),
                    _cluster("gateway_ws", p.ws_host, p.ws_port, http2=False),
                    *_context_clusters(p),
                ],
            },
        }

    def _http_connection_manager(self) -> dict[str, Any]:
        return {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "api",
                "codec_type": "AUTO",
                "upgrade_configs": [{"upgrade_type": "websocket"}],
                # Long-lived streams (watch, events, WebSocket) must not be cut.
                "stream_idle_timeout": "3600s",
                "local_reply_config": _json_local_replies(),
                "route_config": {
                    "name": "api",
                    "max_direct_response_body_size_bytes": MAX_OPENAPI_BYTES,
                    "virtual_hosts": [
                        {
                            "name": "api",
                            "domains": ["*"],
                            "routes": [
                                _openapi_route(self.openapi_document),
                                *_context_routes(self.ports),
                                *_routes(),
                            ],
                            "typed_per_filter_config": {
                                "envoy.filters.http.cors": self._cors_policy()
                            },
                        }
                    ],
                },
                # CORS first: it answers preflights before anything else sees them.
                "http_filters": [_cors_filter(), self._transcoder(), _router()],
            },
        }

    def _transcoder(self) -> dict[str, Any]:
        return {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                "grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor": str(self.descriptor),
                "services": list(self.services),
                # Route on the REST path, not on the rewritten /pkg.Service/Method path.
                "match_incoming_request_route": True,
                "convert_grpc_status": True,
                # Without these, unmatched requests reach the gRPC server untranscoded.
                "request_validation_options": {
                    "reject_unknown_method": True,
                    "reject_unknown_query_parameters": True,
                },
                # Ids in paths may contain `/` (schema ids, artifact pointers) sent as %2F.
                "url_unescape_spec": "ALL_CHARACTERS",
                # Larger bodies: 413 (JSON, through local_reply_config).
                "max_request_body_size": self.max_request_bytes,
                "print_options": {
                    "always_print_primitive_fields": True,
                    "preserve_proto_field_names": True,
                    "stream_sse_style_delimited": True,
                },
            },
        }

    def _cors_policy(self) -> dict[str, Any]:
        """An allowed origin gets the CORS headers (and its preflight a 200 from Envoy); a
        refused one gets none, so the browser blocks the response; its preflight is
        answered by Envoy too (never forwarded to the API)."""
        origins = [o.strip() for o in self.allowed_origins if o.strip()]
        if "*" in origins:
            matchers: list[dict[str, Any]] = [{"safe_regex": {"regex": ".*"}}]
        elif origins:
            matchers = [{"exact": o} for o in origins]
        else:
            matchers = [{"safe_regex": {"regex": LOOPBACK_ORIGIN}}]
        return {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
            "allow_origin_string_match": matchers,
            "allow_methods": ", ".join(CORS_METHODS),
            "allow_headers": ", ".join(CORS_HEADERS),
            "expose_headers": ", ".join(CORS_EXPOSE),
            "max_age": str(CORS_MAX_AGE_S),
            # Keys travel in headers, never in cookies.
            "allow_credentials": False,
            "forward_not_matching_preflights": False,
        }


def _cors_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }


def _context_clusters(p: EnvoyPorts) -> list[dict[str, Any]]:
    return (
        [_cluster("context_grpc", p.grpc_host, p.context_port, http2=True)]
        if p.context_port
        else []
    )


def _context_routes(p: EnvoyPorts) -> list[dict[str, Any]]:
    """ContextEngine calls (native gRPC, and REST matched on its REST paths) go to the
    context engine's own process when it has one."""
    if not p.context_port:
        return []
    route = {"cluster": "context_grpc", "timeout": "0s"}
    return [
        {"match": {"prefix": "/cordum.v1.ContextEngine/", "grpc": {}}, "route": route},
        {"match": {"prefix": "/api/v1/context/"}, "route": route},
    ]


def _routes() -> list[dict[str, Any]]:
    no_transcoding = {
        "envoy.filters.http.grpc_json_transcoder": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        }
    }
    return [
        {
            "match": {"path": WS_PATH},
            "route": {"cluster": "gateway_ws", "timeout": "0s"},
            "typed_per_filter_config": no_transcoding,
        },
        # Native gRPC clients share the port.
        {
            "match": {"prefix": "/", "grpc": {}},
            "route": {"cluster": "gateway_grpc", "timeout": "0s"},
        },
        {
            "match": {"prefix": "/api/v1/"},
            "route": {"cluster": "gateway_grpc", "timeout": "0s"},
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "not found"}},
            "typed_per_filter_config": no_transcoding,
        },
    ]


def _openapi_route(document: Path) -> dict[str, Any]:
    return {
        "match": {
            "path": OPENAPI_PATH,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        # Read once at start-up; _openapi_reply_mapper keeps it unwrapped, as application/json.
        "direct_response": {"status": 200, "body": {"filename": str(document)}},
        # Not an RPC: the transcoder would answer 404 (reject_unknown_method).
        "typed_per_filter_config": {
            "envoy.filters.http.grpc_json_transcoder": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": True,
            }
        },
    }


def _json_local_replies() -> dict[str, Any]:
    # Envoy's own replies (unknown path, bad JSON, upstream down) become JSON shaped like
    # google.rpc.Status, except that `code` is the HTTP status.
    return {
        "body_format": {
            "json_format": {
                "code": "%RESPONSE_CODE%",
                "message": "%LOCAL_REPLY_BODY%",
                "details": "%RESPONSE_CODE_DETAILS%",
            },
            "content_type": "application/json",
        },
        "mappers": [_openapi_reply_mapper()],
    }


def _openapi_reply_mapper() -> dict[str, Any]:
    # A direct response is a local reply too: keep the document as it is, unwrapped.
    return {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "header_filter": {
                            "header": {"name": ":path", "string_match": {"prefix": OPENAPI_PATH}}
                        }
                    },
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 200, "runtime_key": "cordum.openapi"},
                            }
                        }
                    },
                ]
            }
        },
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _cluster(name: str, host: str, port: int, *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def default_config() -> EnvoyConfig:
    """The defaults as rendered into envoy/envoy.yaml (paths relative to the repo root)."""
    return EnvoyConfig(descriptor=REPO_DESCRIPTOR, services=tuple(api_services(REPO_DESCRIPTOR)))


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_path()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    group.add_argument("--validate", type=Path)
    args = parser.parse_args(argv)
    if args.validate:
        result = validate(args.validate)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    text = HEADER + default_config().render()
    if args.write:
        args.write.write_text(text)
        return 0
    if not args.check.exists() or args.check.read_text() != text:
        sys.stderr.write(f"{args.check} is stale; run 'make proto'\n")
        return 1
    return 0


HEADER = (
    "# Generated by `make proto` (python -m cordum.server.stack.envoy_config --write).\n"
    "# Default ports; `cordumctl up` and the tests render their own copy.\n"
    "# Run from the repository root: the descriptor path is relative.\n"
)

if __name__ == "__main__":
    sys.exit(main())
