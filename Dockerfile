# syntax=docker/dockerfile:1
#
# One image for both halves of kafka-retry-operator:
#   - the operator (default command):   kafka-retry-operator ...
#   - the tier workers and the CLI:     kafka-retry worker ... / kafka-retry dlq ...
#
# Stage 1 builds the project's wheel; stage 2 installs that wheel (and only it, with its
# dependencies) into a virtual environment on a slim base. Nothing of the source tree, the
# build tools or pip's caches reaches the final image.
#
# The runtime image is meant to run as a fixed non-root UID with a read-only root filesystem
# (the Helm chart sets both): Python writes no bytecode at run time (it is compiled at install
# time), HOME and TMPDIR point at /tmp, which the chart mounts as an emptyDir.
#
# tests/test_image_contents.py replays these steps without a Docker engine: it builds the
# wheel from exactly the files COPY'd below (honouring .dockerignore), installs it into a
# fresh venv the same way, and runs both entry points as UID 65532 on a read-only tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- build the wheel
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is made of (see also .dockerignore, which allow-lists the same paths).
COPY pyproject.toml README.md ./
COPY workers/ workers/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=65532
ENV VIRTUAL_ENV=/opt/kafka-retry \
    PATH=/opt/kafka-retry/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    TMPDIR=/tmp

# A named account for the fixed UID, so tools that look up the user name find one; the
# chart still sets runAsUser/runAsGroup numerically.
RUN groupadd --system --gid "${UID}" nonroot \
 && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin nonroot

# Install the wheel (bind-mounted from the builder, so it never lands in a layer) with its
# dependencies into a venv; pip compiles the bytecode now, since the root filesystem is
# read-only at run time. pip itself is then removed from the venv: nothing installs later.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python -m venv "${VIRTUAL_ENV}" \
 && "${VIRTUAL_ENV}/bin/pip" install --no-cache-dir --compile /dist/*.whl \
 && "${VIRTUAL_ENV}/bin/pip" uninstall --yes pip

USER ${UID}:${UID}
WORKDIR /tmp

# 8080: kopf liveness probe (/healthz); 9400: Prometheus metrics (operator and workers).
EXPOSE 8080 9400

LABEL org.opencontainers.image.title="kafka-retry-operator" \
      org.opencontainers.image.description="Kafka retry tiers, delays and DLQ for Kubernetes: operator and tier workers" \
      org.opencontainers.image.licenses="Apache-2.0"

# Tier workers override the command: ["kafka-retry", "worker", ...].
CMD ["kafka-retry-operator"]
