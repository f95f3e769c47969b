# AL-Chat backend. Build: docker build -t al-chat .   (Podman: podman build --format docker ...,
# or the HEALTHCHECK below is dropped.)
# Run: docker run -p 5000:5000 --stop-timeout 40 -v al-chat-logs:/app/SessionLog al-chat
# The stop timeout must exceed SHUTDOWN_GRACE_SECS (30 s), the one budget in which in-flight
# requests finish and queued Papita records are sent; Docker's default of 10 s would cut it.
# Stage 1: build with the Rust toolchain (dependencies cached in their own layer).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Stub sources so the dependencies build (and cache) on their own. The manifest declares the
# benchmark target, so its file must exist too; the stub stays, benchmarks are not built here.
RUN mkdir -p src benches/harness && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/harness/main.rs \
    && cargo build --release --locked --bin al-chat \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin al-chat

# Stage 2: a slim runtime as a non-root user. No curl here: the HEALTHCHECK uses the binary.
FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive
# A fixed uid and gid (10001), so a bind-mounted log folder can be given to them on the host
# (chown 10001:10001 SessionLog) without clashing with a system group such as 999.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 alchat \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin alchat \
    && mkdir -p /app/SessionLog && chown -R 10001:10001 /app
COPY --from=build /src/target/release/al-chat /usr/local/bin/al-chat
WORKDIR /app
USER 10001:10001
ENV HOST=0.0.0.0 PORT=5000 AL_CHAT_LOG_DIR=/app/SessionLog LOG_FORMAT=json
EXPOSE 5000
VOLUME ["/app/SessionLog"]
# Liveness: the binary GETs its own /api/health (no curl in the image). Readiness (the log folder
# is writable) is GET /api/ready, for a load balancer; see Docs/DEPLOYMENT.md.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["al-chat", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["al-chat"]
