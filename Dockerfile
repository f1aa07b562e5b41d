# One image for both injected containers: `amazing-proxy init` (needs iptables, ip6tables and nft;
# runs as root with NET_ADMIN and NET_RAW, set by the pod spec) and `amazing-proxy run` (the
# sidecar, uid 1337). The webhook runs from it too.
#
#   docker build -t ghcr.io/amazing-proxy/amazing-proxy:0.1.0 .
#
# Works with the classic builder and BuildKit alike (no frontend image to pull). The base images
# are build arguments, so that a machine without a registry can bring its own (scripts/image.sh
# builds them from Debian's packages); a binary already built on a host of the same Debian release
# can be put at prebuilt/amazing-proxy in the context instead of compiling it here.

ARG BUILD_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN if [ -f prebuilt/amazing-proxy ]; then \
      install -D -m 0755 prebuilt/amazing-proxy /out/amazing-proxy; \
    else \
      install -D -m 0755 "$(scripts/release.sh)" /out/amazing-proxy; \
    fi

# The binary is static (scripts/release.sh); Debian for iptables and nft, which `init` runs.
FROM ${RUNTIME_IMAGE} AS runtime
# iptables provides iptables and ip6tables (nft and legacy backends); nftables provides nft.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/amazing-proxy /usr/local/bin/amazing-proxy
# Numeric, so that kubelet can check runAsNonRoot without a passwd entry.
USER 1337:1337
EXPOSE 8000 15000 15001
ENTRYPOINT ["/usr/local/bin/amazing-proxy"]
CMD ["run"]
LABEL org.opencontainers.image.title="amazing-proxy" \
      org.opencontainers.image.description="A small, fast sidecar proxy for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
