#!/usr/bin/env bash
# Makes sure the two services wechat-notifier uses run on this machine, and
# prints the grant ledger's URL on the last line of stdout:
#
#   - RabbitMQ, through scripts/broker.sh (installed with apt when missing,
#     started when down, feature flags enabled);
#   - PostgreSQL, for the grant ledger: installed with apt when missing
#     (Debian/Ubuntu), started when down, and given a role `wechat_notifier`
#     with a password and a database `wechat_notifier` that it owns.
#
#   scripts/services.sh && cargo run --release -- demo
#   export NOTIFIER_LEDGER_URL=$(scripts/services.sh | tail -n 1)
#
# Safe to run again: a running service is left as it is, the role's password
# is set to the same value, and the database is created only when missing.
# Everything but the URL goes to stderr.
#
# The password defaults to `wechat_notifier`, a development value: the cluster
# Debian installs listens on 127.0.0.1 only. Set NOTIFIER_DB_PASSWORD to choose
# another (letters, digits, `-`, `_` and `.` only, so the URL needs no
# escaping); anything beyond this machine should use its own managed
# PostgreSQL and a real secret.
#
# Root is needed to install and to start a cluster; as another user the script
# uses sudo when it is there. Without apt, start PostgreSQL another way, e.g.
# the compose file's: `docker compose up -d postgres`.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'services.sh: %s\n' "$*" >&2; }

role=wechat_notifier
database=wechat_notifier
password=${NOTIFIER_DB_PASSWORD:-wechat_notifier}
if [[ ! $password =~ ^[A-Za-z0-9._-]+$ ]]; then
  say "NOTIFIER_DB_PASSWORD may hold only letters, digits, '-', '_' and '.'"
  exit 2
fi

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
fi
as_root_allowed() { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }

# Runs a command that may leave a daemon behind with every descriptor above
# stderr closed. A daemon inherits what its starter had open: started under
# `flock /tmp/some.lock scripts/services.sh`, PostgreSQL would keep that lock
# held for as long as it runs.
no_inherited_fds() (
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
  "$@"
)

# --- RabbitMQ -----------------------------------------------------------------
# broker.sh writes its diagnostics to stderr, but apt's progress goes to
# stdout: keep stdout for the URL alone.
scripts/broker.sh >&2

# --- PostgreSQL: installed ----------------------------------------------------
# The server, not only the client (psql alone is often installed).
server_installed() {
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null 2>&1
}
if ! server_installed || ! command -v psql >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "PostgreSQL is not installed and there is no apt-get; start one with: docker compose up -d postgres"
    exit 1
  fi
  if ! as_root_allowed; then
    say "installing postgresql needs root (or sudo)"
    exit 1
  fi
  say "installing postgresql with apt"
  $sudo apt-get update >&2
  # The package's install script may start the server: no descriptor of ours goes with it.
  no_inherited_fds $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
fi

# --- PostgreSQL: running --------------------------------------------------------
# Statements run as the cluster's superuser over its Unix socket (peer
# authentication, Debian's default). As root that is `runuser`; with sudo,
# `sudo -u postgres`; otherwise the current user must be allowed in already.
# From /, which the postgres user can read (psql warns about a working
# directory it cannot enter).
superuser() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  elif [ -n "$sudo" ]; then
    (cd / && sudo -u postgres "$@")
  else
    "$@"
  fi
}
psql_super() { superuser psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
answers() { superuser psql -X -tA -d postgres -c 'SELECT 1' >/dev/null 2>&1; }

if ! answers; then
  say "starting PostgreSQL"
  if command -v pg_lsclusters >/dev/null 2>&1; then
    # Debian's postgresql-common: the newest installed version's cluster
    # `main`, created when the package's own one was dropped or never made.
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if [ ! -d "/etc/postgresql/$version/main" ]; then
      say "creating the cluster $version/main"
      $sudo pg_createcluster "$version" main >&2
    fi
    # --skip-systemctl-redirect: start the cluster directly, also where
    # systemd is not running (containers, CI); where it runs, ask it first so
    # it keeps supervising the cluster.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      $sudo systemctl start "postgresql@$version-main" >&2 || true
    fi
    answers || no_inherited_fds $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl start postgresql >&2 || true
  elif command -v service >/dev/null 2>&1; then
    no_inherited_fds $sudo service postgresql start >&2 || true
  fi
  for _ in $(seq 60); do answers && break; sleep 1; done
  if ! answers; then
    say "PostgreSQL does not answer; start it by hand (pg_lsclusters shows the clusters) or with: docker compose up -d postgres"
    exit 1
  fi
fi

# --- The role and the database ---------------------------------------------------
# CREATE ROLE / DATABASE have no IF NOT EXISTS: look first. The password is set
# on every run, so the URL printed below is always the one that works.
if [ "$(psql_super -tA -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" != 1 ]; then
  say "creating the role $role"
  psql_super -c "CREATE ROLE $role LOGIN"
fi
psql_super -c "ALTER ROLE $role WITH LOGIN PASSWORD '$password'"
if [ "$(psql_super -tA -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
  say "creating the database $database"
  psql_super -c "CREATE DATABASE $database OWNER $role"
fi
# The ledger creates its own schema in this database at start.
psql_super -c "ALTER DATABASE $database OWNER TO $role"

port=$(psql_super -tA -c 'SHOW port')
url="postgres://$role:$password@127.0.0.1:$port/$database"

# The check that matters: the service connects over TCP with this password.
if ! PGPASSWORD=$password PGCONNECT_TIMEOUT=5 psql -X -tA \
  -h 127.0.0.1 -p "$port" -U "$role" -d "$database" -c 'SELECT 1' >/dev/null 2>&1; then
  say "the role $role cannot log in over TCP at 127.0.0.1:$port: check listen_addresses and pg_hba.conf (md5 or scram-sha-256 for host connections)"
  exit 1
fi
say "PostgreSQL $(psql_super -tA -c 'SHOW server_version') runs; the ledger's database is $database at 127.0.0.1:$port"
printf '%s\n' "$url"
