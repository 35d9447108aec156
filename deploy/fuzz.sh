#!/usr/bin/env bash
# Fuzzes the relay's protocol parsers with cargo-fuzz (libFuzzer): the targets in
# fuzz/fuzz_targets/ (client_message, filter, relay_message), each for a fixed time, seeded
# from tests/corpus/hostile/ and helped by the dictionary fuzz/nostr.dict. Prints the
# executions per target and exits non-zero when a target crashed (a panic, a failed
# round-trip assertion, a timeout or running out of memory); the crashing input is saved
# under fuzz/artifacts/<target>/.
#
# Usage:
#   deploy/fuzz.sh [seconds-per-target] [target...]
#
# Environment:
#   FUZZ_MAX_LEN      largest input libFuzzer generates, in bytes (default 65536; seeds
#                     that are larger are truncated)
#   FUZZ_TIMEOUT      seconds one input may take before it counts as a hang (default 10)
#   FUZZ_RSS_MB       memory limit of the fuzzing process (default 2048)
#   FUZZ_SANITIZER    cargo fuzz --sanitizer (default address; none is about twice as fast)
#
# cargo fuzz needs nightly-only compiler flags; on a stable toolchain this script sets
# RUSTC_BOOTSTRAP=1 for the fuzz build (only there: the fuzz crate is not a member of the
# relay's workspace). cargo-fuzz is installed with `cargo install` when missing.
# The corpus libFuzzer grows is kept in fuzz/corpus/<target>/, logs in target/fuzz-logs/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="fuzz"

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 2; }

SECS="${1:-60}"
[[ "$SECS" =~ ^[0-9]+$ ]] && (( SECS > 0 )) || die "seconds-per-target must be a positive integer, not '$SECS'"
shift || true
TARGETS=("$@")
if (( ${#TARGETS[@]} == 0 )); then
    TARGETS=(client_message filter relay_message)
fi
MAX_LEN="${FUZZ_MAX_LEN:-65536}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
SANITIZER="${FUZZ_SANITIZER:-address}"
SEEDS="$REPO_ROOT/tests/corpus/hostile"
LOG_DIR="$REPO_ROOT/target/fuzz-logs"

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
[[ -d "$SEEDS" ]] || die "no seed corpus at $SEEDS"
mkdir -p "$LOG_DIR"

export RUSTC_BOOTSTRAP=1
cd "$REPO_ROOT/fuzz"

log "building ${TARGETS[*]} (sanitizer: $SANITIZER)"
for target in "${TARGETS[@]}"; do
    cargo fuzz build --sanitizer "$SANITIZER" "$target"
done

declare -A RUNS=()
declare -A STATUS=()
crashed=0
for target in "${TARGETS[@]}"; do
    corpus="$REPO_ROOT/fuzz/corpus/$target"
    mkdir -p "$corpus"
    logfile="$LOG_DIR/$target.log"
    log "running $target for ${SECS}s (log: $logfile)"
    set +e
    cargo fuzz run --sanitizer "$SANITIZER" "$target" "$corpus" "$SEEDS" -- \
        -max_total_time="$SECS" -max_len="$MAX_LEN" -timeout="$TIMEOUT" \
        -rss_limit_mb="$RSS_MB" -dict="$REPO_ROOT/fuzz/nostr.dict" -print_final_stats=1 >"$logfile" 2>&1
    rc=$?
    set -e
    runs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$logfile" | tail -n 1)"
    if [[ -z "$runs" ]]; then
        runs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$logfile" | tail -n 1)"
    fi
    RUNS[$target]="${runs:-?}"
    if (( rc == 0 )); then
        STATUS[$target]="ok"
    else
        crashed=1
        STATUS[$target]="CRASH (exit $rc)"
        log "$target crashed; the end of its log:"
        grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to|^Output of|assertion" "$logfile" | head -n 20 >&2 || true
        tail -n 30 "$logfile" >&2
    fi
done

printf '\n%-16s %14s  %s\n' "target" "executions" "result"
total=0
for target in "${TARGETS[@]}"; do
    printf '%-16s %14s  %s\n' "$target" "${RUNS[$target]}" "${STATUS[$target]}"
    [[ "${RUNS[$target]}" =~ ^[0-9]+$ ]] && total=$(( total + RUNS[$target] ))
done
printf '%-16s %14s  (%ss per target)\n' "total" "$total" "$SECS"

if (( crashed )); then
    log "crashing inputs:"
    find "$REPO_ROOT/fuzz/artifacts" -type f 2>/dev/null | sed 's/^/  /' >&2
    exit 1
fi
