# AL-Chat backend. Build: docker build -t al-chat .   Run: docker run -p 5000:5000 al-chat
# Stage 1: build with the Rust toolchain (dependencies cached in their own layer).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Stub sources so the dependencies build (and cache) on their own. The manifest declares the
# benchmark target, so its file must exist too; the stub stays, benchmarks are not built here.
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/harness.rs \
    && cargo build --release --locked --bin al-chat \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin al-chat

# Stage 2: a slim runtime as a non-root user. No curl here: the HEALTHCHECK uses the binary.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin alchat \
    && mkdir -p /app/SessionLog && chown -R alchat /app
COPY --from=build /src/target/release/al-chat /usr/local/bin/al-chat
WORKDIR /app
USER alchat
ENV HOST=0.0.0.0 PORT=5000 AL_CHAT_LOG_DIR=/app/SessionLog LOG_FORMAT=json
EXPOSE 5000
VOLUME ["/app/SessionLog"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["al-chat", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["al-chat"]
