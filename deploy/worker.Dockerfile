# A training peer on an NVIDIA GPU: the daemon plus the torch worker it starts.
#
#   docker build -f deploy/worker.Dockerfile -t dandelion-worker .
#   docker run -d --name dandelion --gpus all --network host -v dandelion:/data \
#       dandelion-worker join /ip4/<relay ip>/tcp/4001/p2p/<relay peer id> --run <run id>
#
# The host needs the NVIDIA driver and the NVIDIA Container Toolkit; the image brings CUDA
# itself (torch's Linux wheels from PyPI carry the CUDA runtime as nvidia-* packages).
# --network host lets the web UI (127.0.0.1:4080) and hole punching see the host's network.
# See docs/quickstart.md. The build context is the repository root.

FROM python:3.11-slim-bookworm AS build

# fastecdsa (a py-libp2p dependency) ships no wheel for Linux: it is compiled against GMP.
# Debian replaces package versions within a release, so exact apt pins would break the build
# whenever the mirror moves on; the base image's tag fixes the release instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY Makefile requirements-train.lock pyproject.toml README.md ./
COPY dandelion_p2p ./dandelion_p2p
# torch first, at the Makefile's pin: from PyPI on Linux that is the CUDA build, and the
# lock's torch line (the same release) then finds it installed.
RUN python -m venv /opt/dandelion \
    && TORCH_PIN="$(sed -n 's/^TORCH_PIN ?= //p' Makefile)" \
    && test -n "$TORCH_PIN" \
    && /opt/dandelion/bin/pip install --no-cache-dir "$TORCH_PIN" \
    && /opt/dandelion/bin/pip install --no-cache-dir -r requirements-train.lock \
    && /opt/dandelion/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim-bookworm

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgmp10 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 dandelion \
    && mkdir /data && chown dandelion /data

COPY --from=build /opt/dandelion /opt/dandelion
ENV PATH=/opt/dandelion/bin:$PATH \
    DANDELION_DATA_DIR=/data \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001
# The identity key, checkpoints, the latent cache and exports live here: keep the volume, or a
# restarted peer starts over as a stranger.
VOLUME ["/data"]

HEALTHCHECK --interval=60s --timeout=15s --start-period=120s \
    CMD ["dandelion-p2p", "status"]

ENTRYPOINT ["dandelion-p2p"]
CMD ["--help"]
