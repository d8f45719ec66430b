#!/usr/bin/env bash
# Broker memory for N recipients with one message each (issue 18): on a RabbitMQ of its own
# (`with_own_rabbitmq.sh`), reads the broker's memory, runs `examples/amqp_scale.rs` for N
# queues of the given type, lets the broker settle, and reads its memory again.
#
#   bash benches/amqp_scale.sh [N=10000] [quorum|classic]
#
# Memory is Erlang's own count (`erlang:memory()`: total, processes, ETS) and the node's RSS:
# `rabbitmqctl status` and `list_queues` did not answer within 20 minutes on a broker holding
# 10,000 quorum queues.
set -euo pipefail
cargo build -q --release --features amqp --example amqp_scale
here=$(dirname "$0")
exec bash "$here/with_own_rabbitmq.sh" bash -c '
memory() {
    timeout 300 rabbitmqctl -n "$OWN_RABBITMQ_NODE" eval "erlang:memory()." |
        python3 "$0/rabbitmq_memory.py" "$OWN_RABBITMQ_PID"
}
echo "before: $(memory)"
./target/release/examples/amqp_scale "$OFFLINE_QUEUE_AMQP_URL" "$1" "$2"
sleep 10 # let the queues settle after their first write
echo "after:  $(memory)"
' "$here" "${1:-10000}" "${2:-quorum}"
