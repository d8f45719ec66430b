# Sourced by benches/scripts/pg_*.sh, not run on its own: a throwaway schema built from the
# crate's own SQL (src/storage/postgres/sql), as `PostgresStorage` builds it, and dropped when
# the sourcing script exits.
#
# The server: PGHOST, PGPORT, PGUSER, PGDATABASE (default 127.0.0.1, 5432, postgres, test).
# The scripts need a superuser (CHECKPOINT, track_functions, pgstattuple).

: "${PGHOST:=127.0.0.1}" "${PGPORT:=5432}" "${PGUSER:=postgres}" "${PGDATABASE:=test}"
export PGHOST PGPORT PGUSER PGDATABASE

SQL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../src/storage/postgres/sql" && pwd)
# The schema's files in the order the crate runs them: version 1, then each migration.
SQL_FILES=(tables ack read append purge remove v2_nodes v2_group_commit v3_purge_work
  v4_delivered_watermark v4_purge_idle_count v5_idle_after_refill v6_appends_update_no_row)

# psql, quiet, stopping at the first error, unaligned output.
pg() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

# pg_schema_create NAME: the schema at version 6, with the crate's owner and version rows.
pg_schema_create() {
  local schema=$1 file
  {
    echo "CREATE SCHEMA \"$schema\";"
    for file in "${SQL_FILES[@]}"; do
      sed "s/@schema@/\"$schema\"/g" "$SQL_DIR/$file.sql"
    done
    echo "INSERT INTO \"$schema\".oq_info (key, value) VALUES ('owner', 'offline-queue'), ('version', '6');"
  } | pg -1 -f -
}

pg_schema_drop() {
  pg -c "SET client_min_messages = warning" -c "DROP SCHEMA IF EXISTS \"$1\" CASCADE" || true
}

# A fresh lowercase name under a prefix: oq_script_<what>_<pid>_<random>.
pg_schema_name() {
  echo "oq_script_$1_$$_${RANDOM}"
}

# 100 bytes of 0x07, the benches' body, as a bytea literal.
PG_BODY="'\\x$(printf '07%.0s' $(seq 100))'::bytea"
# Now in milliseconds since the epoch, as the crate passes times.
PG_NOW="(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# The benches' record deadline: 30 days (the engine's default TTL).
PG_TTL_MS=2592000000
