#!/usr/bin/env bash
# Makes sure a RabbitMQ fit for wechat-notifier runs on this machine:
# installs rabbitmq-server with apt when it is missing (Debian/Ubuntu, as root),
# starts it when it is down, waits for it, and enables the feature flags that
# quorum queues' at-least-once dead-lettering needs. Safe to run again: a broker
# that already runs is left as it is (only missing feature flags are enabled).
#
#   scripts/broker.sh && cargo run --release -- demo
#
# Without apt (or without root), start a broker another way, e.g. the compose
# file's: `docker compose up -d rabbitmq`.
set -euo pipefail

say() { printf 'broker.sh: %s\n' "$*" >&2; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "rabbitmq-server is not installed and there is no apt-get; start one with: docker compose up -d rabbitmq"
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      say "installing rabbitmq-server needs root (or sudo)"; exit 1
    fi
  fi
  say "installing rabbitmq-server with apt"
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server
fi

if ! rabbitmqctl -q ping >/dev/null 2>&1; then
  say "starting rabbitmq-server"
  # A package install may have started it under its service manager already;
  # -detached is for machines without one (containers, CI).
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 90); do rabbitmqctl -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
rabbitmqctl await_startup --timeout 120 >/dev/null
# Quorum queues' at-least-once dead-lettering needs the current feature flags.
rabbitmqctl enable_feature_flag all >/dev/null 2>&1 || true
say "RabbitMQ runs ($(rabbitmqctl -q version 2>/dev/null || echo '?')) at amqp://guest:guest@127.0.0.1:5672/%2f"
