#!/usr/bin/env bash
# Fuzzes the parsers a client, an application or an operator can feed: the Cookie header
# (`cookie`), the application's session headers (`update_header`), exclusion globs and
# request paths (`exclude`), the config file (`config`) and the proxy's own HTTP/1.1
# (`http1`: request heads, answer heads, chunked bodies). See fuzz/fuzz_targets/*.rs
# for what each target asserts.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600), targets one after another (default: all five).
# `scripts/fuzz.sh 10` is a quick smoke run (about a minute plus the first build).
# Two runs with different targets can go side by side.
#
# The working corpus of each target is fuzz/corpus/TARGET/ (not in git), seeded from the
# hand-written fuzz/seeds/TARGET/; crashes land in fuzz/artifacts/TARGET/ with the run's
# log. Minimise a crash with `cargo fuzz tmin TARGET ARTIFACT` (same environment).
#
# cargo fuzz needs unstable compiler flags (-Zsanitizer=address): RUSTC_BOOTSTRAP=1 lets
# the stable toolchain accept them. Everything runs at the lowest CPU priority.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cookie update_header exclude config http1)

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz…" >&2
  nice -n 19 cargo install cargo-fuzz --locked
fi

nice -n 19 cargo fuzz build

failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  log="artifacts/$target/fuzz.log"
  echo "== $target: ${seconds}s (log: fuzz/$log)"
  status=0
  nice -n 19 cargo fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  corpus=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -n 1 || true)
  echo "   exit $status, executions ${execs:-?}, ${corpus:-corp: ?} (units/bytes)," \
    "$(find "corpus/$target" -type f | wc -l) files in fuzz/corpus/$target"
  if [ "$status" -ne 0 ]; then
    grep -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" | head -n 20 || true
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "no crashes"
