#!/usr/bin/env bash
# What the rows an append writes cost by themselves, before any PL/pgSQL (BENCHMARKS.md,
# "PostgreSQL (issue 16)", "What the contract's writes cost by themselves"). pgbench, 16
# clients, -M prepared, `synchronous_commit` on, two rows per transaction (two recipients of
# 1,000, 100-byte bodies), each transaction one SQL statement; each step adds to the one
# before:
#   floor    2-row INSERT into a plain table (rid, seq, body; primary key (rid, seq))
#   records  2 rows into oq_records (id, times, the deadline index) with nextval seqs
#   queues   + the queue rows' counters (UPDATE oq_queues)
#   stripe   + the byte stripe (UPDATE oq_bytes)
#   locked   + the queue rows locked first (FOR UPDATE, in rid order)
#   function oq_append_many as it is (2 single-record appends)
# and two whole appends written as one SQL statement each, no PL/pgSQL on the way (the form a
# client-side fast path for groups that need no decision would take): records, seqs taken
# after the queue rows are locked, counters checked against the quota, the stripe, the other
# nodes' presence and its NOTIFY, all-or-nothing (a missing or full queue makes the statement
# fail, and the caller would fall back to oq_append_many):
#   statement         the queue rows locked by the UPDATE that checks the quota
#   statement_locked  the queue rows locked first, in rid order (what keeps two groups from
#                     deadlocking whatever plan the UPDATE gets)
# and one step towards another layout, for comparison:
#   page      records kept in the queue row itself (a `page` column the script adds), each
#             append one UPDATE that checks the quota, takes a seq and appends the record's
#             bytes; a page past 1,500 bytes is sealed into a table of pages (a row of about
#             ten records) and the row starts a new one
# and one step towards an insert-only layout (no row updated by an append, the only kind a
# held xmin horizon cannot bloat once old records are truncated rather than deleted):
#   insert_only            each record's seq is its queue's last seq + 1 (one lookup by the
#                          primary key from past `head`, and one of the queue row), the unique
#                          key orders two appends racing for one queue, and the quota's count
#                          and bytes come from the seqs and a running byte total on each record;
#                          the stripe and the presence check as in `statement`
#   insert_only_key_share  the same with the queue rows share-locked (FOR KEY SHARE), which a
#                          queue's removal would need to wait for
#   insert_only_bare       the same without the stripe and the presence check
# (these write a records table of their own, `oq_records_io`, so their seqs never meet the
# sequence's)
# ROUNDS rounds of RUN_SECONDS seconds per step, the steps alternating within a round; prints each
# round's tps and the mean, against the floor. Builds a throwaway schema from
# src/storage/postgres/sql (dropped at exit); needs psql and pgbench. About 12 x ROUNDS x
# RUN_SECONDS seconds (2 minutes by default).
#
# STEPS (space separated) runs some steps only. HOLD_SNAPSHOT=1 keeps a second connection in a
# REPEATABLE READ transaction with its snapshot taken, from before the first step to the end,
# holding the xmin horizon as a long transaction or an idle replication slot would; the script
# then also prints each table's size at the end (`pg_total_relation_size`), so a layout's
# growth under a held horizon shows (floor: `floor`; records steps: `oq_records`; queue-row
# steps: `oq_queues`; page: `oq_queues` and `pages`).
#
#   benches/scripts/pg_contract_writes.sh            # ROUNDS=3 RUN_SECONDS=5 CLIENTS=16
#   EXTRA_PGOPTIONS='-c plan_cache_mode=force_generic_plan' benches/scripts/pg_contract_writes.sh
#   STEPS='floor locked page' HOLD_SNAPSHOT=1 benches/scripts/pg_contract_writes.sh
set -euo pipefail
cd "$(dirname "$0")"
source ./pg_lib.sh

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${RUN_SECONDS:-5}
CLIENTS=${CLIENTS:-16}
schema=$(pg_schema_name writes)
dir=$(mktemp -d /tmp/oq-pg-writes.XXXXXX)
trap 'pg_schema_drop "$schema"; rm -rf "$dir"' EXIT
pg_schema_create "$schema"
S="\"$schema\""

pg <<SQL
CREATE TABLE $S.floor (rid bytea NOT NULL, seq bigint NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (rid, seq));
-- Every recipient's queue row exists, as after its first append.
INSERT INTO $S.oq_queues (rid, live, bytes, lost_total, lost_confirmed, touched, idle_key)
SELECT convert_to('user-' || i, 'UTF8'), 0, 0, 0, 0, $PG_NOW, $PG_NOW
FROM generate_series(0, 999) AS i;
ANALYZE $S.oq_queues;
SQL

# Two distinct recipients per transaction.
vars='\set a random(0, 999)
\set b (:a + 1 + random(0, 998)) % 1000'
ra="convert_to('user-' || :a, 'UTF8')"
rb="convert_to('user-' || :b, 'UTF8')"
row() { # rid
  echo "($1, nextval('$S.oq_seq'), uuid_send(gen_random_uuid()), $PG_NOW, $PG_NOW + $PG_TTL_MS, $PG_BODY)"
}
records="INSERT INTO $S.oq_records (rid, seq, id, sent_at, expires_at, body) VALUES $(row "$ra"), $(row "$rb")"
counters="SET live = q.live + 1, bytes = q.bytes + 100, touched = greatest(q.touched, $PG_NOW)"
stripe="UPDATE $S.oq_bytes SET bytes = bytes + 200 WHERE stripe = pg_backend_pid() % 16"

cat >"$dir/floor.sql" <<SQL
$vars
\set s random(1, 4000000000000000000)
\set t :s + 1
INSERT INTO $S.floor (rid, seq, body) VALUES ($ra, :s::bigint, $PG_BODY), ($rb, :t::bigint, $PG_BODY);
SQL
cat >"$dir/records.sql" <<SQL
$vars
$records;
SQL
cat >"$dir/queues.sql" <<SQL
$vars
WITH r AS ($records) UPDATE $S.oq_queues q $counters WHERE q.rid = ANY (ARRAY[$ra, $rb]);
SQL
cat >"$dir/stripe.sql" <<SQL
$vars
WITH r AS ($records), b AS ($stripe) UPDATE $S.oq_queues q $counters WHERE q.rid = ANY (ARRAY[$ra, $rb]);
SQL
cat >"$dir/locked.sql" <<SQL
$vars
WITH l AS (SELECT rid FROM $S.oq_queues WHERE rid = ANY (ARRAY[$ra, $rb]) ORDER BY rid FOR UPDATE), r AS ($records), b AS ($stripe) UPDATE $S.oq_queues q $counters FROM l WHERE q.rid = l.rid;
SQL
cat >"$dir/function.sql" <<SQL
$vars
SELECT status FROM $S.oq_append_many(ARRAY[$ra, $rb], ARRAY[1, 1], ARRAY[uuid_send(gen_random_uuid()), uuid_send(gen_random_uuid())], ARRAY[false, false], ARRAY[$PG_NOW, $PG_NOW], ARRAY[$PG_NOW + $PG_TTL_MS, $PG_NOW + $PG_TTL_MS], ARRAY[$PG_BODY, $PG_BODY], ARRAY[1000000, 1000000]::bigint[], ARRAY[1073741824, 1073741824]::bigint[], ARRAY[false, false], ARRAY[NULL, NULL]::bigint[], ARRAY[1800000, 1800000]::bigint[], ARRAY[$PG_NOW, $PG_NOW], '\\x00'::bytea, 'oq_script');
SQL

# The whole append as one statement. A queue missing or over its quota fails it (SQLSTATE
# OQ001, raised by a helper only this script makes), so nothing of it is written.
pg <<SQL
CREATE FUNCTION $S.oq_script_refused() RETURNS boolean LANGUAGE plpgsql AS \$\$
BEGIN RAISE EXCEPTION USING ERRCODE = 'OQ001', MESSAGE = 'a queue is missing or full'; END;
\$\$;
SQL
pair="ARRAY[$ra, $rb]"
by_rid="ARRAY(SELECT x FROM unnest($pair) AS x ORDER BY x)"
per="per AS (SELECT * FROM unnest($by_rid, ARRAY[1, 1]::bigint[], ARRAY[100, 100]::bigint[],
    ARRAY[1000000, 1000000]::bigint[], ARRAY[1073741824, 1073741824]::bigint[],
    ARRAY[$PG_NOW, $PG_NOW]) AS p(rid, adding, adding_bytes, max_messages, max_bytes, now))"
new_records="unnest($pair, ARRAY[uuid_send(gen_random_uuid()), uuid_send(gen_random_uuid())],
    ARRAY[$PG_NOW, $PG_NOW], ARRAY[$PG_NOW + $PG_TTL_MS, $PG_NOW + $PG_TTL_MS],
    ARRAY[$PG_BODY, $PG_BODY]) WITH ORDINALITY AS r(rid, id, sent_at, expires_at, body, ord)"
fits="per.adding <= per.max_messages AND %s.live <= per.max_messages - per.adding
    AND per.adding_bytes <= per.max_bytes AND %s.bytes <= per.max_bytes - per.adding_bytes"
# Seqs only once every queue row is held (the one-time filter on `checked`), so a recipient's
# seqs grow in commit order as oq_plan_append's do.
rest="seqs AS MATERIALIZED (SELECT o.ord, nextval('$S.oq_seq') AS seq
    FROM (SELECT g AS ord FROM generate_series(1, 2) AS g ORDER BY g) AS o
    WHERE (SELECT ok FROM checked)),
ins AS (INSERT INTO $S.oq_records (rid, seq, id, sent_at, expires_at, body)
    SELECT r.rid, s.seq, r.id, r.sent_at, r.expires_at, r.body FROM $new_records JOIN seqs s USING (ord)),
b AS ($stripe),
woken AS (SELECT per.rid, pg_notify('oq_script', encode(per.rid, 'hex')) FROM per
    WHERE EXISTS (SELECT 1 FROM $S.oq_presence p JOIN $S.oq_nodes n ON n.node = p.node
        WHERE p.rid = per.rid AND p.node <> '\\x00'::bytea AND n.lease_until > clock_timestamp()))
SELECT (SELECT array_agg(seq ORDER BY ord) FROM seqs), (SELECT array_agg(rid ORDER BY rid) FROM u),
    (SELECT array_agg(live ORDER BY rid) FROM u), ARRAY(SELECT rid FROM woken)"
# shellcheck disable=SC2059 # $fits is the format
cat >"$dir/statement.sql" <<SQL
$vars
WITH $per,
u AS (UPDATE $S.oq_queues q SET live = q.live + per.adding, bytes = q.bytes + per.adding_bytes,
        touched = greatest(q.touched, per.now)
    FROM per WHERE q.rid = ANY ($by_rid) AND q.rid = per.rid AND $(printf "$fits" q q)
    RETURNING q.rid, q.live),
checked AS MATERIALIZED (SELECT CASE WHEN count(*) = 2 THEN true ELSE $S.oq_script_refused() END AS ok FROM u),
$rest;
SQL
# shellcheck disable=SC2059
cat >"$dir/statement_locked.sql" <<SQL
$vars
WITH $per,
l AS MATERIALIZED (SELECT q.rid, q.live, q.bytes FROM $S.oq_queues q
    WHERE q.rid = ANY ($by_rid) ORDER BY q.rid FOR UPDATE),
checked AS MATERIALIZED (SELECT CASE WHEN count(*) = 2 AND bool_and($(printf "$fits" l l)) THEN true
    ELSE $S.oq_script_refused() END AS ok FROM l JOIN per USING (rid)),
u AS (UPDATE $S.oq_queues q SET live = q.live + per.adding, bytes = q.bytes + per.adding_bytes,
        touched = greatest(q.touched, per.now)
    FROM per WHERE q.rid = per.rid AND (SELECT ok FROM checked)
    RETURNING q.rid, q.live),
$rest;
SQL

pg <<SQL
ALTER TABLE $S.oq_queues ADD COLUMN page bytea NOT NULL DEFAULT '';
CREATE TABLE $S.pages (rid bytea NOT NULL, seq bigint NOT NULL, page bytea NOT NULL,
    PRIMARY KEY (rid, seq));
SQL
paged="(int8send(nextval('$S.oq_seq')) || uuid_send(gen_random_uuid()) || int8send($PG_NOW)
    || int8send($PG_NOW + $PG_TTL_MS) || $PG_BODY)"
cat >"$dir/page.sql" <<SQL
$vars
WITH u AS (UPDATE $S.oq_queues q SET live = q.live + 1, bytes = q.bytes + 100,
        touched = greatest(q.touched, $PG_NOW),
        page = CASE WHEN octet_length(q.page) > 1500 THEN $paged ELSE q.page || $paged END
    WHERE q.rid = ANY (ARRAY[$ra, $rb]) AND q.live < 1000000 AND q.bytes < 1073741724
    RETURNING q.rid, q.live, q.page),
sealed AS (INSERT INTO $S.pages SELECT u.rid, u.live, u.page FROM u WHERE octet_length(u.page) > 1500)
SELECT array_agg(live) FROM u;
SQL

# Another layout, insert-only appends: a record's seq is its queue's last seq + 1 (found by
# the primary key, from past `head`), the unique key (rid, seq) orders two appends racing for
# one queue (the second waits for the first, then finds its seq taken and, in a real append,
# retries), and the count and bytes a quota needs come from the seqs and a running byte total
# on each record (`cum_bytes`) less what was removed, so an append updates no queue row.
pg <<SQL
-- A records table of its own (same columns, keys and indexes), so these seqs and the
-- sequence's never meet.
CREATE TABLE $S.oq_records_io (LIKE $S.oq_records INCLUDING ALL);
ALTER TABLE $S.oq_records_io ADD COLUMN cum_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE $S.oq_queues ADD COLUMN head_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN holes bigint NOT NULL DEFAULT 0, ADD COLUMN holes_bytes bigint NOT NULL DEFAULT 0;
SQL
cat >"$dir/insert_only.sql" <<SQL
$vars
WITH x AS (SELECT * FROM unnest(ARRAY[$ra, $rb], ARRAY[uuid_send(gen_random_uuid()), uuid_send(gen_random_uuid())])
    WITH ORDINALITY AS x(rid, id, ord)),
p AS MATERIALIZED (SELECT x.ord, x.rid, x.id, greatest(l.seq, q.head) + 1 AS seq,
        coalesce(l.cum_bytes, q.head_bytes) + 100 AS cum, q.head, q.holes, q.head_bytes, q.holes_bytes
    FROM x JOIN $S.oq_queues q ON q.rid = x.rid
    LEFT JOIN LATERAL (SELECT r.seq, r.cum_bytes FROM $S.oq_records_io r
        WHERE r.rid = x.rid AND r.seq > q.head ORDER BY r.seq DESC LIMIT 1) l ON true),
ins AS (INSERT INTO $S.oq_records_io (rid, seq, id, sent_at, expires_at, body, cum_bytes)
    SELECT p.rid, p.seq, p.id, $PG_NOW, $PG_NOW + $PG_TTL_MS, $PG_BODY, p.cum FROM p
    WHERE p.seq - p.head - p.holes <= 1000000 AND p.cum - p.head_bytes - p.holes_bytes <= 1073741824
    ON CONFLICT DO NOTHING RETURNING rid, seq),
b AS ($stripe),
woken AS (SELECT p.rid, pg_notify('oq_script', encode(p.rid, 'hex')) FROM p
    WHERE EXISTS (SELECT 1 FROM $S.oq_presence pr JOIN $S.oq_nodes n ON n.node = pr.node
        WHERE pr.rid = p.rid AND pr.node <> '\\x00'::bytea AND n.lease_until > clock_timestamp()))
SELECT (SELECT array_agg(seq) FROM ins), ARRAY(SELECT rid FROM woken);
SQL
# The same with each queue row share-locked (FOR KEY SHARE, as a foreign key check would): what
# keeps an idle removal (which deletes the row) from passing an append in flight, while appends
# and the counters' updates (FOR NO KEY UPDATE) do not wait on one another.
sed -e 's/^WITH x AS (SELECT/WITH x AS MATERIALIZED (SELECT/' \
  -e 's/ORDER BY r.seq DESC LIMIT 1) l ON true),$/ORDER BY r.seq DESC LIMIT 1) l ON true FOR KEY SHARE OF q),/' \
  "$dir/insert_only.sql" >"$dir/insert_only_key_share.sql"
grep -q 'FOR KEY SHARE OF q' "$dir/insert_only_key_share.sql"
# The same without the byte stripe and the presence check: the records and their lookups alone.
sed -e '/^b AS/,/^SELECT/{/^SELECT/!d}' -e 's/^SELECT (SELECT array_agg(seq) FROM ins), .*/SELECT (SELECT array_agg(seq) FROM ins);/' \
  -e 's/RETURNING rid, seq),$/RETURNING rid, seq)/' "$dir/insert_only.sql" >"$dir/insert_only_bare.sql"

read -r -a steps <<<"${STEPS:-floor records queues stripe locked function statement statement_locked page insert_only insert_only_key_share insert_only_bare}"
[[ " ${steps[*]} " == *" floor "* ]] || { echo "STEPS must include floor (the baseline)" >&2; exit 1; }
if [[ ${HOLD_SNAPSHOT:-0} == 1 ]]; then
  # The snapshot is taken by the SELECT and held until this script ends (the EXIT trap below
  # closes the pipe, which ends psql and its transaction).
  mkfifo "$dir/hold"
  PGAPPNAME=oq_hold_snapshot psql -X -q <"$dir/hold" >/dev/null 2>&1 &
  exec 9>"$dir/hold"
  echo "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;" >&9
  trap 'exec 9>&-; pg_schema_drop "$schema"; rm -rf "$dir"' EXIT
  for _ in $(seq 50); do
    held=$(pg -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'oq_hold_snapshot' AND backend_xmin IS NOT NULL")
    [[ $held -ge 1 ]] && break
    sleep 0.1
  done
  [[ $held -ge 1 ]] || { echo "the snapshot holder did not start" >&2; exit 1; }
  echo "holding a snapshot (xmin horizon) for the whole run"
fi
declare -A sum
for step in "${steps[@]}"; do sum[$step]=0; done
export PGOPTIONS="-c synchronous_commit=on ${EXTRA_PGOPTIONS:-}"
printf '%-6s' round; printf ' %9s' "${steps[@]}"; echo
for round in $(seq "$ROUNDS"); do
  printf '%-6s' "$round"
  for step in "${steps[@]}"; do
    if ! pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" --max-tries 10 \
      -f "$dir/$step.sql" >"$dir/$step.out" 2>&1; then
      echo; cat "$dir/$step.out" >&2; exit 1
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$dir/$step.out")
    sum[$step]=$(echo "${sum[$step]} + $tps" | bc -l)
    printf ' %9.0f' "$tps"
  done
  echo
done
echo
echo "| transaction | tps (mean of $ROUNDS) | of the floor |"
echo "|---|---|---|"
floor=$(echo "${sum[floor]} / $ROUNDS" | bc -l)
for step in "${steps[@]}"; do
  mean=$(echo "${sum[$step]} / $ROUNDS" | bc -l)
  printf '| %s | %.0f | %.0f %% |\n' "$step" "$mean" "$(echo "100 * $mean / $floor" | bc -l)"
done
if [[ ${HOLD_SNAPSHOT:-0} == 1 || -n ${STEPS:-} ]]; then
  echo
  echo "| table | size (MiB) |"
  echo "|---|---|"
  for table in floor oq_records oq_queues pages oq_records_io; do
    printf '| %s | %s |\n' "$table" "$(pg -c "SELECT round(pg_total_relation_size('$S.$table') / 1048576.0, 2)")"
  done
fi
