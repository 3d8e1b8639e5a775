#!/usr/bin/env bash
# Run the same SSE fan-out workloads against the bare-socket limit
# (taskstream-bare, bench/src/bare.rs), nchan (nginx + libnginx-mod-nchan) and
# taskstream, one after the other, and print one markdown table (with each
# server's deliveries/s as a share of the bare server's).
#
#   bench/compare.sh                      # workloads a-f against all three
#   bench/compare.sh --workloads "a f"    # a subset ("smoke" is one too)
#   bench/compare.sh --only taskstream    # one server (also: nchan, bare, or "bare taskstream")
#   bench/compare.sh --out DIR            # keep the JSON reports and logs in DIR
#   bench/compare.sh --sweep "100 1000 10000"
#       # instead of the workloads, for each subscriber count: "tput-N" (as a,
#       # max rate, 2,000,000/N events, 200 to 2,000) and "lat-N" (as b, at 20
#       # events/s for 5 s); bench/plot.py draws them (docs/performance.md)
#
# Every server is started fresh for every workload (so RSS per subscriber is
# measured on a clean process) on a loopback port, and stopped afterwards.
# Installs nothing: it says what is missing and stops.
# Environment: TASKSTREAM_BIN (default target/release/taskstream),
# BENCH_BIN (default: built with cargo; BARE_BIN beside it), NCHAN_PORT (18090),
# TASKSTREAM_PORT (18080), BARE_PORT (18070), BUDGET (seconds for all runs, default 570; 1200
# with --sweep),
# BENCH_ARGS (more taskstream-bench flags for every run, e.g. "--threads 2").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKLOADS="a b c d e f"
SWEEP=""
ONLY=""
OUT=""
NCHAN_PORT="${NCHAN_PORT:-18090}"
TASKSTREAM_PORT="${TASKSTREAM_PORT:-18080}"
BARE_PORT="${BARE_PORT:-18070}"
TASKSTREAM_BIN="${TASKSTREAM_BIN:-$ROOT/target/release/taskstream}"
NCHAN_MODULE="${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}"

while [ $# -gt 0 ]; do
    case "$1" in
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --sweep) SWEEP="$2"; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

SERVERS="bare nchan taskstream"
[ -n "$ONLY" ] && SERVERS="$ONLY"

# ---- what is needed -------------------------------------------------------
missing=0
if [[ " $SERVERS " == *" nchan "* ]]; then
    if ! command -v nginx >/dev/null 2>&1 || [ ! -f "$NCHAN_MODULE" ]; then
        echo "missing: nginx with the nchan module. Install it with:" >&2
        echo "    apt-get install -y nginx libnginx-mod-nchan" >&2
        echo "(or run with --only taskstream)" >&2
        missing=1
    fi
fi
if [[ " $SERVERS " == *" taskstream "* ]] && [ ! -x "$TASKSTREAM_BIN" ]; then
    echo "missing: the taskstream release binary at $TASKSTREAM_BIN. Build it with:" >&2
    echo "    cargo build --release" >&2
    missing=1
fi
if [ -z "${BENCH_BIN:-}" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "missing: cargo (to build taskstream-bench), or set BENCH_BIN" >&2
        missing=1
    fi
fi
[ "$missing" = 0 ] || exit 3

if [ -z "${BENCH_BIN:-}" ]; then
    echo "building taskstream-bench (cargo build --release -p taskstream-bench)..." >&2
    (cd "$ROOT" && cargo build --release -q -p taskstream-bench)
    BENCH_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/taskstream-bench"
fi
BARE_BIN="${BARE_BIN:-$(dirname "$BENCH_BIN")/taskstream-bare}"
if [[ " $SERVERS " == *" bare "* ]] && [ ! -x "$BARE_BIN" ]; then
    echo "missing: $BARE_BIN (cargo build --release -p taskstream-bench builds it)" >&2
    exit 3
fi

if [ -z "$OUT" ]; then
    OUT="$(mktemp -d /tmp/taskstream-compare.XXXXXX)"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/taskstream-compare-run.XXXXXX)"
NGINX_PID=""

cleanup() {
    if [ -n "$NGINX_PID" ] && kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -TERM "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}

start_nchan() {
    local prefix="$WORK/nchan"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$NCHAN_PORT|g" \
        -e "s|@WORKERS@|$(nproc)|g" -e "s|@MODULE@|$NCHAN_MODULE|g" \
        "$ROOT/bench/nchan.conf" >"$prefix/nginx.conf"
    nginx -p "$prefix" -c "$prefix/nginx.conf" -g 'daemon off;' \
        >"$prefix/stdout.log" 2>&1 &
    NGINX_PID=$!
    if ! wait_port "$NCHAN_PORT" 10; then
        echo "nchan did not start; its log:" >&2
        cat "$prefix/stdout.log" "$prefix/error.log" >&2 2>/dev/null || true
        exit 4
    fi
}

stop_nchan() {
    if [ -n "$NGINX_PID" ]; then
        cp "$WORK/nchan/error.log" "$OUT/nchan-$1.error.log" 2>/dev/null || true
        kill -TERM "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
        NGINX_PID=""
    fi
}

# Seconds each run may take at most (the tool stops by itself then and
# reports what was missing as "not delivered in time"); with the two servers
# that keeps the whole comparison under 10 minutes.
cap_for() {
    case "$1" in
        a) echo 60 ;; b) echo 40 ;; c) echo 30 ;; d) echo 60 ;; e) echo 120 ;;
        f) echo 25 ;; smoke) echo 20 ;; lat-*) echo 30 ;; *) echo 60 ;;
    esac
}

# The tool's flags for one run: a preset workload, or a point of the sweep.
args_for() {
    local n
    case "$1" in
        smoke) echo --smoke ;;
        tput-*)
            n="${1#tput-}"
            echo --workload a -n "$n" -m "$(( (2000000 / n) < 200 ? 200 : ((2000000 / n) > 2000 ? 2000 : 2000000 / n) ))"
            ;;
        lat-*) echo --workload b -n "${1#lat-}" --rate 20 -m 100 ;;
        *) echo --workload "$1" ;;
    esac
}

RUNS="$WORKLOADS"
if [ -n "$SWEEP" ]; then
    RUNS=""
    for n in $SWEEP; do RUNS="$RUNS tput-$n lat-$n"; done
    BUDGET="${BUDGET:-1200}"
fi
BUDGET="${BUDGET:-570}"

for server in $SERVERS; do
    case "$server" in
        nchan) port=$NCHAN_PORT ;;
        taskstream) port=$TASKSTREAM_PORT ;;
        bare) port=$BARE_PORT ;;
        *) echo "unknown server $server (bare, nchan or taskstream)" >&2; exit 2 ;;
    esac
    if ! port_free "$port"; then
        echo "port $port is already in use; set ${server^^}_PORT" >&2
        exit 4
    fi
done

START=$(date +%s)
echo "reports and logs: $OUT" >&2
# Workload by workload, each server in turn, so both see similar conditions.
for w in $RUNS; do
    for server in $SERVERS; do
        if [ "$server" = bare ] && [ "$w" = e ]; then
            echo "=== skipping bare, workload e: the bare server keeps no history to resume from" >&2
            continue
        fi
        elapsed=$(($(date +%s) - START))
        cap=$(cap_for "$w")
        if [ $((elapsed + cap)) -gt "$BUDGET" ]; then
            cap=$((BUDGET - elapsed))
        fi
        if [ "$cap" -lt 10 ]; then
            echo "=== skipping $server, workload $w: the ${BUDGET} s budget is spent" >&2
            continue
        fi
        case "$server" in
            nchan) port=$NCHAN_PORT ;;
            taskstream) port=$TASKSTREAM_PORT ;;
            bare) port=$BARE_PORT ;;
        esac
        echo "=== $server, workload $w (cap ${cap} s; ${elapsed} s so far, load $(cut -d' ' -f1 /proc/loadavg))" >&2
        json="$OUT/$server-$w.json"
        read -r -a preset <<<"$(args_for "$w")"
        common=("${preset[@]}" --label "$server" --out "$json"
                --max-duration "$cap" --url "http://127.0.0.1:$port")
        # shellcheck disable=SC2206 # word splitting is the point
        common+=(${BENCH_ARGS:-})
        rc=0
        if [ "$server" = nchan ]; then
            start_nchan
            # RSS/CPU: the tool finds the master and workers by the port.
            "$BENCH_BIN" --target nchan "${common[@]}" \
                2>"$OUT/$server-$w.log" || rc=$?
            stop_nchan "$w"
        elif [ "$server" = bare ]; then
            # The bench's taskstream requests are what the bare server speaks.
            "$BENCH_BIN" --target taskstream --spawn-server "$BARE_BIN" \
                --spawn-args="--bind 127.0.0.1:{port}" \
                --server-log "$OUT/$server-$w.server.log" "${common[@]}" \
                2>"$OUT/$server-$w.log" || rc=$?
        else
            "$BENCH_BIN" --target taskstream --spawn-server "$TASKSTREAM_BIN" \
                --server-log "$OUT/$server-$w.server.log" "${common[@]}" \
                2>"$OUT/$server-$w.log" || rc=$?
        fi
        # Tail of the human summary: result, problems.
        grep -E '^(result|PROBLEM|WARNING|storm:|  all recon)' "$OUT/$server-$w.log" >&2 || true
        if [ "$rc" -ge 2 ] || [ ! -s "$json" ]; then
            echo "run failed (exit $rc):" >&2
            tail -5 "$OUT/$server-$w.log" >&2
        fi
    done
done

echo >&2
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(($(date +%s) - START)) s in all." >&2
shopt -s nullglob
reports=("$OUT"/*.json)
if [ ${#reports[@]} -eq 0 ]; then
    echo "no reports were written" >&2
    exit 1
fi
"$BENCH_BIN" --table "${reports[@]}" | tee "$OUT/table.md"
