#!/usr/bin/env bash
# A throwaway PostgreSQL server (Debian's postgresql) for a shared Optuna study: a data folder of its own, a
# local port, a database and user "distill"; prints the search.storage URL.
#   scripts/postgres_local.sh start [FOLDER] [PORT]   # default /tmp/distill-postgres, port 54329
#   scripts/postgres_local.sh stop  [FOLDER]
# Run as root it runs the server as the user "postgres" (PostgreSQL refuses to run as root).
# Idempotent: start on a running server only prints the URL.
set -euo pipefail

folder=${2:-/tmp/distill-postgres}
port=${3:-54329}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)

fail() { echo "postgres_local.sh: $*" >&2; exit 1; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

start() {
  [ -n "$bin" ] || fail "PostgreSQL is not installed: apt-get install -y postgresql"
  if ! as_owner "$bin/pg_ctl" -D "$folder/data" status >/dev/null 2>&1; then
    mkdir -p "$folder"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$folder"; fi
    if [ ! -f "$folder/data/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$folder/data" -U postgres --auth=trust -E UTF8 >"$folder/initdb.log" 2>&1 \
        || fail "initdb failed: see $folder/initdb.log"
    fi
    as_owner "$bin/pg_ctl" -D "$folder/data" -l "$folder/server.log" -w -t 30 \
      -o "-p $port -k $folder -c listen_addresses=127.0.0.1" start >/dev/null \
      || fail "the server did not start: see $folder/server.log"
  fi
  local psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -qtA)
  if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='distill'")" ]; then
    "${psql[@]}" -c "CREATE USER distill PASSWORD 'distill'" >/dev/null
  fi
  if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='distill'")" ]; then
    "${psql[@]}" -c "CREATE DATABASE distill OWNER distill" >/dev/null
  fi
  echo "postgresql://distill:distill@127.0.0.1:$port/distill"
}

stop() {
  [ -n "$bin" ] || exit 0
  as_owner "$bin/pg_ctl" -D "$folder/data" -m fast stop >/dev/null 2>&1 || true
  echo "postgres: stopped ($folder)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [FOLDER] [PORT]" >&2; exit 2 ;;
esac
