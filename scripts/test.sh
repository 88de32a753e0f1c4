#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this).
# Needs only the Rust toolchain: anything else a test uses (the RabbitMQ Java client for
# the seed-article programs) is installed by the test that needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== formatting"
cargo fmt --all -- --check

echo "== release build and tests (unit, property, integration against the real binary)"
cargo test --release --workspace --all-targets

if [ -x scripts/fuzz-smoke.sh ] && [ "${HOLDFAST_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== fuzz smoke run of the frame decoder"
  scripts/fuzz-smoke.sh "${HOLDFAST_FUZZ_SECONDS:-60}"
fi
