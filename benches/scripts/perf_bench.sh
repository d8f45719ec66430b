#!/usr/bin/env bash
# Where one bench function's time goes: `perf record` (cpu-clock samples, call graphs by
# DWARF) of one criterion function of one of the crate's benches, run alone for
# PROFILE_SECONDS (default 10) with criterion's `--profile-time` (no analysis, no report),
# then perf's shares of all samples: by thread and object, by symbol (self), and by symbol
# with its callees (children), for BENCHMARKS.md's "Where the time goes" (the engine) and the
# redb writer's shares ("Durable sends on RedbStorage"):
#   benches/scripts/perf_bench.sh engine '' 'engine_warm/send/engine$'
#   benches/scripts/perf_bench.sh engine '' 'engine_warm/deliver_ack/engine$'
#   benches/scripts/perf_bench.sh redb redb 'durable_send/group_commit/256$'
# Arguments: the bench, its features ('' for none), a criterion filter. Builds the bench
# (release) with cargo first, in this tree or in OQ_TREE (a worktree of an earlier commit),
# unless OQ_BENCH_BIN names a built binary. Needs perf (root, or
# kernel.perf_event_paranoid <= 1). perf.data goes to a temporary directory, removed at exit
# (PERF_KEEP=DIR copies it there first). Extra `perf report` options: PERF_REPORT_OPTS.
set -euo pipefail
cd "$(dirname "$0")"
source ./bench_lib.sh

[ $# -eq 3 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$(basename "$0")" >&2; exit 2; }
bench=$1 features=$2 filter=$3
seconds=${PROFILE_SECONDS:-10}
bin=$(bench_bin "$bench" "$features")
dir=$(mktemp -d /tmp/oq-perf.XXXXXX)
trap 'rm -rf "$dir"' EXIT

perf record -e cpu-clock -F 499 --call-graph dwarf -q -o "$dir/perf.data" -- \
  "$bin" --bench --profile-time "$seconds" "$filter" >"$dir/bench.out" 2>&1 \
  || { cat "$dir/bench.out" >&2; exit 1; }
[ -z "${PERF_KEEP:-}" ] || cp "$dir/perf.data" "$PERF_KEEP/"
report() { # title, then perf report options
  echo "== $1"
  shift
  # shellcheck disable=SC2086 # PERF_REPORT_OPTS is a list of options
  perf report -i "$dir/perf.data" --stdio -g none ${PERF_REPORT_OPTS:-} "$@" 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -40
}
report "by thread and object (self)" --no-children --sort comm,dso --percent-limit 1
report "by symbol (self)" --no-children --sort symbol --percent-limit 1
report "by symbol, with callees (children)" --children --sort symbol --percent-limit 3
