# Multi-stage build: a release binary on a slim runtime, run as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY tests ./tests
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin kafka-eos-proxy

FROM debian:bookworm-slim
# libssl3: librdkafka's TLS for the audit topic's producer; ca-certificates: the system roots used when
# upstream.tls has no ca_file.
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kafka-eos-proxy \
 && mkdir -p /etc/kafka-eos-proxy
COPY --from=build /src/target/release/kafka-eos-proxy /usr/local/bin/kafka-eos-proxy
# The example config binds 127.0.0.1; mount your own at this path (bind_host 0.0.0.0 in a container).
COPY config/proxy.yaml /etc/kafka-eos-proxy/proxy.yaml
USER kafka-eos-proxy
EXPOSE 9092 9100-9199 9190
ENTRYPOINT ["/usr/local/bin/kafka-eos-proxy"]
CMD ["run", "--config", "/etc/kafka-eos-proxy/proxy.yaml"]
