#!/bin/sh
# db: a throw-away PostgreSQL server, started by envbox as the "postgres" user.
#
# The data directory lives in the service's private HOME (a tmpfs: it is counted against the
# service's memory limit, and it vanishes with the sandbox). Nothing here touches the host's
# clusters in /var/lib/postgresql.
set -eu

# Debian installs each major version under /usr/lib/postgresql/<version>/bin: take the newest.
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bindir" ]; then
    echo "postgres.sh: no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)" >&2
    exit 1
fi

data="$HOME/pgdata"
"$bindir/initdb" --pgdata="$data" --username=postgres --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 --no-sync --no-instructions >/dev/null
# Other services of the environment connect over its private network: trust them (test only!).
echo "host all all all trust" >>"$data/pg_hba.conf"

# A database of its own for the API, created in single-user mode before the server listens, so
# that readiness (pg_isready) means "the notes database exists".
echo "CREATE DATABASE notes" | "$bindir/postgres" --single -D "$data" postgres >/dev/null

# Small and fast rather than durable: the whole cluster fits its 256Mi memory limit.
exec "$bindir/postgres" -D "$data" \
    -c listen_addresses='*' \
    -c unix_socket_directories=/tmp \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c shared_buffers=16MB -c work_mem=2MB -c maintenance_work_mem=8MB \
    -c max_connections=30 \
    -c min_wal_size=32MB -c max_wal_size=64MB \
    -c log_min_messages=warning -c log_connections=off
