# syntax=docker/dockerfile:1
#
# session-proxy container image.
#
#   docker build -t session-proxy:latest .
#   docker run --rm -p 8080:8080 session-proxy:latest demo --listen 0.0.0.0:8080
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#       -e SESSION_PROXY_UPSTREAM=http://app:3000 \
#       -e SESSION_PROXY_STORE=redis://:password@redis:6379/0 \
#       session-proxy:latest
#
# Configuration comes from flags, SESSION_PROXY_* environment variables or a file
# given with `--config` (mount it read-only, e.g. at /etc/session-proxy/proxy.yaml).

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# 1. Dependencies only, so that this layer stays cached until Cargo.toml or
#    Cargo.lock change. Placeholder sources stand in for the crate's own code;
#    explicitly declared [[bench]]/[[test]]/[[example]] targets get an empty
#    placeholder too (kept for step 2), or cargo would refuse the manifest.
COPY Cargo.toml Cargo.lock ./
RUN set -eux; \
    mkdir -p src; \
    echo 'fn main() {}' > src/main.rs; \
    : > src/lib.rs; \
    awk ' \
        /^\[\[bench\]\]/ { dir = "benches"; next } \
        /^\[\[test\]\]/ { dir = "tests"; next } \
        /^\[\[example\]\]/ { dir = "examples"; next } \
        /^\[/ { dir = ""; next } \
        dir != "" && $1 == "name" { split($0, a, "\""); print dir "/" a[2] ".rs" } \
        dir != "" && $1 == "path" { split($0, a, "\""); print a[2] } \
    ' Cargo.toml | while read -r f; do mkdir -p "$(dirname "$f")"; echo 'fn main() {}' > "$f"; done; \
    cargo build --release --locked; \
    rm -rf src

# 2. The crate itself. COPY keeps the files' original modification times, which
#    may be older than the placeholder build above, so touch them and drop the
#    placeholder's artefacts: cargo must rebuild the crate, not reuse the stub.
COPY src ./src
RUN set -eux; \
    touch src/main.rs src/lib.rs; \
    rm -rf target/release/.fingerprint/session-proxy-* \
           target/release/deps/session_proxy-* \
           target/release/deps/libsession_proxy-* \
           target/release/session-proxy; \
    cargo build --release --locked --bin session-proxy; \
    install -D -m 0755 target/release/session-proxy /out/session-proxy

# ---------------------------------------------------------------------------
# Runtime stage: glibc + libgcc only, no shell, no package manager.
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /out/session-proxy /usr/local/bin/session-proxy

# The built-in defaults bind to 127.0.0.1, which is unreachable from outside a
# container; listen on all interfaces instead (flags, --config or other
# SESSION_PROXY_* variables still override these).
ENV SESSION_PROXY_LISTEN=0.0.0.0:8080 \
    SESSION_PROXY_ADMIN_LISTEN=0.0.0.0:9901

# 65532 is distroless' "nonroot" user; numeric so that Kubernetes' runAsNonRoot
# can verify it without reading /etc/passwd.
USER 65532:65532

# 8080: client traffic (listen). 9901: /healthz, /readyz, /metrics, /sessions (admin_listen).
EXPOSE 8080 9901

# SIGTERM starts the graceful shutdown (shutdown.drain_delay, then shutdown.timeout).
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/session-proxy"]
