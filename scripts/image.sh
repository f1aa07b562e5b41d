#!/usr/bin/env bash
# Builds the project's image, plus the two the tutorial's pod needs beside it, with no registry:
# - a Debian base image made from Debian's packages (debootstrap --variant=minbase of this host's
#   release, then `docker import`), cached as a tarball under $CARGO_TARGET_DIR (or target/)/docker-base;
# - the project's Dockerfile, built FROM that base (build arguments BUILD_IMAGE and RUNTIME_IMAGE;
#   the Dockerfile's defaults stay the public images), with a binary built on this host copied in
#   (prebuilt/amazing-proxy in a context of its own): the runtime stage is the shipped one. Tagged
#   as deploy/pod.yaml names it;
# - amazing-proxy-local/httpbin (Debian's httpbin under gunicorn on :80) and
#   amazing-proxy-local/pause (sleeps; holds a pod's namespaces as kubelet's pause image does).
# Usage: scripts/image.sh [--binary PATH]   (default: scripts/release.sh, then that binary)
# Uses the Docker daemon of scripts/docker.sh (started, and stopped at exit, when none runs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    *) echo "usage: scripts/image.sh [--binary PATH]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  echo "+ scripts/release.sh" >&2
  binary=$("$root/scripts/release.sh")
fi
[ -x "$binary" ] || { echo "image: $binary is not an executable; build it or pass --binary" >&2; exit 1; }

. "$root/scripts/docker.sh"
docker_up
trap docker_down EXIT

release=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
base="amazing-proxy-local/debian:$release-slim"
proxy_image=$(awk '/image: .*amazing-proxy/ {print $NF; exit}' deploy/pod.yaml)
[ -n "$proxy_image" ] || { echo "image: no amazing-proxy image named in deploy/pod.yaml" >&2; exit 1; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
  cache="$target/docker-base/$release-slim.tar"
  if [ ! -f "$cache" ]; then
    command -v debootstrap >/dev/null || "$root/scripts/deps.sh" --containers
    mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
      /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d "$target/debootstrap.XXXXXX")
    echo "image: debootstrap --variant=minbase $release from $mirror (once; cached in $cache)" >&2
    debootstrap --variant=minbase "$release" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
      echo "image: debootstrap failed; its log:" >&2; tail -n 30 "$rootfs.log" >&2
      rm -rf "$rootfs" "$rootfs.log"; exit 1; }
    # As the official slim images: no package cache, lists or docs, and none installed later
    # (dpkg's path-exclude), and apt's caches removed after each install.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
      "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
      "$rootfs"/usr/share/info/*
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
    printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
      'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' >"$rootfs/etc/apt/apt.conf.d/slim"
    mkdir -p "$(dirname "$cache")"
    tar -C "$rootfs" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
    rm -rf "$rootfs" "$rootfs.log"
  fi
  echo "+ docker import $cache $base" >&2
  docker import --change 'CMD ["bash"]' "$cache" "$base" >/dev/null
fi

context=$(mktemp -d)
trap 'rm -rf "$context"; docker_down' EXIT
cp Dockerfile "$context/"
install -D -m 0755 "$binary" "$context/prebuilt/amazing-proxy"
# Stripped here: the local build image (Debian's minbase) has no strip.
strip "$context/prebuilt/amazing-proxy"
echo "+ docker build --force-rm --network host --build-arg BUILD_IMAGE=$base --build-arg RUNTIME_IMAGE=$base -t $proxy_image $context (the Dockerfile and prebuilt/amazing-proxy)" >&2
docker build --force-rm --network host --build-arg "BUILD_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base" \
  -t "$proxy_image" "$context" >"$context/build.log" 2>&1 || {
  echo "image: docker build failed; its log:" >&2; tail -n 40 "$context/build.log" >&2; exit 1; }

echo "+ docker build --force-rm --network host -t amazing-proxy-local/httpbin - (Dockerfile on stdin)" >&2
docker build --force-rm --network host -t amazing-proxy-local/httpbin - >"$context/httpbin.log" 2>&1 <<EOF || {
FROM $base
# Debian's httpbin and gunicorn: everything in these images comes from Debian's packages.
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-httpbin gunicorn \\
 && rm -rf /var/lib/apt/lists/*
EXPOSE 80
CMD ["gunicorn", "-b", "0.0.0.0:80", "-w", "2", "httpbin:app"]
EOF
  echo "image: building the httpbin image failed; its log:" >&2; tail -n 40 "$context/httpbin.log" >&2; exit 1; }

echo "+ docker build --force-rm -t amazing-proxy-local/pause - (Dockerfile on stdin)" >&2
docker build --force-rm -t amazing-proxy-local/pause - >"$context/pause.log" 2>&1 <<EOF || {
FROM $base
# Nothing to stop gracefully: a pod's sandbox goes when its containers have.
STOPSIGNAL SIGKILL
CMD ["sleep", "infinity"]
EOF
  echo "image: building the pause image failed; its log:" >&2; tail -n 40 "$context/pause.log" >&2; exit 1; }

# Rebuilt images leave their predecessors untagged; in the project's own daemon, drop them.
if [ "${DOCKER_HOST:-}" = "unix://$docker_run_dir/docker.sock" ]; then
  docker image prune --force >/dev/null
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^($proxy_image|$base|amazing-proxy-local/httpbin:latest|amazing-proxy-local/pause:latest) " >&2
