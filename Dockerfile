# syntax=docker/dockerfile:1
# One image for every Ledgerflow role: /usr/local/bin/ledgerflow.
#   docker build -t ledgerflow .
#   docker run --rm ledgerflow migrate
#   docker run --rm -e DATABASE_URL=... ledgerflow run --roles api,admin
# The Helm chart (helm/ledgerflow) runs it as uid 10001 with a read-only root
# filesystem and an emptyDir at /tmp.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rdkafka builds its bundled librdkafka with the default features (`libz`,
# through librdkafka's own ./configure + make) plus `ssl` (openssl-sys). The
# rust:1-bookworm image already has gcc, make, pkg-config, libssl-dev and
# zlib1g-dev, so nothing is installed here. Add `cmake` if rdkafka's
# `cmake-build` feature is turned on, and `libsasl2-dev` for `gssapi`/SASL.

WORKDIR /src
COPY . .

# sqlx's query macros must not reach a database at build time: they read the
# committed .sqlx/ metadata instead (a no-op when no macro is used).
ENV SQLX_OFFLINE=true

# Cache mounts keep the registry and target/ between builds on the same
# builder; the binary is copied out of the mount so it lands in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ledgerflow-workers --bin ledgerflow \
 && install -D -m 0755 target/release/ledgerflow /out/ledgerflow

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to Kafka, Postgres and exchanges; libssl3: rdkafka's and
# the HTTP clients' OpenSSL. (Add libsasl2-2 if rdkafka gains SASL/GSSAPI.)
# Not version-pinned on purpose: each build takes bookworm's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*

# Fixed uid/gid 10001: the chart's securityContext runs as this user and
# Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 ledgerflow \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin ledgerflow

COPY --from=builder /out/ledgerflow /usr/local/bin/ledgerflow

USER 10001:10001
# 8080 public API + webhooks, 8081 admin API + console, 9090 ops
# (/healthcheck, /readyz, /metrics).
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/ledgerflow"]
CMD ["run"]
