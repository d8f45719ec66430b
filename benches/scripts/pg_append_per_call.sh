#!/usr/bin/env bash
# What one call of `oq_append_many` costs in one session, without the fsync (BENCHMARKS.md,
# "PostgreSQL (issue 16)", "Per call, one session"):
#   1. per append, for groups of G = 1, 2, 8 and 32 single-record appends (100-byte bodies,
#      generated ids so no dedup, a 30-day deadline, round-robin over 1,000 recipients, the
#      benches' roomy quota), against a multi-row INSERT of the same G rows into a plain
#      table (rid, seq, body; primary key (rid, seq)): a procedure makes the calls, one
#      transaction each, `synchronous_commit` off; ROUNDS rounds, alternating;
#   2. `track_functions` for G = 2: per call, and per append or recipient in each step;
#   3. WAL bytes per append and per floor row (`pg_current_wal_lsn` around 6,000 of them,
#      each after a CHECKPOINT; the server should be otherwise idle).
# Builds a throwaway schema from src/storage/postgres/sql (dropped at exit); needs psql and a
# superuser. About a minute.
#
#   benches/scripts/pg_append_per_call.sh            # ROUNDS=2 ROWS=4032 by default
set -euo pipefail
cd "$(dirname "$0")"
source ./pg_lib.sh

ROUNDS=${ROUNDS:-2}
ROWS=${ROWS:-4032} # appends (and floor rows) per measurement; a multiple of 32
schema=$(pg_schema_name per_call)
trap 'pg_schema_drop "$schema"' EXIT
pg_schema_create "$schema"
S="\"$schema\""

pg <<SQL
CREATE TABLE $S.floor (rid bytea NOT NULL, seq bigint NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (rid, seq));
-- p_what 'append': p_calls calls of oq_append_many with p_g single-record appends each;
-- 'floor': p_calls INSERTs of p_g rows. One transaction per call. Returns microseconds per
-- append (row). Arguments are built from expressions, not statements, so the loop adds
-- little beside the call.
CREATE PROCEDURE $S.bench(p_what text, p_g int, p_calls int,
    INOUT us_per_row double precision DEFAULT NULL)
LANGUAGE plpgsql AS \$\$
DECLARE
    rids bytea[] := ARRAY(SELECT convert_to('user-' || (i % 1000), 'UTF8')
                          FROM generate_series(0, 1000 + 32) AS i);
    ids bytea[] := ARRAY(SELECT uuid_send(gen_random_uuid()) FROM generate_series(1, p_g));
    body bytea := $PG_BODY;
    next int := 0;
    base bigint;
    now_ms bigint;
    t0 timestamptz;
BEGIN
    SELECT coalesce(max(seq), 0) INTO base FROM $S.floor;
    t0 := clock_timestamp();
    FOR c IN 1 .. p_calls LOOP
        now_ms := $PG_NOW;
        IF p_what = 'append' THEN
            PERFORM $S.oq_append_many(
                rids[next + 1 : next + p_g], array_fill(1, ARRAY[p_g]), ids,
                array_fill(false, ARRAY[p_g]), array_fill(now_ms, ARRAY[p_g]),
                array_fill(now_ms + $PG_TTL_MS, ARRAY[p_g]), array_fill(body, ARRAY[p_g]),
                array_fill(1000000::bigint, ARRAY[p_g]), array_fill(1073741824::bigint, ARRAY[p_g]),
                array_fill(false, ARRAY[p_g]), array_fill(NULL::bigint, ARRAY[p_g]),
                array_fill(1800000::bigint, ARRAY[p_g]), array_fill(now_ms, ARRAY[p_g]),
                '\\x00'::bytea, 'oq_script');
        ELSE
            INSERT INTO $S.floor (rid, seq, body)
            SELECT u.rid, base + u.o, body
            FROM unnest(rids[next + 1 : next + p_g]) WITH ORDINALITY AS u(rid, o);
            base := base + p_g;
        END IF;
        next := (next + p_g) % 1000;
        COMMIT;
    END LOOP;
    us_per_row := extract(epoch FROM clock_timestamp() - t0) * 1e6 / (p_calls * p_g);
END;
\$\$;
SQL

call() { # what g calls [extra SET]
  pg -c "SET synchronous_commit = off" ${4:+-c "$4"} -c "CALL $S.bench('$1', $2, $3)"
}

echo "1. Per append, one session, synchronous_commit off ($ROWS appends or rows each)"
printf '%-6s %-4s %22s %22s\n' round G 'oq_append_many us/append' 'INSERT us/row'
for round in $(seq "$ROUNDS"); do
  for g in 1 2 8 32; do
    a=$(call append "$g" $((ROWS / g)))
    f=$(call floor "$g" $((ROWS / g)))
    printf '%-6s %-4s %22.1f %22.1f\n' "$round" "$g" "$a" "$f"
  done
done

echo
echo "2. track_functions = pl, G = 2 ($((ROWS / 2)) calls)"
call append 2 $((ROWS / 2)) "SET track_functions = 'pl'" >/dev/null
pg <<SQL
SELECT format('   %-16s %7s calls  %8s us total per call  %8s us self per call',
              funcname, calls, round((total_time * 1000 / calls)::numeric, 1),
              round((self_time * 1000 / calls)::numeric, 1))
FROM pg_stat_user_functions WHERE schemaname = '$schema' AND funcname <> 'bench'
ORDER BY total_time DESC;
SQL
echo "   (oq_append_many: one call per group; oq_plan_append: one per append;"
echo "    oq_take_queue: one per recipient of the group; oq_wake_others: one per stored append)"

echo
echo "3. WAL per append and per floor row (after a CHECKPOINT; G = 2, 6,000 of each)"
wal() { # what
  pg -c "CHECKPOINT" >/dev/null
  local before after
  before=$(pg -c "SELECT pg_current_wal_lsn()")
  call "$1" 2 3000 >/dev/null
  after=$(pg -c "SELECT pg_current_wal_lsn()")
  pg -c "SELECT round(pg_wal_lsn_diff('$after', '$before') / 6000.0)"
}
echo "   oq_append_many: $(wal append) bytes per append"
echo "   INSERT:         $(wal floor) bytes per row"
