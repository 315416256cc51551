# syntax=docker/dockerfile:1
# tailweave: multi-stage build, small non-root runtime image.
#
#   docker build -t tailweave .
#   docker run --rm -p 4317:4317 -p 4318:4318 -p 14317:14317 -p 13133:13133 tailweave
#
# The build stage compiles only the binary; the runtime stage is distroless (glibc, CA
# certificates, no shell, no package manager) and runs as the `nonroot` user (uid 65532).

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and the build directory between builds, so a source
# change recompiles only what changed (no placeholder-manifest trick to keep in sync with the
# workspace's benches and tests).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tailweave-collector --bin tailweave \
    && cp target/release/tailweave /tailweave \
    && /tailweave --config pipelines.yaml validate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tailweave /usr/local/bin/tailweave
COPY pipelines.yaml /etc/tailweave/pipelines.yaml
USER nonroot:nonroot
# OTLP gRPC / HTTP (SDKs), DeepFlow ingest, /metrics, health.
EXPOSE 4317 4318 14317 8888 13133
# The default pipeline listens on 127.0.0.1; containers listen on every interface.
ENV TAILWEAVE_OTLP_GRPC=0.0.0.0:4317 \
    TAILWEAVE_OTLP_HTTP=0.0.0.0:4318 \
    TAILWEAVE_HEALTH=0.0.0.0:13133 \
    TAILWEAVE_METRICS=0.0.0.0:8888
ENTRYPOINT ["/usr/local/bin/tailweave"]
CMD ["--config", "/etc/tailweave/pipelines.yaml", "run"]
