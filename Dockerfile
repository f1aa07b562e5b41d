# syntax=docker/dockerfile:1
# One image for both injected containers: `amazing-proxy init` (needs iptables, ip6tables and nft;
# runs as root with NET_ADMIN and NET_RAW, set by the pod spec) and `amazing-proxy run` (the
# sidecar, uid 1337). The webhook runs from it too.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds; the binary is copied out of
# the cached target dir because the mount is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin amazing-proxy \
 && install -D -m 0755 target/release/amazing-proxy /out/amazing-proxy

# The same Debian release as the build stage, so the binary finds the glibc it was linked against.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# iptables provides iptables and ip6tables (nft and legacy backends); nftables provides nft.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/amazing-proxy /usr/local/bin/amazing-proxy
# Numeric, so that kubelet can check runAsNonRoot without a passwd entry.
USER 1337:1337
EXPOSE 8000 15000 15001
ENTRYPOINT ["/usr/local/bin/amazing-proxy"]
CMD ["run"]
LABEL org.opencontainers.image.title="amazing-proxy" \
      org.opencontainers.image.description="A small, fast sidecar proxy for Kubernetes"
