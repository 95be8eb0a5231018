#!/usr/bin/env bash
# Ingest throughput: a real publisher (mosquitto_pub, QoS 1) through a real Mosquitto broker into
# adaptd's durable sample store (SQLite WAL, synchronous=FULL), with fsync batching on (one commit
# per batch of up to 256 samples, the default) and off (one commit, so one fsync, per sample), in
# turn in the same run. Prints samples/s per run, the medians and their ratio.
# Usage: benches/ingest_throughput.sh [SAMPLES] [RUNS]
set -euo pipefail
samples=${1:-10000}
runs=${2:-3}
. "$(dirname "$0")/broker.sh" 'max_queued_messages 0\nmax_inflight_messages 1000\n'
# Small tensors: one 8x8 digit per sample, as the digits-cnn bundle takes.
$py - "$samples" > "$work/lines.txt" <<'PY'
import json, sys
row = [round((i % 17) / 16, 4) for i in range(64)]
for i in range(int(sys.argv[1])):
    print(json.dumps({"key": f"bench:{i}", "task": "sorter", "label": str(i % 10), "input": {"shape": [1, 1, 8, 8], "data": row}}))
PY
count() { $py -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from samples').fetchone()[0])" "$1" 2>/dev/null || echo 0; }
declare -A median
for batch in 256 1; do
  rates=()
  for run in $(seq "$runs"); do
    db="$work/b$batch-run$run.db"
    device="bench$batch-$run"
    ADAPTD_LOG=warn "$bin" ingest --store "$db" --mqtt "127.0.0.1:$port" --device "$device" --tasks sorter --max-batch "$batch" &
    daemon=$!
    until [ -f "$db" ]; do sleep 0.05; done
    sleep 0.5
    start=$($py -c 'import time; print(time.time())')
    mosquitto_pub -p "$port" -q 1 -t "adaptd/v1/$device/samples/sorter" -l < "$work/lines.txt"
    while [ "$(count "$db")" -lt "$samples" ]; do sleep 0.02; done
    end=$($py -c 'import time; print(time.time())')
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    rate=$($py -c "print(round($samples / ($end - $start)))")
    echo "max_batch $batch, run $run: $samples samples durable in $($py -c "print(round($end - $start, 2))") s: $rate samples/s"
    rates+=("$rate")
  done
  median[$batch]=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
done
echo "median, fsync batching on (max_batch 256): ${median[256]} samples/s; off (a commit per sample): ${median[1]} samples/s; ratio $($py -c "print(round(${median[256]} / ${median[1]}, 1))")x"
