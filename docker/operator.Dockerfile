# The KeelMQ operator image: keelmq-operator.
#
#   docker build -f docker/operator.Dockerfile -t keelmq/operator:0.1.0 .
#
# Port 8080 serves GET /healthz (the process runs), GET /readyz (it holds the
# leader Lease, or runs without election, and its controllers run; a standby
# replica answers 503) and GET /metrics (Prometheus). The Helm chart wires its
# liveness and readiness probes to these. No HEALTHCHECK: Kubernetes probes
# replace it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# One plain RUN, no cache mounts: the file builds with the classic builder,
# BuildKit, Podman/Buildah and Kaniko alike.
RUN cargo build --release --locked -p keelmq-operator --bin keelmq-operator \
 && mkdir -p /out/bin \
 && cp target/release/keelmq-operator /out/bin/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/bin/keelmq-operator /usr/local/bin/keelmq-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keelmq-operator"]
CMD ["run"]
