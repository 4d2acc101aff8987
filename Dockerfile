# syntax=docker/dockerfile:1
# keymux: the LLM API key rotation sidecar.
#
#   docker build -t keymux .
#   docker run --rm -v "$PWD/config.yaml:/etc/keymux/config.yaml:ro" -p 127.0.0.1:9464:9464 keymux
#   docker run --rm -v "$PWD/config.yaml:/etc/keymux/config.yaml:ro" keymux check-config /etc/keymux/config.yaml
#
# tests/test_deploy.py runs this file's build-stage steps in a fresh virtualenv and starts the
# result, so keep them to ENV, WORKDIR, COPY and RUN with paths taken from $VENV.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV VENV=/opt/keymux \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore lets in only what the package needs: pyproject.toml, README.md, sidecar/.
COPY . .
# Runtime dependencies only: no extras (the test tools and uvloop stay out of the image).
RUN python -m venv "$VENV" \
    && "$VENV/bin/pip" install . \
    && "$VENV/bin/keymux" --version

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/keymux/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/keymux /opt/keymux
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 keymux \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin keymux
USER 10001:10001
# 4000: the app listener (bind it to 127.0.0.1 in a pod); 9464: /healthz, /readyz, /metrics, /keys.
EXPOSE 4000 9464
# keymux drains on SIGTERM: /readyz turns 503, requests in flight finish, then it exits 0.
STOPSIGNAL SIGTERM
# With no arguments keymux reads $KEYMUX_CONFIG, else /etc/keymux/config.yaml.
ENTRYPOINT ["/opt/keymux/bin/keymux"]
