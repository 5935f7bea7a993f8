# syntax=docker/dockerfile:1
#
# remora-control: the control plane (`serve`) and the operator's CLI.
#
#   docker build -f docker/control-plane.Dockerfile -t remora-control .     (from the repo root)

FROM rust:1-bookworm AS build
WORKDIR /src
# protoc: the etcd client (`serve --store etcd`) compiles etcd's protos.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remora-control \
    && install -m 0755 target/release/remora-control /usr/local/bin/remora-control

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 remora \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin remora \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/remora
COPY --from=build /usr/local/bin/remora-control /usr/local/bin/remora-control
# The policy store, the CA and the admin token; trust-bundle.pem is written here too.
VOLUME /var/lib/remora
ENV REMORA_DATA_DIR=/var/lib/remora
# gRPC over TLS (discovery, identity, admin); HTTP /metrics, /ready, /live
EXPOSE 15012 15014
USER 10001:10001
ENTRYPOINT ["remora-control"]
CMD ["serve", "--listen", "0.0.0.0:15012", "--http-listen", "0.0.0.0:15014", "--data-dir", "/var/lib/remora", "--server-name", "control-plane"]
