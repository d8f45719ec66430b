#!/usr/bin/env bash
# Where the Redis server's time goes per insert in the send benches of benches/redis.rs
# (BENCHMARKS.md, "Redis (issue 20)": the per-message breakdown, and "The append made leaner":
# `usec_per_call` per function and per command): for each function of the group
# `redis_send_64_senders` named (default: storage_append storage_append_clock
# production_style_insert engine raw_lpush), `CONFIG RESETSTAT`, the function run alone by the
# bench binary, then its throughput line and `INFO commandstats`: each command's calls per
# insert, `usec_per_call` and microseconds per insert, the insert being the `FCALL` (ours; an
# `EVALSHA` in builds before layout 2), the `EVALSHA` (the production-style script) or the
# `LPUSH` (the floor), and the other commands' sum per insert; then the CPU time per insert
# of the server (`INFO cpu`, all its threads) and of the bench process (user and system, from
# bash's `time`), both over the whole run of the function (warm-up included, as the counts
# are). Resets the server's statistics, so run it on a Redis nothing else uses. Builds the
# bench (release) with cargo first: in this tree, or in OQ_TREE (a worktree of an earlier
# commit, for that build's figures); OQ_BENCH_BIN names a built binary instead. ROUNDS
# repeats the whole list (default 1). About 10 s per function.
#
#   OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ benches/scripts/redis_commandstats.sh
#   OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ benches/scripts/redis_commandstats.sh storage_append
#   git worktree add /tmp/oq-4fff230 4fff230 && OQ_TREE=/tmp/oq-4fff230 \
#     OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ benches/scripts/redis_commandstats.sh engine
set -euo pipefail
cd "$(dirname "$0")"
source ./bench_lib.sh

: "${OFFLINE_QUEUE_REDIS_URL:?set OFFLINE_QUEUE_REDIS_URL, e.g. redis://127.0.0.1:6379/}"
export OFFLINE_QUEUE_REDIS_URL
ROUNDS=${ROUNDS:-1}
functions=("$@")
[ ${#functions[@]} -gt 0 ] || functions=(storage_append storage_append_clock production_style_insert engine raw_lpush)
bin=$(bench_bin redis redis)
dir=$(mktemp -d /tmp/oq-redis-stats.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cli() { redis-cli -u "$OFFLINE_QUEUE_REDIS_URL" "$@"; }
server_cpu() { cli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f", s }'; }

for round in $(seq "$ROUNDS"); do
  for f in "${functions[@]}"; do
    cli config resetstat >/dev/null
    before=$(server_cpu)
    client=$( { TIMEFORMAT='%U %S'; time "$bin" --bench --noplot "redis_send_64_senders/$f\$" >"$dir/out" 2>&1; } 2>&1 )
    after=$(server_cpu)
    echo "round $round, $f: $(grep 'thrpt:' "$dir/out" | head -1 | sed 's/^ *//')"
    case $f in
      production_style_insert) insert=evalsha ;;
      raw_lpush) insert=lpush ;;
      *) insert=fcall ;;
    esac
    cli info commandstats | tr -d '\r' | awk -F'[:=,]' -v insert="$insert" -v server="$(echo "$after - $before" | bc -l)" -v client="$client" '
      /^cmdstat_/ {
        name = substr($1, 9); calls[name] = $3; usec[name] = $5
        for (i = 6; i < NF; i += 2) if ($i == "usec_per_call") per[name] = $(i + 1)
      }
      END {
        # Builds before 2026-11-26 (layout 1) appended with EVALSHA, not FCALL.
        if (insert == "fcall" && !(insert in calls)) insert = "evalsha"
        n = calls[insert]
        if (n == 0) { print "   no insert calls counted"; exit }
        printf "   %-22s %13s %14s %15s\n", "command", "calls/insert", "usec_per_call", "usec per insert"
        k = 0; inside = 0
        for (c in calls) {
          if (calls[c] / n < 0.005) continue
          line[++k] = sprintf("   %-22s %13.3f %14.2f %15.2f", c, calls[c] / n, per[c], usec[c] / n)
          cost[k] = usec[c] / n
          if (c != insert && c !~ /^(fcall|fcall_ro|evalsha|eval|info|config\|.*|function\|.*|script\|.*|client\|.*|hello|ping|select)$/)
            inside += usec[c] / n
        }
        for (i = 2; i <= k; i++)
          for (j = i; j > 1 && cost[j - 1] < cost[j]; j--) {
            t = cost[j]; cost[j] = cost[j - 1]; cost[j - 1] = t
            t = line[j]; line[j] = line[j - 1]; line[j - 1] = t
          }
        for (i = 1; i <= k; i++) print line[i]
        printf "   commands other than the %s call, per insert: %.2f usec\n", toupper(insert), inside
        split(client, cl, " ")
        printf "   CPU per insert: server %.2f usec; bench process %.2f usec (user %.2f, system %.2f), over %d inserts\n", server * 1e6 / n, (cl[1] + cl[2]) * 1e6 / n, cl[1] * 1e6 / n, cl[2] * 1e6 / n, n
      }'
  done
done
