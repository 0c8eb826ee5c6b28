#!/usr/bin/env bash
# Soak test: the release proxy under mixed load (session reads and patches, excluded
# paths, logouts, rotations, WebSocket echo) for MINUTES (default 10), every answer
# checked, the proxy's RSS and file descriptors sampled every 10 s. Exits non-zero when
# a request was lost or memory or descriptors are not flat. See examples/soak.rs.
#
#   scripts/soak.sh [MINUTES]
#   SOAK_STORE=redis://127.0.0.1:6379/0 scripts/soak.sh 5    # against Redis instead of memory
#
# Everything runs at the lowest CPU priority (nice 19) so that it can share the machine;
# on a busy machine that lowers the request rate, not what the soak checks.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes="${1:-10}"
nice -n 19 cargo build --release --locked --bin session-proxy --example soak
exec nice -n 19 target/release/examples/soak "$minutes" target/release/session-proxy
