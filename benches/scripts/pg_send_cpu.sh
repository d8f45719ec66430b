#!/usr/bin/env bash
# Where the PostgreSQL send's time goes (BENCHMARKS.md, "PostgreSQL (issue 16)", "CPU, in the
# server"): runs the postgres bench's `postgres_send_64_senders/storage_append` alone (warm-up
# and measurement, about 8 s) and, while it runs, samples
#   - the machine's CPU (vmstat, every second): mean user, system, idle and iowait;
#   - CPU time (utime + stime from /proc) of every `postgres` process, and of the bench
#     process, over the run;
#   - the wait events of the active client backends (pg_stat_activity, every 0.1 s; "CPU"
#     where a backend waits on nothing), as shares of all samples;
#   - with PERF=1, `perf record -a -g` of the whole machine, reported by command and object
#     and by symbol (needs perf, and root or kernel.perf_event_paranoid <= 0).
# Builds the bench (release, features postgres,redis) with cargo first, in this tree or in
# OQ_TREE (a worktree of an earlier commit), unless OQ_BENCH_BIN names a built binary. Any
# other command to sample can be given as arguments instead:
#   OFFLINE_QUEUE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test benches/scripts/pg_send_cpu.sh
#   PERF=1 OFFLINE_QUEUE_POSTGRES_URL=... benches/scripts/pg_send_cpu.sh
#   benches/scripts/pg_send_cpu.sh pgbench -n -c 16 -T 8 -f my.sql    # any load
# psql connects through PGHOST, PGPORT, PGUSER, PGDATABASE (default 127.0.0.1, 5432,
# postgres, test): the server the bench uses.
set -euo pipefail
cd "$(dirname "$0")"
source ./pg_lib.sh
source ./bench_lib.sh

if [ $# -gt 0 ]; then
  command=("$@")
else
  : "${OFFLINE_QUEUE_POSTGRES_URL:?set OFFLINE_QUEUE_POSTGRES_URL, e.g. postgres://postgres@127.0.0.1:5432/test}"
  export OFFLINE_QUEUE_POSTGRES_URL
  command=("$(bench_bin postgres postgres,redis)" --bench --noplot 'postgres_send_64_senders/storage_append$')
fi
dir=$(mktemp -d /tmp/oq-pg-cpu.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# "postgres PID TICKS" for every `postgres` process: utime + stime in clock ticks.
ticks() {
  local stat line pid comm
  for stat in /proc/[0-9]*/stat; do
    { read -r line <"$stat"; } 2>/dev/null || continue
    pid=${line%% *}
    comm=${line#*(}
    comm=${comm%%)*}
    [ "$comm" = postgres ] || continue
    # shellcheck disable=SC2086 # the fields after the command name, split on purpose
    set -- ${line##*) }
    echo "postgres $pid $((${12} + ${13}))"
  done
}
hz=$(getconf CLK_TCK)
ticks >"$dir/ticks0"

"${command[@]}" >"$dir/command.out" 2>&1 &
cmd=$!
pids+=("$cmd")
vmstat 1 >"$dir/vmstat" & pids+=($!)
if [ "${PERF:-0}" = 1 ]; then
  perf record -a -g -q -o "$dir/perf.data" >/dev/null 2>&1 & pids+=($!)
  perf=$!
fi
# Wait events, from one psql session fed a query every 0.1 s.
while kill -0 "$cmd" 2>/dev/null; do
  echo "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid();"
  sleep 0.1
done | pg >"$dir/waits" &
pids+=($!)
start=$(date +%s%N)
: >"$dir/ticks"
while kill -0 "$cmd" 2>/dev/null; do
  ticks >>"$dir/ticks"
  if { read -r line <"/proc/$cmd/stat"; } 2>/dev/null; then
    # shellcheck disable=SC2086
    set -- ${line##*) }
    echo "command $cmd $((${12} + ${13}))" >>"$dir/ticks"
  fi
  sleep 0.25
done
end=$(date +%s%N)
wait "$cmd" || { cat "$dir/command.out" >&2; echo "the command failed" >&2; exit 1; }
if [ -n "${perf:-}" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi

grep -E 'thrpt:|tps = ' "$dir/command.out" | sed 's/^ */command: /' || true
seconds=$(echo "($end - $start) / 1000000000" | bc -l)
printf 'run: %.1f s\n' "$seconds"
awk 'NR > 2 && $1 ~ /^[0-9]+$/ { n++; us += $13; sy += $14; id += $15; wa += $16 }
     END { if (n) printf "machine (vmstat, %d samples): user %.0f %%, system %.0f %%, idle %.0f %%, iowait %.0f %%\n", n, us / n, sy / n, id / n, wa / n }' "$dir/vmstat"
# CPU per process: each pid's last sample less its ticks before the run (0 for a process that
# started during it, as the bench's connections do; the last 0.25 s of a process is missed).
awk -v hz="$hz" -v secs="$seconds" '
  FNR == NR { before[$1 " " $2] = $3; next }
  { last[$1 " " $2] = $3 }
  END {
    for (k in last) { grow = last[k] - ((k in before) ? before[k] : 0); if (k ~ /^postgres/) pg += grow; else cmd += grow }
    printf "CPU over the run: postgres processes %.1f s, the command %.1f s (in %.1f s of wall time)\n", pg / hz, cmd / hz, secs
  }' "$dir/ticks0" "$dir/ticks"
echo "wait events of active client backends (share of $(wc -l <"$dir/waits") backend samples):"
sort "$dir/waits" | uniq -c | sort -rn | awk -v n="$(wc -l <"$dir/waits")" '{ printf "   %5.1f %%  %s\n", 100 * $1 / n, $2 }' | head -12
if [ -n "${perf:-}" ]; then
  echo "perf, by command and object (self):"
  perf report -i "$dir/perf.data" --no-children --sort comm,dso --percent-limit 1 --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -20
  echo "perf, by symbol (self):"
  perf report -i "$dir/perf.data" --no-children --sort comm,symbol --percent-limit 0.7 --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -30
fi
