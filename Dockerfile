# syntax=docker/dockerfile:1
# tally's container image: the one binary on Debian slim, run as an unprivileged user with
# its data on a volume. Tested without a Docker engine by crates/tally/tests/deploy.rs,
# which reads the final stage (ENV, USER, ENTRYPOINT, CMD, HEALTHCHECK, VOLUME, EXPOSE),
# runs its command as that user with that environment, probes it with the health check
# and stops it with the stop signal; hadolint lints this file in the same test.
#
#   docker build -t tally .
#   docker run -d --name tally -p 8080:8080 -v tally-data:/data tally
#   docker exec tally tally keys create --file /data/keys.json --scope write
#
# Every setting of the README's table is an environment variable TALLY_<KEY>, the key in
# upper case (-e TALLY_LISTEN=…), or a TOML file: mount it, run `serve --config FILE`.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary is copied
# out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tally \
    && cp target/release/tally /usr/local/bin/tally

FROM debian:bookworm-slim
# Only CA certificates beyond the base: the binary links to libc, libm, libgcc_s and libz,
# all of which the slim image has (deploy.rs checks the binary's libraries against them).
# Package versions are not pinned: the base image's tag already pins the Debian release,
# and its security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=builder /usr/local/bin/tally /usr/local/bin/tally
# A numeric user, so that Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
# Listening beyond loopback makes API keys required: they live on the volume, created with
# `tally keys create --file /data/keys.json` (until then every data route answers 401).
# TALLY_SERVER is where `tally health` and the other client commands run inside the
# container find the server: change it with TALLY_LISTEN's port.
ENV TALLY_LISTEN=0.0.0.0:8080 \
    TALLY_DATA_DIR=/data \
    TALLY_KEYS_FILE=/data/keys.json \
    TALLY_SERVER=http://127.0.0.1:8080
VOLUME /data
EXPOSE 8080
# SIGTERM drains requests (shutdown_drain_ms, 10 s) and flushes; give `docker stop` time
# for it: `docker stop -t 90` (see deploy/tally.service for the measured bound).
STOPSIGNAL SIGTERM
# /healthz (alive) answers while the log is replayed after a restart, so the start period
# only has to cover the process starting; `tally health --ready` asks /readyz instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["tally", "health"]
ENTRYPOINT ["tally"]
CMD ["serve"]
