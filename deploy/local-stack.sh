#!/usr/bin/env bash
# Local development stack for the relay: a private Redis and Postgres plus the
# relay processes (gateways, ingest-worker, query-worker).
#
# Usage:
#   deploy/local-stack.sh services-up <state-dir> <redis-port> <pg-port>
#   deploy/local-stack.sh services-down <state-dir>
#   deploy/local-stack.sh test-env <state-dir>
#   deploy/local-stack.sh clean <state-dir>
#   deploy/local-stack.sh run
#   deploy/local-stack.sh redis-start <state-dir> <redis-port>   just Redis (fault tests)
#   deploy/local-stack.sh redis-stop <state-dir>
#   deploy/local-stack.sh pg-start <state-dir> <pg-port>         just Postgres (fault tests)
#   deploy/local-stack.sh pg-stop <state-dir>
#   deploy/local-stack.sh ensure-nginx   install nginx and openssl if missing (the tests'
#                                        load balancer and TLS terminator), starting no service
#
# Environment:
#   FAST=1            non-durable services (fsync off, no Redis persistence); for tests
#   GATEWAYS          run: number of gateways (default 1)
#   BASE_PORT         run: gateway i listens on BASE_PORT+i (default 7777)
#   PROFILE           run: cargo profile, release or debug (default release)
#   REDIS_PORT        run: Redis port (default 6390)
#   PG_PORT           run: Postgres port (default 5440)
#   STARTUP_TIMEOUT   seconds to wait for services and processes (default 30 / 60)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="local-stack"

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 services-up <state-dir> <redis-port> <pg-port>
       $0 services-down <state-dir>
       $0 test-env <state-dir>
       $0 clean <state-dir>
       $0 run
       $0 redis-start <state-dir> <redis-port>
       $0 redis-stop <state-dir>
       $0 pg-start <state-dir> <pg-port>
       $0 pg-stop <state-dir>
       $0 ensure-nginx
EOF
    exit 2
}

is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 > 0 && $1 < 65536 )); }

# Absolute path of a (possibly not yet existing) directory, relative paths
# being taken from the current directory.
abs_dir() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# Print the last lines of a log file, indented, if it exists.
tail_log() {
    local file="$1" lines="${2:-40}"
    if [[ -f "$file" ]]; then
        printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" | sed 's/^/  /' >&2
        printf -- '-----\n' >&2
    else
        printf '(no log file %s)\n' "$file" >&2
    fi
}

# ---------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------

PG_BIN=""

find_pg_bin() {
    PG_BIN=""
    local dir best="" best_ver=-1 ver
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] || continue
        ver="$(basename "$(dirname "$dir")")"
        ver="${ver%%.*}"
        [[ "$ver" =~ ^[0-9]+$ ]] || continue
        if (( ver > best_ver )); then
            best_ver="$ver"
            best="$dir"
        fi
    done
    if [[ -n "$best" ]]; then
        PG_BIN="$best"
        return 0
    fi
    local initdb
    if initdb="$(command -v initdb 2>/dev/null)" && [[ -x "$(dirname "$initdb")/pg_ctl" ]]; then
        PG_BIN="$(dirname "$initdb")"
        return 0
    fi
    return 1
}

have_services() {
    command -v redis-server >/dev/null 2>&1 &&
        command -v redis-cli >/dev/null 2>&1 &&
        find_pg_bin &&
        [[ -x "$PG_BIN/psql" || -n "$(command -v psql 2>/dev/null)" ]]
}

ensure_installed() {
    if have_services; then
        return 0
    fi
    log "Redis and/or Postgres not found; installing them from Debian packages"
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install redis-server and postgresql yourself"
    local -a as_root=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "not root and sudo is not available: install redis-server and postgresql yourself (apt-get install redis-server postgresql)"
        as_root=(sudo)
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update ||
        die "apt-get update failed"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server postgresql ||
        die "apt-get install redis-server postgresql failed"
    have_services || die "Redis/Postgres still not found after installing them"
}

# nginx is not always on PATH for non-root users (/usr/sbin).
have_nginx() {
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]
}

# Install nginx (the tests run their own instances: a load balancer, a TLS terminator) and
# openssl (the TLS test makes its certificates with it) without letting the package start
# the system service: a policy-rc.d that refuses every service start is in place during the
# install (unless one already exists).
ensure_nginx() {
    if have_nginx && command -v openssl >/dev/null 2>&1; then
        return 0
    fi
    log "nginx or openssl not found; installing them from Debian packages (no service is started)"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install nginx yourself"
    local -a as_root=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "not root and sudo is not available: install nginx yourself (apt-get install nginx)"
        as_root=(sudo)
    fi
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# Temporary, from deploy/local-stack.sh ensure-nginx: start no services.\nexit 101\n' |
            "${as_root[@]}" tee "$policy" >/dev/null && "${as_root[@]}" chmod 755 "$policy" && added=1
    fi
    local rc=0
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update || rc=$?
    if (( rc == 0 )); then
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx openssl ||
            "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light openssl ||
            rc=$?
    fi
    if (( added )); then
        "${as_root[@]}" rm -f "$policy"
    fi
    (( rc == 0 )) || die "installing nginx failed"
    have_nginx || die "nginx still not found after installing it"
    command -v openssl >/dev/null 2>&1 || die "openssl still not found after installing it"
}

# ---------------------------------------------------------------------------
# Postgres
# ---------------------------------------------------------------------------

# When running as root, Postgres runs as the 'postgres' system user, because
# initdb and pg_ctl refuse to run as root.
PG_USER=""

pg_user_init() {
    if [[ "$(id -u)" -eq 0 ]]; then
        id -u postgres >/dev/null 2>&1 ||
            die "running as root but there is no 'postgres' system user to run Postgres as"
        command -v runuser >/dev/null 2>&1 || die "running as root but runuser is not available"
        PG_USER=postgres
    else
        PG_USER=""
    fi
}

# Run a command as the Postgres user (from / so that an unreadable working
# directory does not matter).
as_pg() {
    if [[ -n "$PG_USER" ]]; then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        "$@"
    fi
}

# Where the Postgres files of a state dir live: normally inside the state dir.
# If the postgres user cannot reach the state dir (a parent directory it may not
# traverse), fall back to a per-state-dir directory under /tmp.
pg_base_for() {
    local state="$1"
    if [[ -z "$PG_USER" ]] || as_pg test -x "$state" 2>/dev/null; then
        printf '%s\n' "$state"
    else
        local sum
        sum="$(printf '%s' "$state" | cksum | cut -d' ' -f1)"
        printf '%s\n' "${TMPDIR:-/tmp}/relay-local-stack-$sum"
    fi
}

# Set PG_DATA, PG_SOCK, PG_LOG for a state dir.
pg_paths() {
    local state="$1" base
    base="$(pg_base_for "$state")"
    PG_DATA="$base/pg"
    PG_LOG="$base/pg.log"
    PG_SOCK="$base/pg-sock"
    # Unix socket paths are limited to ~107 bytes.
    if (( ${#PG_SOCK} > 90 )); then
        local sum
        sum="$(printf '%s' "$state" | cksum | cut -d' ' -f1)"
        PG_SOCK="${TMPDIR:-/tmp}/relay-pgsock-$sum"
    fi
}

# Make a directory (and give it to the Postgres user when running as root).
pg_mkdir() {
    local dir="$1" mode="$2"
    mkdir -p "$dir"
    if [[ -n "$PG_USER" ]]; then
        chown "$PG_USER:" "$dir"
    fi
    chmod "$mode" "$dir"
}

pg_ready() {
    local port="$1"
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2 >/dev/null 2>&1
}

pg_running() {
    [[ -f "$PG_DATA/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_psql() {
    local port="$1"
    shift
    local psql="$PG_BIN/psql"
    [[ -x "$psql" ]] || psql="psql"
    "$psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

pg_write_conf() {
    local port="$1" bin_major="$2" sock_escaped="${PG_SOCK//\'/\'\'}" conf="$PG_DATA/local-stack.conf"
    # Shared buffers: an eighth of the machine's memory, between 128 MB and 1 GB.
    local mem_mb
    mem_mb="$(awk '/^MemTotal:/ { m = int($2 / 1024 / 8); if (m < 128) m = 128; if (m > 1024) m = 1024; print m }' /proc/meminfo 2>/dev/null)"
    [[ "$mem_mb" =~ ^[0-9]+$ ]] || mem_mb=128
    {
        echo "# Written by deploy/local-stack.sh on every start; do not edit."
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$sock_escaped'"
        echo "max_connections = 200"
        # Write-heavy tuning: Postgres's defaults (128 MB of buffers, a checkpoint per GB
        # of WAL) make every backend write pages itself and every page's first change
        # after a checkpoint a full-page image; under ingest that doubled the WAL per event.
        echo "shared_buffers = ${mem_mb}MB"
        echo "wal_buffers = 64MB"
        echo "max_wal_size = 8GB"
        echo "checkpoint_timeout = 30min"
        # lz4 costs less CPU than pglz; Postgres 15 is the first to take it here.
        if ((bin_major >= 15)); then
            echo "wal_compression = lz4"
        else
            echo "wal_compression = on"
        fi
        if [[ "${FAST:-0}" == 1 ]]; then
            echo "fsync = off"
            echo "synchronous_commit = off"
            echo "full_page_writes = off"
        fi
    } >"$conf"
    if [[ -n "$PG_USER" ]]; then
        chown "$PG_USER:" "$conf"
    fi
}

pg_up() {
    local state="$1" port="$2"
    pg_paths "$state"
    if [[ "$PG_DATA" != "$state/pg" ]]; then
        log "the postgres user cannot reach $state; keeping Postgres files in $(dirname "$PG_DATA")"
    fi

    local bin_major
    bin_major="$("$PG_BIN/pg_ctl" --version | sed -E 's/.* ([0-9]+)[.0-9]*.*/\1/')"

    if [[ -f "$PG_DATA/PG_VERSION" ]]; then
        local data_major
        data_major="$(cat "$PG_DATA/PG_VERSION")"
        [[ "$data_major" == "$bin_major" ]] ||
            die "$PG_DATA was created by Postgres $data_major but the binaries are Postgres $bin_major; remove it (make clean-stack)"
        if [[ -n "$PG_USER" && "$(stat -c %U "$PG_DATA")" != "$PG_USER" ]]; then
            chown -R "$PG_USER:" "$PG_DATA"
        fi
    else
        # A data dir without PG_VERSION is a leftover from a failed initdb.
        rm -rf "$PG_DATA"
        pg_mkdir "$PG_DATA" 700
        log "initializing Postgres $bin_major data dir $PG_DATA"
        if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" --auth=trust -U postgres -E UTF8 --no-locale \
            >"$state/initdb.log" 2>&1; then
            tail_log "$state/initdb.log"
            die "initdb failed"
        fi
        echo "include_if_exists = 'local-stack.conf'" >>"$PG_DATA/postgresql.conf"
    fi

    if pg_running; then
        if pg_ready "$port"; then
            log "Postgres already running on 127.0.0.1:$port (reusing it)"
            return 0
        fi
        log "Postgres is running but not answering on port $port; restarting it"
        as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 30 -s >/dev/null 2>&1 || true
    fi

    pg_mkdir "$PG_SOCK" 700
    touch "$PG_LOG"
    if [[ -n "$PG_USER" ]]; then
        chown "$PG_USER:" "$PG_LOG"
    fi
    pg_write_conf "$port" "$bin_major"

    local timeout="${STARTUP_TIMEOUT:-30}"
    if ! as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$timeout" -s >/dev/null 2>&1; then
        tail_log "$PG_LOG"
        die "Postgres did not start on 127.0.0.1:$port (log: $PG_LOG)"
    fi
    local deadline=$((SECONDS + timeout))
    until pg_ready "$port"; do
        if (( SECONDS >= deadline )); then
            tail_log "$PG_LOG"
            die "Postgres is not answering on 127.0.0.1:$port after ${timeout}s (log: $PG_LOG)"
        fi
        sleep 0.2
    done
    log "Postgres running on 127.0.0.1:$port (data: $PG_DATA, log: $PG_LOG)"
}

pg_create_db() {
    local port="$1" db="$2"
    local exists
    exists="$(pg_psql "$port" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ||
        die "could not query Postgres on 127.0.0.1:$port"
    if [[ "$exists" != 1 ]]; then
        pg_psql "$port" -d postgres -c "CREATE DATABASE \"$db\"" >/dev/null ||
            die "could not create database $db"
        log "created database $db"
    fi
}

pg_down() {
    local state="$1" base
    # Check both possible locations (see pg_base_for).
    for base in "$state" "$(pg_base_for "$state")"; do
        local data="$base/pg"
        [[ -f "$data/postmaster.pid" ]] || continue
        local owner
        owner="$(stat -c %U "$data")"
        local -a run=()
        if [[ "$(id -u)" -eq 0 && "$owner" != root ]]; then
            run=(runuser -u "$owner" --)
        fi
        if (cd / && "${run[@]}" "$PG_BIN/pg_ctl" status -D "$data" >/dev/null 2>&1); then
            log "stopping Postgres ($data)"
            (cd / && "${run[@]}" "$PG_BIN/pg_ctl" stop -D "$data" -m fast -w -t 30 -s >/dev/null 2>&1) ||
                (cd / && "${run[@]}" "$PG_BIN/pg_ctl" stop -D "$data" -m immediate -w -t 30 -s >/dev/null 2>&1) ||
                log "warning: could not stop Postgres ($data)"
        fi
    done
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

# Whether a process exists and is not a zombie (an exited process that its
# parent, possibly a container's init, has not reaped yet).
proc_alive() {
    local pid="$1" stat
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }"
        [[ "${stat%% *}" != Z ]] || return 1
    fi
    return 0
}

# PID from a pidfile if that process is alive and is a redis-server.
redis_pid() {
    local pidfile="$1" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    proc_alive "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || ps -o comm= -p "$pid")" == redis-server* ]] || return 1
    printf '%s\n' "$pid"
}

redis_ready() {
    local port="$1"
    [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]]
}

redis_kill() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        proc_alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

redis_up() {
    local state="$1" port="$2"
    local dir="$state/redis"
    local pidfile="$dir/redis.pid" logfile="$dir/redis.log"
    mkdir -p "$dir"

    local pid
    if pid="$(redis_pid "$pidfile")"; then
        if redis_ready "$port"; then
            log "Redis already running on 127.0.0.1:$port (reusing it)"
            return 0
        fi
        log "Redis (pid $pid) is not answering on port $port; restarting it"
        redis_kill "$pid"
    fi
    rm -f "$pidfile"

    local -a persistence
    if [[ "${FAST:-0}" == 1 ]]; then
        persistence=(--save '' --appendonly no)
    else
        persistence=(--appendonly yes)
    fi
    if ! redis-server --bind 127.0.0.1 --port "$port" --daemonize yes \
        --dir "$dir" --pidfile "$pidfile" --logfile "$logfile" \
        "${persistence[@]}" >"$dir/redis-server.out" 2>&1; then
        tail_log "$dir/redis-server.out"
        tail_log "$logfile"
        die "redis-server failed to start"
    fi

    local timeout="${STARTUP_TIMEOUT:-30}"
    local deadline=$((SECONDS + timeout))
    until redis_ready "$port"; do
        if (( SECONDS >= deadline )); then
            tail_log "$logfile"
            die "Redis is not answering on 127.0.0.1:$port after ${timeout}s (log: $logfile)"
        fi
        # Once the daemon wrote its pidfile, a dead process means a failed start.
        if [[ -f "$pidfile" ]] && ! redis_pid "$pidfile" >/dev/null; then
            sleep 0.2
            redis_ready "$port" && break
            tail_log "$logfile"
            die "Redis exited during startup on 127.0.0.1:$port (log: $logfile)"
        fi
        sleep 0.1
    done
    if ! redis_pid "$pidfile" >/dev/null; then
        tail_log "$logfile"
        die "something else answers on 127.0.0.1:$port but our Redis is not running (port in use?)"
    fi
    log "Redis running on 127.0.0.1:$port (dir: $dir)"
}

redis_down() {
    local state="$1" pid
    if pid="$(redis_pid "$state/redis/redis.pid")"; then
        log "stopping Redis (pid $pid)"
        redis_kill "$pid"
    fi
    rm -f "$state/redis/redis.pid"
}

# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------

services_up() {
    local state redis_port="$2" pg_port="$3"
    state="$(abs_dir "$1")"
    is_port "$redis_port" || die "bad Redis port: $redis_port"
    is_port "$pg_port" || die "bad Postgres port: $pg_port"
    [[ "$redis_port" != "$pg_port" ]] || die "Redis and Postgres ports must differ"

    ensure_installed
    pg_user_init
    mkdir -p "$state"
    # The postgres user must be able to traverse the state dir.
    chmod o+x "$state" 2>/dev/null || true

    redis_up "$state" "$redis_port"
    pg_up "$state" "$pg_port"
    pg_create_db "$pg_port" nostr

    cat >"$state/stack.env" <<EOF
REDIS_PORT=$redis_port
PG_PORT=$pg_port
EOF
}

services_down() {
    local state
    state="$(abs_dir "$1")"
    [[ -d "$state" ]] || return 0
    if [[ "$(id -u)" -eq 0 ]] && id -u postgres >/dev/null 2>&1; then
        PG_USER=postgres
    fi
    redis_down "$state"
    if find_pg_bin; then
        pg_down "$state"
    fi
    return 0
}

# Stop the services of a state dir and remove it (and the Postgres files kept
# outside it when the postgres user could not reach it).
clean_state() {
    local state
    state="$(abs_dir "$1")"
    services_down "$state"
    if [[ -n "$PG_USER" ]]; then
        local base
        base="$(pg_base_for "$state")"
        [[ "$base" == "$state" ]] || rm -rf "$base"
    fi
    rm -rf "$state"
}

# Start or stop only Redis or only Postgres of a state dir (the others keep running);
# the fault tests use these to take a private service away and bring it back on the
# same port with the same data.
redis_start() {
    local state port="$2"
    state="$(abs_dir "$1")"
    is_port "$port" || die "bad Redis port: $port"
    ensure_installed
    mkdir -p "$state"
    redis_up "$state" "$port"
}

redis_stop() {
    local state
    state="$(abs_dir "$1")"
    [[ -d "$state" ]] || return 0
    redis_down "$state"
}

pg_start() {
    local state port="$2"
    state="$(abs_dir "$1")"
    is_port "$port" || die "bad Postgres port: $port"
    ensure_installed
    pg_user_init
    mkdir -p "$state"
    # The postgres user must be able to traverse the state dir.
    chmod o+x "$state" 2>/dev/null || true
    pg_up "$state" "$port"
}

pg_stop() {
    local state
    state="$(abs_dir "$1")"
    [[ -d "$state" ]] || return 0
    if [[ "$(id -u)" -eq 0 ]] && id -u postgres >/dev/null 2>&1; then
        PG_USER=postgres
    fi
    find_pg_bin || die "Postgres binaries not found"
    pg_down "$state"
}

test_env() {
    local state
    state="$(abs_dir "$1")"
    [[ -f "$state/stack.env" ]] || die "no stack in $state (run services-up first)"
    local REDIS_PORT="" PG_PORT=""
    # shellcheck source=/dev/null
    . "$state/stack.env"
    if ! is_port "$REDIS_PORT" || ! is_port "$PG_PORT"; then
        die "bad $state/stack.env"
    fi
    printf 'export RELAY_TEST_REDIS_URL=redis://127.0.0.1:%s/\n' "$REDIS_PORT"
    printf 'export RELAY_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:%s/postgres\n' "$PG_PORT"
}

# --- run -------------------------------------------------------------------

RUN_NAMES=()
RUN_PIDS=()
RUN_STATE=""
RUN_SERVICES=0

# Stop one relay process: SIGTERM, then SIGKILL after a grace period.
stop_pid() {
    local name="$1" pid="$2" i
    proc_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        proc_alive "$pid" || break
        sleep 0.1
    done
    if proc_alive "$pid"; then
        log "$name did not stop in 10s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

run_cleanup() {
    local i
    # Gateways first, then the workers.
    for i in "${!RUN_NAMES[@]}"; do
        [[ "${RUN_NAMES[$i]}" == gateway-* ]] && stop_pid "${RUN_NAMES[$i]}" "${RUN_PIDS[$i]}"
    done
    for i in "${!RUN_NAMES[@]}"; do
        [[ "${RUN_NAMES[$i]}" != gateway-* ]] && stop_pid "${RUN_NAMES[$i]}" "${RUN_PIDS[$i]}"
    done
    RUN_NAMES=()
    RUN_PIDS=()
    if (( RUN_SERVICES )); then
        services_down "$RUN_STATE"
        RUN_SERVICES=0
    fi
}

run_on_signal() {
    trap - INT TERM EXIT
    echo >&2
    log "shutting down"
    run_cleanup
    log "stopped"
    exit 0
}

run_on_exit() {
    local rc=$?
    trap - INT TERM EXIT
    run_cleanup
    exit "$rc"
}

# Start a relay process in the background, stdout and stderr to its log file.
start_proc() {
    local name="$1" bin="$2" logfile="$RUN_STATE/logs/$1.log"
    shift 2
    env "$@" "$bin" </dev/null >"$logfile" 2>&1 &
    RUN_NAMES+=("$name")
    RUN_PIDS+=("$!")
    log "started $name (pid $!, log: ${logfile#"$REPO_ROOT"/})"
}

# If a relay process has exited, report it with its log tail and fail.
check_alive() {
    local i
    for i in "${!RUN_NAMES[@]}"; do
        if ! proc_alive "${RUN_PIDS[$i]}"; then
            local rc=0
            wait "${RUN_PIDS[$i]}" 2>/dev/null || rc=$?
            printf '[%s] error: %s exited unexpectedly (status %s)\n' "$PROG" "${RUN_NAMES[$i]}" "$rc" >&2
            tail_log "$RUN_STATE/logs/${RUN_NAMES[$i]}.log"
            return 1
        fi
    done
}

run_stack() {
    local gateways="${GATEWAYS:-1}" base_port="${BASE_PORT:-7777}" profile="${PROFILE:-release}"
    local redis_port="${REDIS_PORT:-6390}" pg_port="${PG_PORT:-5440}"
    if ! [[ "$gateways" =~ ^[1-9][0-9]*$ ]]; then
        die "GATEWAYS must be a positive integer (got '$gateways')"
    fi
    if ! is_port "$base_port" || ! is_port $((base_port + gateways - 1)); then
        die "bad BASE_PORT: $base_port"
    fi
    case "$profile" in
        release | debug) ;;
        *) die "PROFILE must be release or debug (got '$profile')" ;;
    esac

    cd "$REPO_ROOT"
    RUN_STATE="$REPO_ROOT/target/stack"
    # Each background process gets its own process group, so a Ctrl-C reaches
    # only this script, which then stops everything in order.
    set -m
    trap run_on_signal INT TERM
    trap run_on_exit EXIT

    RUN_SERVICES=1
    services_up "$RUN_STATE" "$redis_port" "$pg_port"

    local -a cargo_args=(build -p gateway -p ingest-worker -p query-worker --bins)
    [[ "$profile" == release ]] && cargo_args+=(--release)
    log "cargo ${cargo_args[*]}"
    cargo "${cargo_args[@]}"

    local bindir="$REPO_ROOT/target/$profile" b
    for b in gateway ingest-worker query-worker; do
        [[ -x "$bindir/$b" ]] || die "$bindir/$b not found after cargo build"
    done

    mkdir -p "$RUN_STATE/logs"
    local -a common=(
        "RELAY_REDIS_URL=redis://127.0.0.1:$redis_port/"
        "RELAY_BUS_PREFIX=${RELAY_BUS_PREFIX:-nostr}"
        "RUST_LOG=${RUST_LOG:-info}"
        "NO_COLOR=${NO_COLOR:-1}"
    )
    # One relay, one public URL list: every gateway's address, given alike to the gateways
    # (NIP-42, NIP-98) and the ingest worker (NIP-62 requests to vanish naming this relay).
    local i port public_url=""
    for ((i = 0; i < gateways; i++)); do
        public_url+="${public_url:+,}ws://127.0.0.1:$((base_port + i))"
    done
    public_url="${RELAY_PUBLIC_URL:-$public_url}"
    local db_url="postgres://postgres@127.0.0.1:$pg_port/nostr"
    start_proc ingest-worker "$bindir/ingest-worker" "${common[@]}" "RELAY_DATABASE_URL=$db_url" \
        "RELAY_PUBLIC_URL=$public_url"
    start_proc query-worker "$bindir/query-worker" "${common[@]}" "RELAY_DATABASE_URL=$db_url"
    for ((i = 0; i < gateways; i++)); do
        port=$((base_port + i))
        start_proc "gateway-$i" "$bindir/gateway" "${common[@]}" \
            "RELAY_LISTEN=127.0.0.1:$port" "RELAY_PUBLIC_URL=$public_url"
    done

    # Wait for the workers' "ready" and the gateways' "listening on <addr>".
    local timeout="${STARTUP_TIMEOUT:-60}" deadline pending name
    deadline=$((SECONDS + timeout))
    while :; do
        check_alive || exit 1
        pending=()
        for name in "${RUN_NAMES[@]}"; do
            if [[ "$name" == gateway-* ]]; then
                grep -q '^listening on ' "$RUN_STATE/logs/$name.log" || pending+=("$name")
            else
                grep -q '^ready' "$RUN_STATE/logs/$name.log" || pending+=("$name")
            fi
        done
        (( ${#pending[@]} == 0 )) && break
        if (( SECONDS >= deadline )); then
            for name in "${pending[@]}"; do
                printf '[%s] error: %s not ready after %ss\n' "$PROG" "$name" "$timeout" >&2
                tail_log "$RUN_STATE/logs/$name.log"
            done
            exit 1
        fi
        sleep 0.2
    done

    local -a addrs=()
    for ((i = 0; i < gateways; i++)); do
        addrs+=("$(sed -n 's/^listening on \([^[:space:]]*\).*/\1/p' "$RUN_STATE/logs/gateway-$i.log" | head -n 1)")
    done

    echo
    echo "Relay is up: $gateways gateway(s), 1 ingest-worker, 1 query-worker ($profile build)"
    echo
    for addr in "${addrs[@]}"; do
        echo "  relay URL:  ws://$addr"
    done
    echo
    echo "  NIP-11:     curl -H 'Accept: application/nostr+json' http://${addrs[0]}"
    echo "  logs:       target/stack/logs/  (gateway-N.log, ingest-worker.log, query-worker.log)"
    echo "  services:   Redis 127.0.0.1:$redis_port, Postgres postgres://postgres@127.0.0.1:$pg_port/nostr"
    echo
    echo "Press Ctrl-C to stop."

    # Wait until a signal arrives (handled by the trap) or a process dies.
    local dead rc
    while :; do
        dead="" rc=0
        wait -n -p dead "${RUN_PIDS[@]}" 2>/dev/null || rc=$?
        if [[ -n "$dead" ]]; then
            for i in "${!RUN_PIDS[@]}"; do
                [[ "${RUN_PIDS[$i]}" == "$dead" ]] || continue
                printf '[%s] error: %s exited unexpectedly (status %s)\n' "$PROG" "${RUN_NAMES[$i]}" "$rc" >&2
                tail_log "$RUN_STATE/logs/${RUN_NAMES[$i]}.log"
            done
            exit 1
        fi
        check_alive || exit 1
    done
}

main() {
    (( $# >= 1 )) || usage
    local cmd="$1"
    shift
    case "$cmd" in
        services-up)
            (( $# == 3 )) || usage
            services_up "$@"
            ;;
        services-down)
            (( $# == 1 )) || usage
            services_down "$1"
            ;;
        clean)
            (( $# == 1 )) || usage
            clean_state "$1"
            ;;
        test-env)
            (( $# == 1 )) || usage
            test_env "$1"
            ;;
        run)
            (( $# == 0 )) || usage
            run_stack
            ;;
        redis-start)
            (( $# == 2 )) || usage
            redis_start "$@"
            ;;
        redis-stop)
            (( $# == 1 )) || usage
            redis_stop "$1"
            ;;
        pg-start)
            (( $# == 2 )) || usage
            pg_start "$@"
            ;;
        pg-stop)
            (( $# == 1 )) || usage
            pg_stop "$1"
            ;;
        ensure-nginx)
            (( $# == 0 )) || usage
            ensure_nginx
            ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
