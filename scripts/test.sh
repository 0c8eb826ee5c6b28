#!/usr/bin/env bash
# Runs the whole test suite. The Redis tests start their own redis-server processes on
# free loopback ports; this script only makes sure the binary is installed (Debian
# package `redis-server`, which brings redis-cli too).
set -euo pipefail
cd "$(dirname "$0")/.."

# The TLS tests make their certificates with the openssl command.
missing=()
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)…" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo test --locked "$@"
