#!/usr/bin/env bash
# Broker memory for N recipients with one message each (issue 18): starts a RabbitMQ of its
# own on free loopback ports in a temporary directory (never the shared broker: thousands of
# quorum queues are slow to create and to delete), reads its memory, runs
# `examples/amqp_scale.rs` for N queues of the given type, lets the broker settle, reads its
# memory again, and throws the broker away.
#
#   bash benches/amqp_scale.sh [N=10000] [quorum|classic]
#
# Prints the broker's memory (Erlang's own count, its processes and ETS tables) and RSS before
# and after. Read with `erlang:memory()`: `rabbitmqctl status` and `list_queues` did not
# answer within 20 minutes on a broker holding 10,000 quorum queues.
set -euo pipefail
n=${1:-10000}
kind=${2:-quorum}
cargo build -q --release --features amqp --example amqp_scale
dir=$(mktemp -d /tmp/oq-scale.XXXX)
chown -R rabbitmq "$dir" 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
node="oqscale$$@localhost"
echo "listeners.tcp.local = 127.0.0.1:$port" > "$dir/rabbitmq.conf"
stop() {
    # Killed, not stopped: a clean stop of thousands of quorum queues takes minutes, and the
    # broker is thrown away.
    [ -f "$dir/pid" ] && kill -9 "$(cat "$dir/pid")" 2> /dev/null || true
    rm -rf "$dir"
}
trap stop EXIT
RABBITMQ_NODENAME=$node RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf RABBITMQ_DIST_PORT=$(free_port) \
    RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log RABBITMQ_PID_FILE=$dir/pid \
    RABBITMQ_ENABLED_PLUGINS_FILE=$dir/plugins rabbitmq-server > /dev/null 2>&1 &
rabbitmqctl -n "$node" wait --timeout 120 "$dir/pid" > /dev/null
cat > "$dir/memory.py" <<'PY'
import re, sys
m = {k: int(v) for k, v in re.findall(r"\{(\w+),(\d+)\}", sys.stdin.read())}
rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{sys.argv[1]}/status").read())[1]) * 1024
mb = lambda b: f"{b / 2**20:.0f} MiB"
print(f"total {mb(m['total'])} (rss {mb(rss)}), processes {mb(m['processes'])}, "
      f"ets {mb(m['ets'])}, binary {mb(m['binary'])}")
PY
memory() {
    timeout 300 rabbitmqctl -n "$node" eval 'erlang:memory().' | python3 "$dir/memory.py" "$(cat "$dir/pid")"
}
echo "before: $(memory)"
./target/release/examples/amqp_scale "amqp://guest:guest@127.0.0.1:$port/%2f" "$n" "$kind"
sleep 10 # let the queues' processes settle after their first write
echo "after:  $(memory)"
