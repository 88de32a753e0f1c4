#!/usr/bin/env bash
# Runs the frame_decoder fuzz target for a bounded time; exits 0 when nothing crashed.
#
#   scripts/fuzz-smoke.sh [SECONDS]        (default 60)
#
# Installs cargo-fuzz from crates.io if it is missing. cargo-fuzz passes nightly-only -Z
# flags (sanitizers, coverage); on a stable toolchain RUSTC_BOOTSTRAP=1 lets them through.
# FUZZ_SANITIZER=none skips AddressSanitizer (faster, still catches panics).
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

cd "$root/fuzz"
# New inputs go to corpus/ (git-ignored); seeds/ holds a few valid frame sequences.
mkdir -p corpus/frame_decoder
exec cargo fuzz run --sanitizer "${FUZZ_SANITIZER:-address}" frame_decoder \
    corpus/frame_decoder seeds/frame_decoder \
    -- -max_total_time="$seconds" -dict=frame_decoder.dict -print_final_stats=1
