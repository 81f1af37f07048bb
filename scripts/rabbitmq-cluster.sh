#!/usr/bin/env bash
# Grows the local RabbitMQ node (rabbit@HOST, port 5672) into a three-node cluster on this one
# machine (nodes on ports 5673 and 5674), or shrinks it back. For tests of node loss and
# failover between the URLs of AMQP_URL (tests/node_loss.rs). Usage: rabbitmq-cluster.sh up | down
set -u
# The host part of the running node's name (rabbit@localhost on some machines, rabbit@$(hostname -s) on others).
h=$(rabbitmqctl eval 'node().' 2>/dev/null | tr -d "'" | sed 's/.*@//')
[ -n "$h" ] || h=$(hostname -s)
case "${1:-}" in
up)
  for i in 2 3; do
    d=/tmp/rmq$i; mkdir -p $d
    # Its own config file: the machine's may pin the listener to 5672.
    printf 'listeners.tcp.local = 127.0.0.1:%s\n' 567$((i+1)) > $d/rabbitmq.conf
    chown -R rabbitmq:rabbitmq $d
    RABBITMQ_NODENAME=rabbit$i@$h RABBITMQ_NODE_PORT=567$((i+1)) RABBITMQ_DIST_PORT=2567$((i+1)) \
    RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf \
    RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/pid \
    RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins rabbitmq-server -detached
  done
  for i in 2 3; do
    n=rabbit$i@$h
    for _ in $(seq 60); do rabbitmqctl -n $n ping >/dev/null 2>&1 && break; sleep 1; done
    rabbitmqctl -n $n await_startup >/dev/null && rabbitmqctl -n $n stop_app >/dev/null &&
    rabbitmqctl -n $n reset >/dev/null && rabbitmqctl -n $n join_cluster rabbit@$h >/dev/null &&
    rabbitmqctl -n $n start_app >/dev/null
  done
  rabbitmqctl cluster_status --formatter json | python3 -c 'import json,sys; print("running:", json.load(sys.stdin)["running_nodes"])'
  ;;
down)
  for i in 2 3; do
    n=rabbit$i@$h
    rabbitmqctl -n $n stop_app >/dev/null 2>&1; rabbitmqctl -n $n reset >/dev/null 2>&1
    rabbitmqctl -n $n stop >/dev/null 2>&1
    rabbitmqctl forget_cluster_node $n >/dev/null 2>&1
    rm -rf /tmp/rmq$i
  done
  rabbitmqctl cluster_status --formatter json | python3 -c 'import json,sys; print("running:", json.load(sys.stdin)["running_nodes"])'
  ;;
*) echo "usage: cluster.sh up|down"; exit 2;;
esac
