#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this).
# Needs only the Rust toolchain: anything else a test uses (the RabbitMQ Java client for
# the seed-article programs, cargo-fuzz) is installed by what needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== formatting"
cargo fmt --all -- --check

echo "== release build and tests (unit, property, integration against the real binary)"
cargo test --release --workspace --all-targets 2>&1 | tee "$log"

if [ -x scripts/fuzz-smoke.sh ] && [ "${HOLDFAST_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== fuzz smoke run of the frame decoder"
  scripts/fuzz-smoke.sh "${HOLDFAST_FUZZ_SECONDS:-60}"
fi

# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result: /{p+=$4; f+=$6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
