#!/usr/bin/env bash
# What a held xmin horizon does to one lookup of a hot row (BENCHMARKS.md, "Bloat: a snapshot
# holding the xmin horizon", "Every append and ack leaves a dead version of its queue row"):
# pgbench runs TRANSACTIONS group commits of two single-record appends (`oq_append_many`, 16
# clients, `synchronous_commit` on, two of 1,000 recipients each; so about TRANSACTIONS / 16
# versions per byte stripe and 2 x TRANSACTIONS / 1,000 per queue row), then EXPLAIN ANALYZE
# times one stripe update, one queue row locked (FOR UPDATE) and one queue row updated, each
# in a transaction rolled back, 5 times on each of 4 stripes or rows (a row locked is not one
# updated): the median of the first on each (which also sets the hint bits of the versions it
# walks) and of the repeats. Twice, each in a fresh schema: clean, then with a second
# connection holding `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;` open from before the
# appends to after the timings. Dead rows are pgstattuple's (the extension created in the schema). Builds
# throwaway schemas from src/storage/postgres/sql (dropped at exit); needs psql, pgbench and a
# superuser. About a minute.
#
#   benches/scripts/pg_held_snapshot_lookups.sh      # TRANSACTIONS=24000 by default
set -euo pipefail
cd "$(dirname "$0")"
source ./pg_lib.sh

TRANSACTIONS=${TRANSACTIONS:-24000}
CLIENTS=16
dir=$(mktemp -d /tmp/oq-pg-held.XXXXXX)
schema=""
holder=""
holder_name="oq_script_holder_$$"
# Ends the holding session: its backend first (it would sleep on after its client went).
release() {
  pg -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = '$holder_name'" >/dev/null || true
  kill "$holder" 2>/dev/null || true
  wait "$holder" 2>/dev/null || true
  holder=""
}
cleanup() {
  [ -z "$holder" ] || release
  [ -z "$schema" ] || pg_schema_drop "$schema"
  rm -rf "$dir"
}
trap cleanup EXIT

run() { # clean | held
  schema=$(pg_schema_name held)
  pg_schema_create "$schema"
  local S="\"$schema\"" ra="convert_to('user-' || :a, 'UTF8')" rb="convert_to('user-' || :b, 'UTF8')"
  pg -c "CREATE EXTENSION IF NOT EXISTS pgstattuple SCHEMA $S"
  # Every recipient's queue row exists, as after its first append.
  pg -c "INSERT INTO $S.oq_queues (rid, live, bytes, lost_total, lost_confirmed, touched, idle_key)
         SELECT convert_to('user-' || i, 'UTF8'), 0, 0, 0, 0, $PG_NOW, $PG_NOW
         FROM generate_series(0, 999) AS i"
  if [ "$1" = held ]; then
    psql -X -q -c "SET application_name = '$holder_name'" \
      -c "SET client_connection_check_interval = '1s'" \
      -c "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1; SELECT pg_sleep(3600);" \
      >/dev/null 2>&1 &
    holder=$!
    for _ in $(seq 50); do
      [ "$(pg -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = '$holder_name' AND backend_xmin IS NOT NULL")" = 1 ] && break
      sleep 0.1
    done
  fi
  cat >"$dir/append.sql" <<SQL
\set a random(0, 999)
\set b (:a + 1 + random(0, 998)) % 1000
SELECT status FROM $S.oq_append_many(ARRAY[$ra, $rb], ARRAY[1, 1], ARRAY[uuid_send(gen_random_uuid()), uuid_send(gen_random_uuid())], ARRAY[false, false], ARRAY[$PG_NOW, $PG_NOW], ARRAY[$PG_NOW + $PG_TTL_MS, $PG_NOW + $PG_TTL_MS], ARRAY[$PG_BODY, $PG_BODY], ARRAY[1000000, 1000000]::bigint[], ARRAY[1073741824, 1073741824]::bigint[], ARRAY[false, false], ARRAY[NULL, NULL]::bigint[], ARRAY[1800000, 1800000]::bigint[], ARRAY[$PG_NOW, $PG_NOW], '\\x00'::bytea, 'oq_script');
SQL
  PGOPTIONS="-c synchronous_commit=on" pgbench -n -M prepared -c "$CLIENTS" -j 2 \
    -t $((TRANSACTIONS / CLIENTS)) --max-tries 10 -f "$dir/append.sql" >"$dir/pgbench.out" 2>&1 \
    || { cat "$dir/pgbench.out" >&2; exit 1; }
  local tps
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$dir/pgbench.out")
  # Each statement 5 times on each of 4 stripes or rows, its own transaction, rolled back. The
  # first on a row also sets the hint bits of the versions it walks; the repeats only walk.
  time_it() { # label sql-with-%s first-row
    local k i
    for k in $(seq "$3" $(($3 + 3))); do
      for i in 1 2 3 4 5; do
        echo "BEGIN; EXPLAIN (ANALYZE, COSTS OFF) $(printf "$2" "$k"); ROLLBACK;"
      done
    done | pg -f - | sed -n 's/^Execution Time: \([0-9.]*\) ms/\1/p' | awk -v label="$1" '
      function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      (NR - 1) % 5 == 0 { first[++f] = $1; next }
      { rest[++r] = $1 }
      END { printf "   %-31s first on a row %.3f ms, repeated %.3f ms (medians of %d and %d)\n", label, median(first, f), median(rest, r), f, r }'
  }
  echo "$1: $TRANSACTIONS group commits of 2 appends at $(printf '%.0f' "$tps") tps"
  pg -c "SELECT format('   dead versions (pgstattuple): oq_bytes %s (%s per stripe), oq_queues %s (%s per queue row)',
           b.dead_tuple_count, b.dead_tuple_count / 16, q.dead_tuple_count, q.dead_tuple_count / 1000)
         FROM $S.pgstattuple('$S.oq_bytes') b, $S.pgstattuple('$S.oq_queues') q"
  time_it "stripe update" "UPDATE $S.oq_bytes SET bytes = bytes + 1 WHERE stripe = %s" 0
  time_it "queue row locked (FOR UPDATE)" "SELECT 1 FROM $S.oq_queues WHERE rid = convert_to('user-%s', 'UTF8') FOR UPDATE" 0
  time_it "queue row updated" "UPDATE $S.oq_queues SET touched = touched + 1 WHERE rid = convert_to('user-%s', 'UTF8')" 4
  [ -z "$holder" ] || release
  pg_schema_drop "$schema"; schema=""
}

run clean
run held
