# syntax=docker/dockerfile:1
# Multi-stage build: a cached dependency layer, then the sources, then a small non-root runtime.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when the manifests change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked \
    && rm -rf src benches

COPY config ./config
COPY benches ./benches
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -m 0755 target/release/skypostal-proxy /usr/local/bin/skypostal-proxy

# distroless/cc: glibc, CA certificates for the partner's TLS, no shell, a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/skypostal-proxy /usr/local/bin/skypostal-proxy

# Configuration comes from the environment and mounted files (SKYPOSTAL_PROXY_CONFIG,
# upstream.app_key_file); these defaults suit a container.
# MIMALLOC_PURGE_DELAY: return freed memory to the OS after 1 s rather than 10 ms; the frequent
# purges showed as tail latency under load (see BENCHMARKS.md).
ENV SKYPOSTAL_PROXY__SERVER__LISTEN=0.0.0.0:8080 \
    SKYPOSTAL_PROXY__LOG__FORMAT=json \
    MIMALLOC_PURGE_DELAY=1000

USER 65532:65532
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/skypostal-proxy", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/skypostal-proxy"]
CMD ["serve"]
