# syntax=docker/dockerfile:1.7
# Operator image: the control plane only (`operator` extra: kopf, kubernetes, pydantic, prometheus-client).
# No torch, no nnU-Net: the operator renders trainer command lines and never runs them.
#
#   docker build -t nnunet-distill-operator:0.1.0 .
#
# Two stages so that the runtime image holds installed packages only: the build stage turns the repository
# and every dependency of the `operator` extra into wheels, the runtime stage installs those wheels offline.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the distribution needs to build; .dockerignore keeps tests, venvs and data out of the context.
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer_image/nnunet_distill ./trainer_image/nnunet_distill
# The versions come from pyproject.toml (the `operator` extra pins them); `pip wheel` resolves them once here.
RUN pip wheel --wheel-dir /wheels ".[operator]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nnunet-distill-operator" \
      org.opencontainers.image.description="Kubernetes operator distilling nnU-Net teacher ensembles into small ONNX students" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/nnunet-distill/nnunet-distill"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# Installed from the wheels of the first stage only (--no-index): the runtime stage never reaches a registry,
# and the version is pinned to the one just built. The python -c command fails the build if torch slipped in.
# COPY, not `RUN --mount=type=bind,from=wheels`: buildah's layer cache keys such a RUN by its text alone, not by
# the mounted stage's files (containers/buildah#4522, #6609), so a rebuild after a code change silently reused
# the layer with the old operator in it. COPY is keyed by the files' digest. The cost: the wheels (~16 MB) stay
# in the COPY layer below the RUN that deletes them.
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels "nnunet-distill[operator]==${VERSION}" \
    && rm -rf /tmp/wheels \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'nnunetv2')))" \
    && nnunet-distill-operator --help > /dev/null \
    && groupadd --gid 10001 nnunet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nnunet
# Numeric UID so that `runAsNonRoot: true` can be verified by the kubelet without a passwd lookup.
USER 10001:10001
WORKDIR /tmp
# 8080: kopf liveness (/healthz); 9100: Prometheus /metrics. The chart passes both ports explicitly.
EXPOSE 8080 9100
ENTRYPOINT ["nnunet-distill-operator"]
CMD ["--all-namespaces", "--liveness-port", "8080", "--metrics-port", "9100"]
