#!/usr/bin/env bash
# Grows the local RabbitMQ node (rabbit@HOST, port 5672) into a three-node cluster on this one
# machine (nodes on ports 5673 and 5674), or shrinks it back. For tests of node loss and
# failover between the URLs of AMQP_URL (tests/alone/node_loss.rs). Usage: rabbitmq-cluster.sh up | down
#
# The two extra nodes start, join and leave side by side (each Erlang CLI call costs about a
# second here), and a fresh node joins by peer discovery while it boots, so no stop_app / reset /
# join_cluster / start_app round is needed; a node that booted alone anyway joins the old way.
set -u
# The host part of the running node's name (rabbit@localhost on some machines, rabbit@$(hostname -s)
# on others): from the node name the CLI tools use, else asked of the node (an Erlang VM's start).
h=$(sed -n 's/^\(RABBITMQ_\)\{0,1\}NODENAME=[^@]*@//p' /etc/rabbitmq/rabbitmq-env.conf 2>/dev/null | tail -1 | tr -d "\"'")
[ -n "$h" ] || h=$(rabbitmqctl eval 'node().' 2>/dev/null | tr -d "'" | sed 's/.*@//')
[ -n "$h" ] || h=$(hostname -s)
seed=rabbit@$h

running() {
  rabbitmqctl cluster_status --formatter json | python3 -c 'import json,sys; print("running:", json.load(sys.stdin)["running_nodes"])'
}

# Starts node $1 (rabbit$1@HOST on port 567($1+1)) and returns once its app runs.
start() {
  local i=$1 d=/tmp/rmq$1 n=rabbit$1@$h
  if [ -f $d/pid ] && kill -0 "$(cat $d/pid)" 2>/dev/null; then
    rabbitmqctl -n $n await_startup >/dev/null
    return
  fi
  # A blank node: peer discovery only joins a node whose database is empty.
  rm -rf $d; mkdir -p $d
  # Its own config file: the machine's may pin the listener to 5672.
  cat > $d/rabbitmq.conf <<EOF
listeners.tcp.local = 127.0.0.1:567$((i+1))
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $seed
EOF
  chown -R rabbitmq:rabbitmq $d
  RABBITMQ_NODENAME=$n RABBITMQ_NODE_PORT=567$((i+1)) RABBITMQ_DIST_PORT=2567$((i+1)) \
  RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf \
  RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/pid \
  RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins rabbitmq-server -detached
  # Waits for the pid file, then for the app (peer discovery included) to run.
  rabbitmqctl -n $n wait $d/pid --timeout 90 >/dev/null
}

# Joins node $1 to the seed the old way (it booted alone: the seed did not answer in time).
join() {
  local n=rabbit$1@$h
  rabbitmqctl -n $n stop_app >/dev/null && rabbitmqctl -n $n reset >/dev/null &&
    rabbitmqctl -n $n join_cluster $seed >/dev/null && rabbitmqctl -n $n start_app >/dev/null
}

# Stops node $1, waits for its process to end, and has the seed forget it.
stop() {
  rabbitmqctl -n rabbit$1@$h stop /tmp/rmq$1/pid >/dev/null 2>&1
  rabbitmqctl forget_cluster_node rabbit$1@$h >/dev/null 2>&1
  rm -rf /tmp/rmq$1
}

case "${1:-}" in
up)
  start 2 & start 3 & wait
  members=$(running)
  missing=0
  for i in 2 3; do
    case $members in *"rabbit$i@"*) ;; *) missing=1; join $i & ;; esac
  done
  wait
  if [ $missing = 1 ]; then running; else echo "$members"; fi
  ;;
down)
  stop 2 & stop 3 & wait
  # The seed forgets each stopped node (two nodes leaving side by side by their own `reset`
  # left one of them in the seed's member list); the last line shows what is left.
  rabbitmqctl cluster_status --formatter json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("running:", d["running_nodes"], "members:", d["disk_nodes"] + d.get("ram_nodes", []))'
  ;;
*) echo "usage: rabbitmq-cluster.sh up|down"; exit 2;;
esac
