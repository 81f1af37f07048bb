#!/usr/bin/env bash
# Makes sure a RabbitMQ fit for wechat-notifier runs on this machine:
# installs rabbitmq-server with apt when it is missing (Debian/Ubuntu), starts
# it when it is down, waits for it, and enables the feature flags that quorum
# queues' at-least-once dead-lettering needs. Safe to run again: a broker that
# already runs is left as it is (only missing feature flags are enabled).
#
#   scripts/broker.sh && cargo run --release -- demo
#
# Root is needed to install, and to talk to a broker started by the package
# (rabbitmqctl needs the broker's Erlang cookie); as another user the script
# uses sudo when it is there. Without apt, start a broker another way, e.g. the
# compose file's: `docker compose up -d rabbitmq`.
set -euo pipefail

say() { printf 'broker.sh: %s\n' "$*" >&2; }

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
fi
ctl() { $sudo rabbitmqctl "$@"; }

# Runs a command that may leave a daemon behind with every descriptor above
# stderr closed. A daemon inherits what its starter had open: started under
# `flock /tmp/some.lock scripts/broker.sh`, the broker would keep that lock
# held for as long as it runs.
no_inherited_fds() (
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
  "$@"
)

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "rabbitmq-server is not installed and there is no apt-get; start one with: docker compose up -d rabbitmq"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
    say "installing rabbitmq-server needs root (or sudo)"
    exit 1
  fi
  say "installing rabbitmq-server with apt"
  $sudo apt-get update
  # The package's install script may start the broker: no descriptor of ours goes with it.
  no_inherited_fds $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server
fi

if ! ctl -q ping >/dev/null 2>&1; then
  say "starting rabbitmq-server"
  # A package install may have started it under its service manager already;
  # -detached is for machines without one (containers, CI).
  no_inherited_fds $sudo rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 90); do ctl -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
ctl await_startup --timeout 120 >/dev/null
# Quorum queues' at-least-once dead-lettering needs the current feature flags.
ctl enable_feature_flag all >/dev/null 2>&1 || true
say "RabbitMQ $(ctl -q version 2>/dev/null || echo '?') runs at amqp://guest:guest@127.0.0.1:5672/%2f"
