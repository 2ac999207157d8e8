# A public relay and dataset node: routes for peers behind NAT, the DHT, a run's config and
# its packed dataset. No torch and no GPU: the core set of the lock only.
#
#   docker build -f deploy/relay.Dockerfile -t dandelion-relay .
#   docker run -d --name dandelion-relay -p 4001:4001 -v dandelion-relay:/data \
#       dandelion-relay daemon --relay --listen /ip4/0.0.0.0/tcp/4001 \
#       --announce /ip4/<public ip>/tcp/4001
#
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
COPY requirements-core.lock pyproject.toml README.md ./
COPY dandelion_p2p ./dandelion_p2p
RUN python -m venv /opt/dandelion \
    && /opt/dandelion/bin/pip install --no-cache-dir -r requirements-core.lock \
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
    PYTHONUNBUFFERED=1

USER 10001
# The identity key, the DHT's records, the lease book (SQLite) and the dataset live here:
# keep the volume, or the node comes back as a stranger with an empty lease book.
VOLUME ["/data"]
EXPOSE 4001/tcp

# The control socket answers only while the daemon runs and serves.
HEALTHCHECK --interval=60s --timeout=15s --start-period=60s \
    CMD ["dandelion-p2p", "status"]

ENTRYPOINT ["dandelion-p2p"]
CMD ["daemon", "--relay", "--no-worker", "--listen", "/ip4/0.0.0.0/tcp/4001"]
