#!/usr/bin/env bash
# Relay benchmarks (`make bench`): builds the release binaries, starts durable Redis and
# Postgres (deploy/local-stack.sh services-up, FAST unset), a cluster of 2 gateways,
# 1 ingest-worker and 1 query-worker, runs the relay-bench scenarios against it
# (tests/src/bin/relay-bench.rs) and writes target/bench/report.json and report.md.
# Everything it started is stopped when it exits, whatever happened.
#
# Usage:
#   deploy/bench.sh                 short profile (about two minutes after the build)
#   BENCH=full deploy/bench.sh      the sizes the targets are stated for (much longer)
#
# Environment:
#   BENCH                short (default) or full
#   BENCH_ONLY           run only these scenarios (space separated: verify-rate seed query
#                        ingest-c200 ingest-c20 ingest-open fanout connections)
#   BENCH_REDIS_PORT     Redis port (default 6393)
#   BENCH_PG_PORT        Postgres port (default 5443)
#   BENCH_DB             database of the bench cluster, dropped and created again on every
#                        run (default nostr_bench)
#   BENCH_KEEP_SERVICES  1: leave Redis and Postgres running afterwards
#   BENCH_SKIP_BUILD     1: do not run cargo build; use the release binaries already built
#   RUST_LOG             log filter of the relay processes (default info)
#
# Output: target/bench/report.{md,json}, target/bench/results/<scenario>.json (or .error),
# target/bench/logs/ (relay process logs and each scenario's console output).
#
# The load generator runs on the same machine as the relay, so on a small machine the
# numbers are a floor. Per-IP and per-pubkey rate limits are turned off for the cluster
# (every bench connection comes from 127.0.0.1); everything else is the relay's default.
# The connections scenario needs more open files than the usual 1024: this script raises
# the soft limit (`ulimit -n`) up to the hard limit and warns when that is not enough.
# shellcheck disable=SC2317  # the cleanup functions run from traps
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"
PROG="bench"

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 1; }

PROFILE="${BENCH:-short}"
REDIS_PORT="${BENCH_REDIS_PORT:-6393}"
PG_PORT="${BENCH_PG_PORT:-5443}"
DB_NAME="${BENCH_DB:-nostr_bench}"
PREFIX="bench"
STATE="target/bench-stack"
OUT="target/bench"
RESULTS="$OUT/results"
LOGS="$OUT/logs"
BIN="target/release"

case "$PROFILE" in
    short)
        VERIFY_EVENTS=3000
        SEED_EVENTS=100000 SEED_AUTHORS=2000
        QUERY_REQUESTS=100
        INGEST_C200_EVENTS=10000 INGEST_C20_EVENTS=2000
        OPEN_RATE=500 OPEN_EVENTS=2500
        FANOUT_SUBS=2000 FANOUT_PUBLISHERS=4 FANOUT_RATE=200 FANOUT_SECS=10
        CONNECTIONS=2000
        ;;
    full)
        VERIFY_EVENTS=10000
        SEED_EVENTS=1000000 SEED_AUTHORS=10000
        QUERY_REQUESTS=500
        INGEST_C200_EVENTS=100000 INGEST_C20_EVENTS=20000
        OPEN_RATE=2000 OPEN_EVENTS=40000
        FANOUT_SUBS=10000 FANOUT_PUBLISHERS=10 FANOUT_RATE=1000 FANOUT_SECS=30
        CONNECTIONS=10000
        ;;
    *) die "BENCH must be short or full (got '$PROFILE')" ;;
esac
[[ "$DB_NAME" =~ ^[a-z_][a-z0-9_]*$ ]] || die "BENCH_DB must be a plain lowercase name"

selected() {
    [[ -z "${BENCH_ONLY:-}" ]] && return 0
    [[ " $BENCH_ONLY " == *" $1 "* ]]
}

# --- processes we start ---------------------------------------------------------------

NAMES=()
PIDS=()
SERVICES_UP=0
FAILED=0

proc_alive() {
    local pid="$1" stat
    kill -0 "$pid" 2>/dev/null || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

stop_pid() {
    local name="$1" pid="$2" i
    if proc_alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            proc_alive "$pid" || break
            sleep 0.1
        done
        if proc_alive "$pid"; then
            log "$name did not stop in 15s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

stop_cluster() {
    local i
    for i in "${!NAMES[@]}"; do
        [[ "${NAMES[$i]}" == gateway-* ]] && stop_pid "${NAMES[$i]}" "${PIDS[$i]}"
    done
    for i in "${!NAMES[@]}"; do
        [[ "${NAMES[$i]}" != gateway-* ]] && stop_pid "${NAMES[$i]}" "${PIDS[$i]}"
    done
    NAMES=()
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_cluster
    if (( SERVICES_UP )) && [[ "${BENCH_KEEP_SERVICES:-0}" != 1 ]]; then
        deploy/local-stack.sh services-down "$STATE" || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_proc() {
    local name="$1" bin="$2"
    shift 2
    env "$@" "$bin" </dev/null >"$LOGS/$name.log" 2>&1 &
    NAMES+=("$name")
    PIDS+=("$!")
    log "started $name (pid $!, log $LOGS/$name.log)"
}

# Fails (with the log tail) when a cluster process has exited.
check_alive() {
    local i
    for i in "${!NAMES[@]}"; do
        if ! proc_alive "${PIDS[$i]}"; then
            log "error: ${NAMES[$i]} (pid ${PIDS[$i]}) is not running; last lines of its log:"
            tail -n 30 "$LOGS/${NAMES[$i]}.log" | sed 's/^/  /' >&2
            return 1
        fi
    done
}

pid_of() {
    local i
    for i in "${!NAMES[@]}"; do
        [[ "${NAMES[$i]}" == "$1" ]] && { echo "${PIDS[$i]}"; return 0; }
    done
    return 1
}

# --- CPU accounting: where the machine's time went during each scenario ---------------

CLK_TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
# The block device holding the services' files (set once they are up), as named in
# /proc/diskstats; empty when it cannot be found there (then no disk figures).
DISK_DEV=""

# disk_device PATH: the /proc/diskstats name of the device PATH lives on (found by its
# major:minor number, so LVM and encrypted volumes are found as dm-N), or nothing.
disk_device() {
    local numbers
    numbers="$(stat -Lc '%Hd %Ld' "$1" 2>/dev/null)" || return 0
    awk -v n="$numbers" '$1 " " $2 == n { print $3; exit }' /proc/diskstats 2>/dev/null || true
}

# proc_ticks PID [children]: utime+stime of a process (plus its reaped children's with
# "children"), in clock ticks; 0 when it is gone.
proc_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return 0; }
    stat="${stat##*) }"
    local -a f
    read -r -a f <<<"$stat"
    if [[ "${2:-}" == children ]]; then
        echo $((f[11] + f[12] + f[13] + f[14]))
    else
        echo $((f[11] + f[12]))
    fi
}

# cpu_snapshot FILE: one "name ticks" line per process we care about, the CPU time of this
# shell's reaped children (relay-bench), the whole machine's busy (steal included), iowait,
# steal and total ticks, the disk's write counters, and the time in milliseconds.
cpu_snapshot() {
    local file="$1" i pm t pid line
    {
        for i in "${!NAMES[@]}"; do
            echo "${NAMES[$i]} $(proc_ticks "${PIDS[$i]}")"
        done
        pm="$(head -n 1 "$STATE/pg/postmaster.pid" 2>/dev/null || true)"
        if [[ "$pm" =~ ^[0-9]+$ ]]; then
            t="$(proc_ticks "$pm" children)"
            for pid in $(pgrep -P "$pm" || true); do
                t=$((t + $(proc_ticks "$pid")))
            done
            echo "postgres $t"
        fi
        pid="$(tr -dc '0-9' <"$STATE/redis/redis.pid" 2>/dev/null || true)"
        [[ -n "$pid" ]] && echo "redis $(proc_ticks "$pid")"
        times >"$OUT/.times"
        line="$(tail -n 1 "$OUT/.times")"
        echo "relay-bench $(awk -v tck="$CLK_TCK" '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60 + p[2] } printf "%d", t * tck }' <<<"$line")"
        awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print "machine-busy " busy; print "machine-iowait " $6; print "machine-steal " $9; print "machine-total " busy + $5 + $6 }' /proc/stat
        # /proc/diskstats: writes completed ($8), sectors written ($10), ms spent writing ($11).
        [[ -n "$DISK_DEV" ]] &&
            awk -v d="$DISK_DEV" '$3 == d { print "disk-writes " $8; print "disk-sectors " $10; print "disk-write-ms " $11 }' /proc/diskstats
        echo "wall-ms $(date +%s%3N)"
    } >"$file"
}

# cpu_report BEFORE AFTER OUT.json: the differences, in seconds (disk: MB written, write
# requests, and the seconds they waited, summed over requests).
cpu_report() {
    awk -v tck="$CLK_TCK" -v cores="$(nproc)" -v dev="$DISK_DEV" '
        NR == FNR { before[$1] = $2; next }
        { after[$1] = $2; order[++n] = $1 }
        END {
            printf "{\n  \"cores\": %d,\n  \"wall_s\": %.3f,\n", cores, (after["wall-ms"] - before["wall-ms"]) / 1000
            printf "  \"machine_busy_s\": %.2f,\n  \"machine_total_s\": %.2f,\n", (after["machine-busy"] - before["machine-busy"]) / tck, (after["machine-total"] - before["machine-total"]) / tck
            printf "  \"iowait_s\": %.2f,\n  \"steal_s\": %.2f,\n", (after["machine-iowait"] - before["machine-iowait"]) / tck, (after["machine-steal"] - before["machine-steal"]) / tck
            if ("disk-sectors" in after)
                printf "  \"disk\": {\"device\": \"%s\", \"written_mb\": %.1f, \"writes\": %d, \"write_wait_s\": %.2f},\n", dev, (after["disk-sectors"] - before["disk-sectors"]) * 512 / 1e6, after["disk-writes"] - before["disk-writes"], (after["disk-write-ms"] - before["disk-write-ms"]) / 1000
            printf "  \"cpu_s\": {"
            sep = ""
            for (i = 1; i <= n; i++) {
                k = order[i]
                if (k ~ /^(machine-|disk-|wall-ms)/) continue
                printf "%s\n    \"%s\": %.2f", sep, k, (after[k] - before[k]) / tck
                sep = ","
            }
            printf "\n  }\n}\n"
        }' "$1" "$2" >"$3"
}

# run_scenario NAME relay-bench-args...: runs one scenario, its console output also in
# $LOGS/bench-NAME.log; a failure is written to $RESULTS/NAME.error and the run goes on.
# The CPU time each process used meanwhile, the machine's iowait and steal and the disk's
# writes go to $RESULTS/NAME.cpu.json.
run_scenario() {
    local name="$1" rc=0
    shift
    if ! check_alive; then
        echo "a cluster process died before this scenario (see $LOGS/)" >"$RESULTS/$name.error"
        FAILED=1
        return 0
    fi
    log "scenario $name: relay-bench $*"
    cpu_snapshot "$OUT/.cpu-before"
    "$BIN/relay-bench" "$@" --json "$RESULTS/$name.json" 2>&1 | tee "$LOGS/bench-$name.log" || rc=${PIPESTATUS[0]}
    cpu_snapshot "$OUT/.cpu-after"
    cpu_report "$OUT/.cpu-before" "$OUT/.cpu-after" "$RESULTS/$name.cpu.json"
    if (( rc != 0 )); then
        local why
        why="$(grep -h 'relay-bench: error:' "$LOGS/bench-$name.log" | tail -n 1 | cut -c1-300)"
        [[ -n "$why" ]] || why="$(grep -v '^\s*$' "$LOGS/bench-$name.log" | tail -n 1 | cut -c1-300)"
        echo "exit $rc: ${why:-no output}" >"$RESULTS/$name.error"
        rm -f "$RESULTS/$name.json"
        log "scenario $name failed (exit $rc)"
        FAILED=1
    fi
    return 0
}

# --- build, services, database ------------------------------------------------------

log "profile: $PROFILE"
rm -rf "$RESULTS" "$LOGS" "$OUT/report.md" "$OUT/report.json"
mkdir -p "$RESULTS" "$LOGS"

if [[ "${BENCH_SKIP_BUILD:-0}" == 1 ]]; then
    log "BENCH_SKIP_BUILD=1: using the binaries already in $BIN"
else
    log "cargo build --release --workspace --bins"
    cargo build --release --workspace --bins
fi
for b in gateway ingest-worker query-worker relay-bench; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b not found after cargo build"
done

# Open files: the load generator and the gateway each hold one socket per connection.
need=$((CONNECTIONS + 2048))
hard="$(ulimit -Hn)"
if [[ "$hard" == unlimited ]]; then
    ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null || true
elif (( hard > $(ulimit -n) )); then
    ulimit -n "$hard" 2>/dev/null || true
fi
soft="$(ulimit -n)"
log "open files limit (ulimit -n): $soft"
if [[ "$soft" != unlimited ]] && (( soft < need )); then
    log "warning: the connections scenario needs about $need open files; raise the hard limit (ulimit -Hn)"
fi

SERVICES_UP=1
env -u FAST deploy/local-stack.sh services-up "$STATE" "$REDIS_PORT" "$PG_PORT"
DISK_DEV="$(disk_device "$STATE")"
[[ -n "$DISK_DEV" ]] || log "no /proc/diskstats entry for the disk holding $STATE: the report has no disk figures"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/$DB_NAME"

# A fresh database and no bus keys left from an earlier run.
"$BIN/relay-bench" reset-db --db-url "$DB_URL"
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern "$PREFIX:*" |
    xargs -r -n 500 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" del >/dev/null

# Verification rate first, on an idle machine.
if selected verify-rate; then
    run_scenario verify-rate verify-rate --events "$VERIFY_EVENTS"
fi

# --- cluster --------------------------------------------------------------------------

# Rate limits off: every bench connection comes from one address.
common=(
    "RELAY_REDIS_URL=$REDIS_URL"
    "RELAY_BUS_PREFIX=$PREFIX"
    "RUST_LOG=${RUST_LOG:-info}"
    "NO_COLOR=1"
    "RELAY_RATE_EVENTS_PER_IP=0"
    "RELAY_RATE_EVENTS_PER_PUBKEY=0"
    "RELAY_RATE_REQS_PER_IP=0"
    "RELAY_RATE_QUERY_MS_PER_IP=0"
    "RELAY_RATE_AUTHS_PER_IP=0"
    "RELAY_MAX_CONNECTIONS_PER_IP=1000000"
)
set -m # each relay process in its own process group: Ctrl-C reaches only this script
start_proc ingest-worker "$BIN/ingest-worker" "${common[@]}" "RELAY_DATABASE_URL=$DB_URL"
start_proc query-worker "$BIN/query-worker" "${common[@]}" "RELAY_DATABASE_URL=$DB_URL"
for i in 0 1; do
    start_proc "gateway-$i" "$BIN/gateway" "${common[@]}" "RELAY_LISTEN=127.0.0.1:0"
done
set +m

deadline=$((SECONDS + 60))
while :; do
    check_alive || die "the cluster did not start"
    pending=()
    for name in "${NAMES[@]}"; do
        if [[ "$name" == gateway-* ]]; then
            grep -q '^listening on ' "$LOGS/$name.log" || pending+=("$name")
        else
            grep -q '^ready' "$LOGS/$name.log" || pending+=("$name")
        fi
    done
    (( ${#pending[@]} == 0 )) && break
    if (( SECONDS >= deadline )); then
        for name in "${pending[@]}"; do
            log "error: $name not ready after 60s; last lines of its log:"
            tail -n 30 "$LOGS/$name.log" | sed 's/^/  /' >&2
        done
        die "the cluster did not start"
    fi
    sleep 0.2
done
URLS=()
for i in 0 1; do
    addr="$(sed -n 's/^listening on \([^[:space:]]*\).*/\1/p' "$LOGS/gateway-$i.log" | head -n 1)"
    [[ -n "$addr" ]] || die "no address in $LOGS/gateway-$i.log"
    URLS+=("ws://$addr")
    # /readyz: the gateway sees Redis and fresh heartbeats of both workers.
    for ((t = 0; t < 100; t++)); do
        curl -fsS -o /dev/null "http://$addr/readyz" 2>/dev/null && break
        sleep 0.2
    done
done
log "cluster up: ${URLS[*]} (database $DB_NAME, bus prefix $PREFIX)"
GW0_PID="$(pid_of gateway-0)"

# --- scenarios ------------------------------------------------------------------------

if selected seed || selected query; then
    run_scenario seed seed --db-url "$DB_URL" --events "$SEED_EVENTS" --authors "$SEED_AUTHORS" --timeout 1800
fi
if selected query; then
    run_scenario query query --url "${URLS[0]}" --db-url "$DB_URL" --requests "$QUERY_REQUESTS"
fi
if selected ingest-c200; then
    run_scenario ingest-c200 ingest --url "${URLS[0]}" --connections 200 --events "$INGEST_C200_EVENTS" --timeout 600
fi
if selected ingest-c20; then
    run_scenario ingest-c20 ingest --url "${URLS[0]}" --connections 20 --events "$INGEST_C20_EVENTS" --timeout 600
fi
if selected ingest-open; then
    run_scenario ingest-open ingest --url "${URLS[0]}" --connections 20 --events "$OPEN_EVENTS" --rate "$OPEN_RATE" --timeout 600
fi
if selected fanout; then
    run_scenario fanout fanout --url "$(IFS=,; echo "${URLS[*]}")" --subs "$FANOUT_SUBS" \
        --publishers "$FANOUT_PUBLISHERS" --rate "$FANOUT_RATE" --duration "$FANOUT_SECS" --timeout 600
fi
if selected connections; then
    run_scenario connections connections --url "${URLS[0]}" --count "$CONNECTIONS" --pid "$GW0_PID" --timeout 600
fi

# --- report ---------------------------------------------------------------------------

check_alive || FAILED=1
for name in "${NAMES[@]}"; do
    n="$(grep -cE ' (WARN|ERROR) ' "$LOGS/$name.log" || true)"
    if (( n > 0 )); then
        log "$name logged $n warnings/errors; the first ones:"
        grep -E ' (WARN|ERROR) ' "$LOGS/$name.log" | head -n 5 | cut -c1-300 | sed 's/^/  /' >&2
    fi
done
rm -f "$OUT/.cpu-before" "$OUT/.cpu-after" "$OUT/.times"
"$BIN/relay-bench" report --results "$RESULTS" --out "$OUT" --profile "$PROFILE"
log "report: $OUT/report.md and $OUT/report.json; logs in $LOGS/"
exit "$FAILED"
