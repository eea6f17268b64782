#!/bin/bash
# Throwaway PostgreSQL 15 cluster for the CDC prototype. Runs as user `postgres` when invoked as root
# (initdb/postgres refuse to run as root).
set -euo pipefail
ROOT=/work/proto-cdc
PGDATA=$ROOT/pg/data
SOCK=$ROOT/pg/sock
PORT=${PGPORT:-15432}
BIN=/usr/lib/postgresql/15/bin
AS=""
if [ "$(id -u)" = 0 ]; then AS="runuser -u postgres --"; fi
mkdir -p $ROOT/pg $SOCK
[ "$(id -u)" = 0 ] && chown -R postgres:postgres $ROOT/pg
if [ ! -f $PGDATA/PG_VERSION ]; then
  $AS $BIN/initdb -D $PGDATA -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >> $PGDATA/postgresql.conf <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
wal_level = logical
max_replication_slots = 4
max_wal_senders = 4
CONF
  # trust on loopback (initdb --auth=trust already covers host+replication lines for 127.0.0.1)
fi
$AS $BIN/pg_ctl -D $PGDATA -l $ROOT/pg/postgres.log -w -t 30 start
