#!/usr/bin/env bash
# The fleet agent at rest: the same daemon (digits bundle, one task, a broker, no traffic) runs
# idle with fleet rollout off and on, in turn, RUNS times each; for each run its CPU share over
# SECONDS and its resident memory at the end. Prints the medians and the agent's cost (on - off).
# Goals: under 1 % CPU and 20 MB for the agent.
# Usage: benches/fleet_idle.sh [SECONDS] [RUNS]
set -euo pipefail
seconds=${1:-30}
runs=${2:-3}
. "$(dirname "$0")/broker.sh" ""
"$bin" fleet keygen --keys "$work/keys" >/dev/null
"$bin" fleet init --keys "$work/keys" --repo "$work/repo" >/dev/null
bundle=build/bundles/digits-cnn
ticks=$(getconf CLK_TCK)
declare -A cpu rss
for fleet in off on; do
  cpus=(); rsss=()
  for run in $(seq "$runs"); do
    state="$work/state-$fleet-$run"
    repository=""; [ "$fleet" = on ] && repository="http://127.0.0.1:9/"
    cat > "$work/$fleet.toml" <<TOML
bundle = "$(pwd)/$bundle"
state_dir = "$state"
[http]
listen = "127.0.0.1:0"
[mqtt]
host = "127.0.0.1"
port = $port
device_id = "idle-$fleet-$run"
inference_api = false
[ingest]
tasks = ["sorter"]
[fleet]
repository = "$repository"
root_file = "$work/repo/metadata/1.root.json"
TOML
    ADAPTD_LOG=warn "$bin" serve --config "$work/$fleet.toml" &
    daemon=$!
    sleep 5 # started, connected, the engine warm
    t0=$(awk '{print $14 + $15}' "/proc/$daemon/stat")
    sleep "$seconds"
    t1=$(awk '{print $14 + $15}' "/proc/$daemon/stat")
    kb=$(awk '/VmRSS/ {print $2}' "/proc/$daemon/status")
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    share=$($py -c "print(round(100 * ($t1 - $t0) / $ticks / $seconds, 3))")
    echo "fleet $fleet, run $run: CPU $share % over $seconds s, RSS $((kb / 1024)) MiB"
    cpus+=("$share"); rsss+=("$kb")
  done
  cpu[$fleet]=$(printf '%s\n' "${cpus[@]}" | sort -g | sed -n "$(( (runs + 1) / 2 ))p")
  rss[$fleet]=$(printf '%s\n' "${rsss[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
done
echo "median: fleet off CPU ${cpu[off]} %, RSS $(( ${rss[off]} / 1024 )) MiB; fleet on CPU ${cpu[on]} %, RSS $(( ${rss[on]} / 1024 )) MiB"
echo "the idle agent's cost: CPU $($py -c "print(round(${cpu[on]} - ${cpu[off]}, 3))") percentage points, memory $(( (${rss[on]} - ${rss[off]}) / 1024 )) MiB (goals: < 1 %, < 20 MB)"
