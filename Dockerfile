# Multi-stage build: compile in the Rust image, run in a slim Debian.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# make: tikv-jemalloc-sys builds jemalloc from source.
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 notifier
COPY --from=build /src/target/release/wechat-notifier /usr/local/bin/wechat-notifier
USER notifier
EXPOSE 9090
ENTRYPOINT ["wechat-notifier"]
CMD ["run"]
