#!/usr/bin/env bash
# Side-by-side benchmark of Holdfast against RabbitMQ (issue 5).
#
# Installs RabbitMQ from Debian when missing, starts a private RabbitMQ node and two Holdfast
# brokers (fsync always, the default, and fsync never) on loopback, runs every scenario of the
# issue's target table against each broker in alternation ROUNDS times with the same client
# (`holdfast bench`, lapin), and prints medians, ratios and every run's absolute figures.
#
# Environment:
#   ROUNDS=3            rounds (each round runs every scenario once per broker)
#   DURATION=10         seconds per run
#   PREFILL=200000      backlog drained by the consume scenarios
#   LAT_RATE=10000      fixed publish rate of the latency scenario (msg/s)
#   SCENARIOS="..."     subset of: pub_persist pub_transient consume_ack1 consume_ack100 latency tx fanout
#   BACKLOG=1           also run the backlog scenario (Holdfast only: RSS and restart time)
#   BACKLOG_MESSAGES=5000000
#   RMQ_PORT=5682 HF_PORT=5683 HFN_PORT=5684 BACKLOG_PORT=5685
#   OUT=DIR             where results go (default: a fresh temp dir, printed at the end)
#   NO_BUILD=1          skip `cargo build --release -p holdfast`
#   PIPELINE=1          lapin operations the client keeps in flight (`--pipeline`): 1 awaits
#                       each publish/ack in turn; 32 lets lapin write them in batches
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
PREFILL=${PREFILL:-200000}
LAT_RATE=${LAT_RATE:-10000}
PIPELINE=${PIPELINE:-1}
SCENARIOS=${SCENARIOS:-"pub_persist pub_transient consume_ack1 consume_ack100 latency tx fanout"}
BACKLOG=${BACKLOG:-0}
BACKLOG_MESSAGES=${BACKLOG_MESSAGES:-5000000}
RMQ_PORT=${RMQ_PORT:-5682}
HF_PORT=${HF_PORT:-5683}
HFN_PORT=${HFN_PORT:-5684}
BACKLOG_PORT=${BACKLOG_PORT:-5685}
RMQ_DIST_PORT=${RMQ_DIST_PORT:-25682}
RMQ_EPMD_PORT=${RMQ_EPMD_PORT:-4371}
RMQ_NODE=${RMQ_NODE:-holdfast-bench@localhost}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOLDFAST="$ROOT/target/release/holdfast"
# Fixed place for the pids of the previous run, so a new run can clean up leftovers.
STATE=/tmp/holdfast-bench-vs-rabbitmq.state
OUT=${OUT:-$(mktemp -d /tmp/holdfast-vs-rabbitmq.XXXXXX)}
WORK=$(mktemp -d /tmp/holdfast-vs-rabbitmq-data.XXXXXX)
mkdir -p "$OUT/runs" "$STATE"

export ERL_EPMD_PORT=$RMQ_EPMD_PORT

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

rmqctl() {
    ERL_EPMD_PORT=$RMQ_EPMD_PORT rabbitmqctl -n "$RMQ_NODE" "$@"
}

# ---------------------------------------------------------------- cleanup of leftovers
kill_pidfile() {
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null \
        && grep -qa holdfast "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "stopping brokers"
    for f in "$STATE"/holdfast-*.pid; do kill_pidfile "$f"; done
    if command -v rabbitmqctl >/dev/null 2>&1; then
        rmqctl stop >/dev/null 2>&1 || true
    fi
    if [[ -f $STATE/epmd.port ]]; then
        ERL_EPMD_PORT=$(cat "$STATE/epmd.port") epmd -kill >/dev/null 2>&1 || true
        rm -f "$STATE/epmd.port"
    fi
    rm -rf "$WORK"
    exit "$rc"
}

for f in "$STATE"/holdfast-*.pid; do kill_pidfile "$f"; done
if command -v rabbitmqctl >/dev/null 2>&1; then
    rmqctl stop >/dev/null 2>&1 || true
fi
trap cleanup EXIT INT TERM

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port seconds
    local deadline=$((SECONDS + $2))
    while port_free "$1"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

for p in "$RMQ_PORT" "$HF_PORT" "$HFN_PORT" "$RMQ_DIST_PORT"; do
    port_free "$p" || { log "port $p is in use; set RMQ_PORT/HF_PORT/HFN_PORT/RMQ_DIST_PORT"; exit 1; }
done

# ---------------------------------------------------------------- RabbitMQ
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server from Debian"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server
fi
# The Debian package may have started a system node; it does not matter (other ports/node name).

RMQ_BASE="$WORK/rabbitmq"
mkdir -p "$RMQ_BASE/mnesia" "$RMQ_BASE/log"
printf '[].\n' >"$RMQ_BASE/enabled_plugins"
printf 'loopback_users.guest = true\n' >"$RMQ_BASE/rabbitmq.conf"
# The Debian wrapper runs rabbitmq-server (and rabbitmqctl) as the rabbitmq user when started by root.
chmod 755 "$WORK"
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$RMQ_BASE"; fi
log "starting RabbitMQ node $RMQ_NODE on 127.0.0.1:$RMQ_PORT"
echo "$RMQ_EPMD_PORT" >"$STATE/epmd.port"
(
    export RABBITMQ_NODENAME=$RMQ_NODE
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$RMQ_PORT
    export RABBITMQ_DIST_PORT=$RMQ_DIST_PORT
    export RABBITMQ_MNESIA_BASE=$RMQ_BASE/mnesia
    export RABBITMQ_LOG_BASE=$RMQ_BASE/log
    export RABBITMQ_CONFIG_FILE=$RMQ_BASE/rabbitmq.conf
    export RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_BASE/enabled_plugins
    export RABBITMQ_PID_FILE=$RMQ_BASE/rabbitmq.pid
    export ERL_EPMD_PORT=$RMQ_EPMD_PORT
    exec setsid rabbitmq-server
) >"$OUT/rabbitmq.out" 2>&1 &
deadline=$((SECONDS + 120))
until rmqctl await_startup --timeout 120 >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then log "RabbitMQ did not start"; tail -n 30 "$OUT/rabbitmq.out" >&2; exit 1; fi
    sleep 1
done
wait_port "$RMQ_PORT" 30
RMQ_PID=$(cat "$RMQ_BASE/rabbitmq.pid" 2>/dev/null || rmqctl eval 'os:getpid().' | tr -d '"')
RMQ_VERSION=$(rmqctl version 2>/dev/null || echo unknown)
ERLANG_VERSION=$(rmqctl eval 'erlang:system_info(otp_release).' 2>/dev/null | tr -d '"')
ERTS_VERSION=$(rmqctl eval 'erlang:system_info(version).' 2>/dev/null | tr -d '"')
log "RabbitMQ $RMQ_VERSION (Erlang/OTP $ERLANG_VERSION, erts $ERTS_VERSION), beam pid $RMQ_PID"

# ---------------------------------------------------------------- Holdfast
if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building holdfast (release)"
    (cd "$ROOT" && cargo build --release -p holdfast)
fi
HF_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- crates 2>/dev/null) ]]; then HF_COMMIT="$HF_COMMIT+dirty"; fi

start_holdfast() { # name port fsync -> pid on stdout
    local name=$1 port=$2 fsync=$3 dir="$WORK/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    "$HOLDFAST" server --data-dir "$dir" --amqp-listen "127.0.0.1:$port" --fsync "$fsync" \
        >"$OUT/$name.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$STATE/holdfast-$name.pid"
    wait_port "$port" 30 || { log "holdfast $name did not start"; cat "$OUT/$name.log" >&2; exit 1; }
    echo "$pid"
}

HF_PID=$(start_holdfast always "$HF_PORT" always)
HFN_PID=$(start_holdfast never "$HFN_PORT" never)
log "holdfast $HF_COMMIT: fsync=always pid $HF_PID on $HF_PORT, fsync=never pid $HFN_PID on $HFN_PORT"

# ---------------------------------------------------------------- scenarios
declare -A URL PID
URL[holdfast]="amqp://guest:guest@127.0.0.1:$HF_PORT/%2f"
URL[holdfast_never]="amqp://guest:guest@127.0.0.1:$HFN_PORT/%2f"
URL[rabbitmq]="amqp://guest:guest@127.0.0.1:$RMQ_PORT/%2f"
PID[holdfast]=$HF_PID
PID[holdfast_never]=$HFN_PID
PID[rabbitmq]=$RMQ_PID

scenario_args() {
    case $1 in
    pub_persist) echo "publish --persistent --size 1024 --producers 4 --confirm --window 256" ;;
    pub_transient) echo "publish --transient --size 16 --producers 4" ;;
    consume_ack1) echo "consume --persistent --size 1024 --prefill $PREFILL --prefetch 1000 --ack-every 1" ;;
    consume_ack100) echo "consume --persistent --size 1024 --prefill $PREFILL --prefetch 1000 --ack-every 100" ;;
    latency) echo "latency --persistent --size 1024 --rate $LAT_RATE --prefetch 1000" ;;
    tx) echo "publish --persistent --size 1024 --producers 4 --tx-batch 100" ;;
    fanout) echo "fanout --persistent --size 1024 --queues 10 --producers 4 --window 256 --prefetch 1000" ;;
    *) log "unknown scenario $1"; exit 1 ;;
    esac
}

brokers_for() {
    case $1 in
    pub_persist) echo "holdfast rabbitmq holdfast_never" ;;
    *) echo "holdfast rabbitmq" ;;
    esac
}

cpu_ticks() { # pid -> utime+stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

TICK=$(getconf CLK_TCK)
printf 'round\tscenario\tbroker\tfile\twall_secs\tbroker_cpu_secs\tclient_user_secs\tclient_sys_secs\tstatus\n' >"$OUT/runs.tsv"

run_one() { # round scenario broker
    local round=$1 scenario=$2 broker=$3
    local base="$OUT/runs/r$round-$scenario-$broker"
    local pid=${PID[$broker]}
    local args
    args="$(scenario_args "$scenario") --pipeline $PIPELINE"
    echo "holdfast bench $args --url ${URL[$broker]} --duration $DURATION --quiet" >"$base.cmd"
    local t0 c0 t1 c1 status=ok
    c0=$(cpu_ticks "$pid")
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    /usr/bin/time -f '%U %S' -o "$base.time" \
        "$HOLDFAST" bench $args --url "${URL[$broker]}" --duration "$DURATION" --quiet \
        >"$base.out" 2>"$base.err" || status=failed
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "$pid")
    tail -n 1 "$base.out" >"$base.json" || true
    local cu cs
    read -r cu cs < <(grep -E '^[0-9.]+ [0-9.]+$' "$base.time" | tail -n 1 || echo "0 0")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$scenario" "$broker" "$base.json" \
        "$(echo "$t1 - $t0" | bc)" "$(echo "scale=2; ($c1 - $c0) / $TICK" | bc)" "${cu:-0}" "${cs:-0}" \
        "$status" >>"$OUT/runs.tsv"
    log "round $round $scenario $broker: $status $(python3 -c 'import json,sys
try:
    d=json.loads(open(sys.argv[1]).read())
    print("msgs/s=%s p99=%s" % (d.get("msgs_per_sec"), (d.get("latency_us") or {}).get("p99")))
except Exception as e: print("(no JSON)")' "$base.json")"
}

log "ROUNDS=$ROUNDS DURATION=$DURATION PREFILL=$PREFILL LAT_RATE=$LAT_RATE; results in $OUT"
for round in $(seq "$ROUNDS"); do
    for scenario in $SCENARIOS; do
        for broker in $(brokers_for "$scenario"); do
            run_one "$round" "$scenario" "$broker"
        done
    done
done

# ---------------------------------------------------------------- backlog (optional)
BACKLOG_JSON="$OUT/backlog.json"
if [[ $BACKLOG == 1 ]]; then
    log "backlog: publishing $BACKLOG_MESSAGES x 1 KiB persistent into a fresh holdfast (fsync always)"
    BL_DIR="$WORK/backlog"
    rm -rf "$BL_DIR"
    mkdir -p "$BL_DIR"
    BL_URL="amqp://guest:guest@127.0.0.1:$BACKLOG_PORT/%2f"
    "$HOLDFAST" server --data-dir "$BL_DIR" --amqp-listen "127.0.0.1:$BACKLOG_PORT" >"$OUT/backlog-1.log" 2>&1 &
    BL_PID=$!
    echo "$BL_PID" >"$STATE/holdfast-backlog.pid"
    wait_port "$BACKLOG_PORT" 30
    "$HOLDFAST" bench publish --url "$BL_URL" --persistent --size 1024 --producers 4 --confirm \
        --window 256 --messages "$BACKLOG_MESSAGES" --queue holdfast-backlog --keep --quiet \
        >"$OUT/backlog-publish.out" 2>"$OUT/backlog-publish.err"
    sleep 2
    RSS_AFTER_PUBLISH=$(awk '/^VmRSS/ {print $2}' "/proc/$BL_PID/status")
    HWM_AFTER_PUBLISH=$(awk '/^VmHWM/ {print $2}' "/proc/$BL_PID/status")
    DISK=$(du -sk "$BL_DIR" | cut -f1)
    kill "$BL_PID"
    wait "$BL_PID" 2>/dev/null || true
    log "backlog: restarting"
    T0=$(date +%s.%N)
    "$HOLDFAST" server --data-dir "$BL_DIR" --amqp-listen "127.0.0.1:$BACKLOG_PORT" >"$OUT/backlog-2.log" 2>&1 &
    BL_PID=$!
    echo "$BL_PID" >"$STATE/holdfast-backlog.pid"
    until grep -q 'holdfast listening' "$OUT/backlog-2.log"; do
        kill -0 "$BL_PID" || { log "backlog restart failed"; cat "$OUT/backlog-2.log" >&2; exit 1; }
        sleep 0.02
    done
    T1=$(date +%s.%N)
    RESTART_SECS=$(echo "$T1 - $T0" | bc)
    sleep 2
    RSS_AFTER_RESTART=$(awk '/^VmRSS/ {print $2}' "/proc/$BL_PID/status")
    RECOVERED=$(grep -o 'broker state recovered.*' "$OUT/backlog-2.log" | head -n 1 || true)
    kill "$BL_PID"
    wait "$BL_PID" 2>/dev/null || true
    rm -f "$STATE/holdfast-backlog.pid"
    python3 - "$BACKLOG_JSON" <<EOF
import json, sys
json.dump({"messages": $BACKLOG_MESSAGES, "publish": json.loads(open("$OUT/backlog-publish.out").read().strip().splitlines()[-1]),
           "rss_after_publish_kib": $RSS_AFTER_PUBLISH, "hwm_after_publish_kib": $HWM_AFTER_PUBLISH,
           "data_dir_kib": $DISK, "restart_to_listening_secs": $RESTART_SECS,
           "rss_after_restart_kib": $RSS_AFTER_RESTART, "recovered_log": """$RECOVERED"""}, open(sys.argv[1], "w"))
EOF
fi

# ---------------------------------------------------------------- report
{
    echo "machine: nproc=$(nproc) mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) kernel=$(uname -r)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "rabbitmq: $RMQ_VERSION (Erlang/OTP $ERLANG_VERSION, erts $ERTS_VERSION), classic durable queues"
    echo "holdfast: $HF_COMMIT (fsync always; second instance fsync never)"
    echo "rounds=$ROUNDS duration=${DURATION}s prefill=$PREFILL latency_rate=$LAT_RATE"
} >"$OUT/machine.txt"

python3 - "$OUT" "$BACKLOG_JSON" <<'EOF'
import csv, json, os, statistics, sys

out, backlog_path = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(os.path.join(out, "runs.tsv")), delimiter="\t"))

def load(path):
    try:
        return json.loads(open(path).read())
    except Exception:
        return None

# scenario -> (label, metric name, extractor, higher_is_better, target)
def rate(d): return d.get("msgs_per_sec")
def p(k): return lambda d: (d.get("latency_us") or {}).get(k)
def delivered(d): return d.get("delivered_per_sec")
SCEN = [
    ("pub_persist", "persistent 1 KiB, confirms, 4 prod x window 256", "msg/s", rate, True, 5.0),
    ("pub_transient", "transient 16 B, no confirms, 4 prod", "msg/s", rate, True, 3.0),
    ("consume_ack1", "consume 1 KiB persistent, prefetch 1000, ack every 1", "msg/s", rate, True, 3.0),
    ("consume_ack100", "consume 1 KiB persistent, prefetch 1000, ack every 100", "msg/s", rate, True, 3.0),
    ("latency", "e2e latency 1 KiB persistent p99 (us)", "us", p("p99"), False, 0.5),
    ("latency", "e2e latency p50 (us)", "us", p("p50"), False, None),
    ("latency", "e2e latency p99.9 (us)", "us", p("p999"), False, None),
    ("tx", "tx batches of 100 + commit, 1 KiB persistent, 4 prod", "msg/s", rate, True, 5.0),
    ("fanout", "fan-out 1 -> 10 durable queues, published (confirmed)", "msg/s", rate, True, 5.0),
    ("fanout", "fan-out 1 -> 10 durable queues, delivered", "deliveries/s", delivered, True, None),
]

def values(scenario, broker, f):
    vs = []
    for r in rows:
        if r["scenario"] == scenario and r["broker"] == broker and r["status"] == "ok":
            d = load(r["file"])
            if d is not None and f(d) is not None:
                vs.append(float(f(d)))
    return vs

def med(vs): return statistics.median(vs) if vs else None
def fmt(x): return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")

table = []
print()
print("| scenario | Holdfast median | RabbitMQ median | Holdfast / RabbitMQ | target | holds |")
print("|---|---:|---:|---:|---|---|")
for key, label, unit, f, higher, target in SCEN:
    h, r = med(values(key, "holdfast", f)), med(values(key, "rabbitmq", f))
    ratio = h / r if h and r else None
    if target is None:
        tgt, holds = "(reported)", ""
    elif higher:
        tgt, holds = f">= {target:g}x", ("yes" if ratio and ratio >= target else "no")
    else:
        tgt, holds = f"<= {target:g}x", ("yes" if ratio is not None and ratio <= target else "no")
    print(f"| {label} | {fmt(h)} {unit} | {fmt(r)} {unit} | {fmt(ratio) if ratio is None else f'{ratio:.2f}x'} | {tgt} | {holds} |")
    table.append({"scenario": key, "label": label, "holdfast": h, "rabbitmq": r, "ratio": ratio, "target": target, "higher_is_better": higher})
h, n = med(values("pub_persist", "holdfast", rate)), med(values("pub_persist", "holdfast_never", rate))
ratio = h / n if h and n else None
print(f"| persistent 1 KiB confirms: fsync always vs Holdfast fsync never | {fmt(h)} msg/s | (never: {fmt(n)} msg/s) | {'-' if ratio is None else f'{ratio:.2f}x'} | >= 0.6x | {'yes' if ratio and ratio >= 0.6 else 'no'} |")
table.append({"scenario": "pub_persist_vs_never", "holdfast": h, "holdfast_never": n, "ratio": ratio, "target": 0.6})

bl = load(backlog_path)
if bl:
    rss = bl["rss_after_publish_kib"] / 1024
    rss2 = bl["rss_after_restart_kib"] / 1024
    print(f"| backlog {bl['messages']:,} x 1 KiB persistent: RSS after publish | {rss:.0f} MB (restart: {rss2:.0f} MB) | | | <= 300 MB | {'yes' if max(rss, rss2) <= 300 else 'no'} |")
    print(f"| backlog: restart to listening | {bl['restart_to_listening_secs']:.2f} s | | | <= 10 s | {'yes' if bl['restart_to_listening_secs'] <= 10 else 'no'} |")

print()
print("Every run (absolute figures; broker CPU = broker process CPU seconds / wall seconds of the run, client CPU likewise for the bench process):")
print()
print("| round | scenario | broker | msg/s | p50 us | p99 us | p99.9 us | delivered/s | messages | broker CPU | client CPU | status |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    d = load(r["file"]) or {}
    lat = d.get("latency_us") or {}
    wall = float(r["wall_secs"]) or 1
    bcpu = float(r["broker_cpu_secs"]) / wall * 100
    ccpu = (float(r["client_user_secs"]) + float(r["client_sys_secs"])) / wall * 100
    print(f"| {r['round']} | {r['scenario']} | {r['broker']} | {fmt(d.get('msgs_per_sec'))} | {fmt(lat.get('p50'))} | {fmt(lat.get('p99'))} | {fmt(lat.get('p999'))} | {fmt(d.get('delivered_per_sec'))} | {d.get('messages', '-')} | {bcpu:.0f}% | {ccpu:.0f}% | {r['status']} |")
if bl:
    print()
    print("Backlog:", json.dumps(bl))
json.dump(table, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
echo
cat "$OUT/machine.txt"
echo "results: $OUT (runs.tsv, runs/*.json, summary.json)"
