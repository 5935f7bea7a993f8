# syntax=docker/dockerfile:1
#
# sample-app: the demo's application (HTTP/1.1, h2c, gRPC echo; see
# examples/src/bin/sample-app.rs). It knows nothing of the mesh.
#
#   docker build -f docker/sample-app.Dockerfile -t remora-sample-app .     (from the repo root)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remora-examples --bin sample-app \
    && install -m 0755 target/release/sample-app /usr/local/bin/sample-app

FROM debian:bookworm-slim
RUN groupadd --gid 10002 app \
    && useradd --uid 10002 --gid 10002 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /usr/local/bin/sample-app /usr/local/bin/sample-app
EXPOSE 8080
USER 10002:10002
ENTRYPOINT ["sample-app"]
CMD ["--name", "app", "--version", "v1", "--listen", "0.0.0.0:8080"]
