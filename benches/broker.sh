# Sourced by the shell benches: set-up, a release build of adaptd, a scratch directory removed
# on exit (with every process the bench started), and Mosquitto on a free loopback port.
# After it: $bin (adaptd), $py (the venv's Python), $work, $port.
# Usage: . benches/broker.sh "extra mosquitto.conf lines"   (always give the argument, "" for
# none: sourced without one, the caller's own first argument would become broker configuration)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/setup.sh >/dev/null
cargo build -q --release -p adaptd
bin=$(pwd)/target/release/adaptd
py=.venv/bin/python
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n%b' "$port" "${1:-}" > "$work/mosquitto.conf"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$mosquitto" -c "$work/mosquitto.conf" >/dev/null 2>&1 &
# A bench without its broker measures reconnect backoff: wait for the port, or stop here.
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "broker.sh: Mosquitto did not start on port $port ($work/mosquitto.conf)" >&2; exit 1; }
