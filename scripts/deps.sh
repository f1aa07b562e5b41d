#!/usr/bin/env bash
# Installs what the demo and the tests need on Debian: packet-filter tools, the servers the
# protocol tests talk to, and a Python venv (target/venv) with httpbin, gunicorn and
# kubernetes-validate. Idempotent: a second run only checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

pkgs=(iptables nftables iproute2 procps curl util-linux python3 python3-venv redis-server mariadb-server)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the servers it installs; the tests start their own on free ports.
  for svc in redis-server mariadb; do $sudo service "$svc" stop >/dev/null 2>&1 || true; done
fi

venv="$root/target/venv"
if ! "$venv/bin/python" -c 'import httpbin, gunicorn, kubernetes_validate' 2>/dev/null; then
  echo "deps: creating $venv (httpbin, gunicorn, kubernetes-validate)" >&2
  mkdir -p "$root/target"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    httpbin==0.10.4 Flask==3.1.3 Werkzeug==3.1.9 gunicorn==27.0.1 kubernetes-validate==1.37.0
fi
