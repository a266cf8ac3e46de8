# Build stage: the same build as the README (`cargo build --release`).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin manifold

# Runtime stage: a small Debian with just the binary.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data manifold && mkdir -p /data /etc/manifold && chown manifold /data
COPY --from=build /src/target/release/manifold /usr/local/bin/manifold
COPY configs/standalone.toml /etc/manifold/manifold.toml
# Listen on all interfaces inside the container, data on the volume.
RUN sed -i -e 's|^data_dir = .*|data_dir = "/data"|' -e 's|^listen = "127.0.0.1:8080"|listen = "0.0.0.0:8080"|' /etc/manifold/manifold.toml
USER manifold
VOLUME ["/data"]
WORKDIR /data
EXPOSE 9092 1883 8083 5672 8080
ENTRYPOINT ["manifold"]
CMD ["serve", "--config", "/etc/manifold/manifold.toml"]
