#!/usr/bin/env bash
# The cost of static replication: persistent 1 KiB confirmed publishing on one node,
# on a leader with a follower in sync mode, and in async mode, alternating, in one run.
# Every node shares this machine's cores and disk, so the ratio measures the machine as
# much as the design. Prints each round and the medians.
#
#   ROUNDS=3 DURATION=10 NO_BUILD=1 scripts/bench-replication.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -p holdfast
fi
HOLDFAST=target/release/holdfast
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_log() { # file needle
    for _ in $(seq 1 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "timed out waiting for '$2' in $1" >&2
    exit 1
}

run_round() { # mode round
    local mode=$1 round=$2 dir="$WORK/$1-$2" amqp repl pids=()
    mkdir -p "$dir"
    amqp=$(free_port)
    local args=(server --data-dir "$dir/leader" --amqp-listen "127.0.0.1:$amqp")
    if [ "$mode" != single ]; then
        repl=$(free_port)
        args+=(--replication-listen "127.0.0.1:$repl" --replication "$mode")
    fi
    "$HOLDFAST" "${args[@]}" >"$dir/leader.log" 2>&1 &
    pids+=($!)
    wait_log "$dir/leader.log" "holdfast listening"
    if [ "$mode" != single ]; then
        "$HOLDFAST" server --data-dir "$dir/follower" --follow "127.0.0.1:$repl" >"$dir/follower.log" 2>&1 &
        pids+=($!)
        wait_log "$dir/follower.log" "connected to the leader"
    fi
    "$HOLDFAST" bench publish --url "amqp://guest:guest@127.0.0.1:$amqp/%2f" --persistent \
        --size 1024 --producers 4 --confirm --window 256 --pipeline 32 \
        --duration "$DURATION" --quiet >"$dir/bench.out" 2>&1
    local rate
    rate=$(grep -oE '[0-9]+ msg/s' "$dir/bench.out" | head -1 | cut -d' ' -f1)
    echo "$mode round $round: ${rate:-?} msg/s"
    echo "$mode ${rate:-0}" >>"$WORK/rates"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    for mode in single sync async; do
        run_round "$mode" "$round"
    done
done
echo "medians of $ROUNDS rounds of ${DURATION} s:"
for mode in single sync async; do
    median=$(awk -v m="$mode" '$1==m {print $2}' "$WORK/rates" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "  $mode: $median msg/s"
done
