#!/usr/bin/env bash
# The --data-dir figures of docs/performance.md, side by side with the memory backend, one short
# run each (about 2 minutes in all): acknowledged publishes/s with 16 (and 64) publishers, publish p99 at
# 1,000/s, fan-out at workload (a), a 100,000-event replay from disk, and server RSS against the
# size of the log. JSON reports and a summary go to --out DIR.
#
#   bench/durable.sh [--out DIR] [--sync full|normal] [--quick: half the events, the replay stays 100,000]
#
# Needs the release builds: cargo build --release -p taskstream -p taskstream-bench
set -euo pipefail
cd "$(dirname "$0")/.."
out=/tmp/taskstream-durable
sync=full
quick=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --sync) sync=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
server=target/release/taskstream
bench=target/release/taskstream-bench
for binary in "$server" "$bench"; do
  [[ -x $binary ]] || { echo "$binary missing: cargo build --release -p taskstream -p taskstream-bench" >&2; exit 1; }
done
mkdir -p "$out"
data=$(mktemp -d /tmp/taskstream-durable-data.XXXXXX)
trap 'rm -rf "$data"' EXIT
scale=1
[[ $quick == 1 ]] && scale=2

# run NAME BACKEND BUFFER ARGS...: one bench run against a fresh server on BACKEND (memory or
# sqlite) with --buffer BUFFER. A failed run (loss, reset) is reported and the others still run.
run() {
  local name=$1 backend=$2 buffer=$3
  shift 3
  local spawn="--bind 127.0.0.1:{port} --max-subscribers 20000 --buffer $buffer"
  if [[ $backend == sqlite ]]; then
    rm -rf "$data/$name"
    spawn="$spawn --data-dir $data/$name --synchronous $sync"
  fi
  echo "== $name ($backend)" >&2
  RUST_LOG=warn "$bench" --spawn-server "$server" --spawn-args="$spawn" \
    --label "$backend" --json --out "$out/$name-$backend.json" "$@" > /dev/null ||
    echo "$name ($backend): FAILED, see $out/$name-$backend.json" | tee -a "$out/failures.txt" >&2
  if [[ $backend == sqlite ]]; then
    local db=$data/$name/taskstream.db
    # The server has stopped (SIGTERM): the WAL is folded into the file.
    python3 - "$db" "$name" <<'PY' | tee -a "$out/sizes.txt" >&2
import os, sqlite3, sys
db, name = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
events, data = conn.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM events").fetchone()
tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
size = os.path.getsize(db)
print(f"{name}: {size} bytes, {events} events ({data} bytes of data JSON), {tasks} tasks: "
      f"{size / max(events, 1):.0f} bytes per event, {(size - data) / max(events, 1):.0f} beyond its data")
PY
  fi
}

for backend in memory sqlite; do
  # In memory a 100,000-event replay needs a ring that large; on disk the ring stays at 1,024.
  replay_buffer=1024
  [[ $backend == memory ]] && replay_buffer=131072
  run throughput "$backend" 1024 -n 1 -m $((40000 / scale)) --publishers 16 --max-duration 60
  # The same with 64 publishers: with fsync on the path, acknowledged publishes/s are publishers /
  # (fsync + round trip), so this shows whether the disk or the HTTP path sets the limit.
  run throughput64 "$backend" 1024 -n 1 -m $((40000 / scale)) --publishers 64 --max-duration 60
  run latency "$backend" 1024 -n 1 -m $((10000 / scale)) --rate 1000 --publishers 16 --max-duration 40
  run fanout "$backend" 1024 --workload a --max-duration 60
  # Workload (a) publishes from 4 connections, so with fsync its deliveries/s follow 4 / fsync
  # time; with 64 the batches grow and fan-out itself is measured.
  # A ring of 16,384 for both: with 64 publishers the memory backend publishes faster than 1,000
  # subscribers read, and behind a 1,024-event ring they would get the compacted catch-up (which
  # the tool counts as lost) instead of every event.
  run fanout64 "$backend" 16384 --workload a --publishers 64 --max-duration 60
  run replay "$backend" "$replay_buffer" -n 1 -m 10 --storm-back 100000 --storm-live 10 --publishers 16 --max-duration 90
  run rss "$backend" 1024 -n 1 -m $((200000 / scale)) --publishers 16 --max-duration 90
done
"$bench" --table "$out"/*.json | tee "$out/table.md"
