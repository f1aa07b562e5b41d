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
# Shipped without its line tables (scripts/release.sh keeps them for profiling): 12 MB, not 56.
RUN if [ -f prebuilt/amazing-proxy ]; then \
      install -D -m 0755 prebuilt/amazing-proxy /out/amazing-proxy; \
    else \
      install -D -m 0755 "$(scripts/release.sh)" /out/amazing-proxy; \
    fi; \
    if command -v strip >/dev/null; then strip /out/amazing-proxy; fi

# What `init` runs, gathered from Debian's packages: iptables and ip6tables (the nf_tables and
# legacy backends: xtables-*-multi under every name init looks for), nft, the shared libraries they
# link (ldd), the xtables extensions they load at run time, and /run for iptables' lock. Nothing
# else: the proxy itself is static (scripts/release.sh).
FROM ${RUNTIME_IMAGE} AS tools
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# The proxy is static when built by scripts/release.sh; a dynamically linked one (a test's debug
# build) brings its libraries along the same way.
COPY --from=build /out/amazing-proxy /tmp/amazing-proxy
RUN set -eu; \
    mkdir -p /rootfs/usr/sbin /rootfs/run /rootfs/tmp /rootfs/etc; \
    chmod 1777 /rootfs/tmp; \
    cp -a /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/nft /rootfs/usr/sbin/; \
    for family in iptables ip6tables; do \
      for backend in nft legacy; do \
        for tool in "" -save -restore; do \
          ln -s "xtables-$backend-multi" "/rootfs/usr/sbin/$family-$backend$tool"; \
        done; \
      done; \
      for tool in "" -save -restore; do ln -s "xtables-nft-multi" "/rootfs/usr/sbin/$family$tool"; done; \
    done; \
    extensions=$(dirname "$(ls -d /usr/lib/*/xtables/libxt_mark.so)"); \
    cp -a --parents "$extensions" /rootfs/; \
    { ldd /tmp/amazing-proxy || true; \
      ldd /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/nft "$extensions"/*.so; } \
      | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(/ {print $1}' | sort -u \
      | while read -r lib; do cp -L --parents "$lib" /rootfs/; done; \
    for f in /etc/protocols /etc/services /etc/ethertypes; do [ ! -f "$f" ] || cp "$f" /rootfs/etc/; done

# The runtime image: the files above and the proxy.
FROM scratch AS runtime
COPY --from=tools /rootfs /
COPY --from=build /out/amazing-proxy /usr/local/bin/amazing-proxy
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Numeric, so that kubelet can check runAsNonRoot without a passwd entry.
USER 1337:1337
EXPOSE 8000 15000 15001
ENTRYPOINT ["/usr/local/bin/amazing-proxy"]
CMD ["run"]
LABEL org.opencontainers.image.title="amazing-proxy" \
      org.opencontainers.image.description="A small, fast sidecar proxy for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
