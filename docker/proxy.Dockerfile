# syntax=docker/dockerfile:1
#
# remora-proxy: the sidecar (`remora-proxy run`, as UID 1337) and, from the same
# image, the init step that installs the iptables rules (`remora-proxy init` or
# the `remora-init` entrypoint, as root with NET_ADMIN and NET_RAW).
#
#   docker build -f docker/proxy.Dockerfile -t remora-proxy .     (from the repo root)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remora-proxy \
    && install -m 0755 target/release/remora-proxy /usr/local/bin/remora-proxy

FROM debian:bookworm-slim
# iptables for the init step; ca-certificates for an HTTPS collector.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 remora \
    && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin remora
COPY --from=build /usr/local/bin/remora-proxy /usr/local/bin/remora-proxy
COPY docker/init.sh /usr/local/bin/remora-init
# outbound, inbound, health and metrics (admin 15000 listens on 127.0.0.1 only)
EXPOSE 15001 15006 15020
# The iptables rules exempt this UID's traffic; the proxy must run as it.
USER 1337:1337
ENTRYPOINT ["remora-proxy"]
CMD ["run"]
