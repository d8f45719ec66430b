#!/usr/bin/env bash
# Runs a command against a RabbitMQ of its own: started on free loopback ports in a temporary
# directory, killed and deleted after. Never the shared broker: thousands of quorum queues
# are slow to create and to delete, and a bench must not disturb other users. The command
# finds the broker in OFFLINE_QUEUE_AMQP_URL, its node name in OWN_RABBITMQ_NODE and its pid
# in OWN_RABBITMQ_PID.
#
#   bash benches/with_own_rabbitmq.sh cargo bench --features amqp --bench amqp
set -euo pipefail
dir=$(mktemp -d /tmp/oq-rabbitmq.XXXX)
chown -R rabbitmq "$dir" 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
node="oqown$$@localhost"
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
OFFLINE_QUEUE_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2f" OWN_RABBITMQ_NODE=$node \
    OWN_RABBITMQ_PID=$(cat "$dir/pid") "$@"
