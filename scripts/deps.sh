#!/usr/bin/env bash
# Installs what the demo needs on Debian, and with options what the tests need. Idempotent: a
# second run only checks.
#   scripts/deps.sh               the demo: iptables, nftables, iproute2, procps, curl, util-linux,
#                                 python3, python3-venv (apt) and a venv target/venv
#                                 with httpbin and gunicorn
#   scripts/deps.sh --containers  also what `scripts/demo.sh --containers` and scripts/image.sh use:
#                                 docker.io, debootstrap and python3-yaml (apt)
#   scripts/deps.sh --tests       everything the tests use: the above, redis-server,
#                                 mariadb-server, dnsmasq-base (apt; the tests start their
#                                 own servers; dnsmasq-base is Debian's dnsmasq without the
#                                 system service), tcpdump (the mTLS test's capture), tmux
#                                 (the terminal `top` is tested in), prometheus (it scrapes
#                                 --metrics-compat istio), and
#                                 kubernetes-validate, grpcio and h2 (the routes tests) and
#                                 opentelemetry-proto (the traces test's receiver) in the venv
# Servers that this script installs are neither started nor left enabled at boot: packages are
# installed under a policy-rc.d that forbids starting services (unless the machine already has
# one), and their services are disabled afterwards (systemctl, or update-rc.d without systemd).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

containers=0; tests=0
for arg in "$@"; do
  case "$arg" in
    --containers) containers=1 ;;
    --tests) containers=1; tests=1 ;;
    *) echo "usage: scripts/deps.sh [--containers|--tests]" >&2; exit 2 ;;
  esac
done

pkgs=(iptables nftables iproute2 procps curl util-linux python3 python3-venv)
[ $containers -eq 1 ] && pkgs+=(docker.io debootstrap python3-yaml)
[ $tests -eq 1 ] && pkgs+=(redis-server mariadb-server dnsmasq-base tcpdump tmux prometheus)
# The services each server package brings (Debian's names), to keep them off.
services_of() {
  case "$1" in
    redis-server) echo redis-server ;;
    mariadb-server) echo mariadb ;;
    prometheus) echo prometheus ;;
    docker.io) echo docker docker.socket containerd ;;
  esac
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# Stops and disables the services of the packages this run installed (also after a failed install:
# what did get installed must not be left running or enabled).
keep_off() {
  local p svc
  for p in "${missing[@]}"; do
    installed "$p" || continue
    for svc in $(services_of "$p"); do
      if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
      else
        $sudo service "${svc%.socket}" stop >/dev/null 2>&1 || true
        [ -e "/etc/init.d/$svc" ] && { $sudo update-rc.d "$svc" disable >/dev/null 2>&1 || true; }
      fi
    done
  done
}

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: apt-get install ${missing[*]}" >&2
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    # Exit status 101: "action forbidden"; invoke-rc.d and deb-systemd-invoke then start nothing.
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 0755 "$policy"
    trap '$sudo rm -f "$policy"' EXIT
  fi
  log=$(mktemp)
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "deps: apt-get failed; its last lines:" >&2; tail -n 30 "$log" >&2; rm -f "$log"
    keep_off; exit 1
  fi
  rm -f "$log"
  keep_off
fi

venv="$root/target/venv"
modules=(httpbin gunicorn); wheels=(httpbin==0.10.4 Flask==3.1.3 Werkzeug==3.1.9 gunicorn==27.0.1)
# The routes tests' endpoints and apps (tests/fixtures/routes_apps): grpcio for gRPC, h2 for h2c;
# opentelemetry-proto for the traces test's OTLP receiver (tests/fixtures/otlp_receiver.py).
if [ $tests -eq 1 ]; then
  modules+=(kubernetes_validate grpc h2 opentelemetry.proto)
  wheels+=(kubernetes-validate==1.37.0 grpcio==1.76.0 h2==4.3.0 opentelemetry-proto==1.45.2 protobuf==7.36.2)
fi
if ! "$venv/bin/python" -c "import $(IFS=,; echo "${modules[*]}")" 2>/dev/null; then
  echo "deps: pip install into $venv: ${wheels[*]}" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
fi
