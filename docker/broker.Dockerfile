# The KeelMQ broker image: keelmq-broker (entrypoint) and the keelmq CLI.
#
#   docker build -f docker/broker.Dockerfile -t keelmq/broker:0.1.0 .
#   docker run --rm -p 8081:8081 -p 8083:8083 -v keelmq-data:/var/lib/keelmq \
#     keelmq/broker:0.1.0 --auto-create-topics true
#
# keelmq/broker:<version> is the image a BrokerGroup runs when its spec names
# none: the operator of the same version picks it at every reconcile.
#
# Ports: 8081 client (RocketMQ 5 gRPC, TLS and plaintext), 8082 admin gRPC,
# 8083 HTTP (GET /healthz: the process is alive; GET /readyz: it serves
# clients, 503 until then, and a slave only while it follows its master in
# sync; GET /prestop: a stopping master's wait for the operator's hand-over;
# GET /metrics: Prometheus), 10912 replication.
# The operator's StatefulSet points its liveness probe at :8083/healthz and
# its readiness probe at :8083/readyz, mounts the broker's ConfigMap at
# /etc/keelmq (KEELMQ_CONFIG=/etc/keelmq/broker.toml) and its volume claim at
# /var/lib/keelmq. No HEALTHCHECK: Kubernetes probes replace it. The broker
# writes nothing outside its data directory (its generated TLS material goes
# to /var/lib/keelmq/tls), so the operator runs it with a read-only root
# filesystem.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: Cargo needs every member's manifest to resolve the
# lock file. .dockerignore keeps target/, .git/ and the like out.
COPY . .
# One plain RUN, no cache mounts: the file builds with the classic builder,
# BuildKit, Podman/Buildah and Kaniko alike.
RUN cargo build --release --locked -p keelmq-broker --bin keelmq-broker --bin keelmq \
 && mkdir -p /out/bin /out/data \
 && cp target/release/keelmq-broker target/release/keelmq /out/bin/

# glibc runtime of the same Debian release as the builder, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/bin/keelmq-broker /usr/local/bin/keelmq-broker
COPY --from=builder /out/bin/keelmq /usr/local/bin/keelmq
# An empty data directory owned by the broker's user. A Docker named volume
# copies it on first use, so `docker run -v name:/var/lib/keelmq` is writable
# for uid 65532. A Kubernetes PersistentVolume mounted here hides it: the
# volume's root belongs to whoever formatted it (often root, mode 0755), so
# the operator gives broker pods fsGroup 65532 and the kubelet makes the
# volume group-writable. Without an fsGroup such a volume is not writable.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/keelmq
ENV KEELMQ_DATA_DIR=/var/lib/keelmq \
    KEELMQ_LISTEN_ADDRESS=0.0.0.0
USER 65532:65532
VOLUME /var/lib/keelmq
EXPOSE 8081 8082 8083 10912
ENTRYPOINT ["/usr/local/bin/keelmq-broker"]
