#!/usr/bin/env bash
# What a bench function writes per sync: `strace -f` of one criterion function of one of the
# crate's benches, run alone for PROFILE_SECONDS (default 5) with criterion's `--profile-time`,
# counting its pwrite64 calls and bytes and its fdatasync calls, then writes and bytes per
# fdatasync (BENCHMARKS.md, "Durable sends on RedbStorage": pages written per group commit):
#   benches/scripts/strace_writes.sh redb redb 'durable_send/group_commit/256$'
# Arguments: the bench, its features ('' for none), a criterion filter. Builds the bench
# (release) with cargo first, in this tree or in OQ_TREE (a worktree of an earlier commit,
# such as 9da1e25 for format 2), unless OQ_BENCH_BIN names a built binary. Needs strace.
# strace slows the process a lot: the counts per sync are the figure, not the rates.
set -euo pipefail
cd "$(dirname "$0")"
source ./bench_lib.sh

[ $# -eq 3 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$(basename "$0")" >&2; exit 2; }
bin=$(bench_bin "$1" "$2")
dir=$(mktemp -d /tmp/oq-strace.XXXXXX)
trap 'rm -rf "$dir"' EXIT

strace -f -qq -e trace=pwrite64,fdatasync -o "$dir/trace" -- \
  "$bin" --bench --profile-time "${PROFILE_SECONDS:-5}" "$3" >"$dir/bench.out" 2>&1 \
  || { cat "$dir/bench.out" >&2; exit 1; }
# Lines: "PID pwrite64(FD, "..."..., LEN, OFFSET) = WRITTEN" and "PID fdatasync(FD) = 0".
awk '
  / pwrite64\(/ && $NF ~ /^[0-9]+$/ { writes++; bytes += $NF }
  / fdatasync\(/ { syncs++ }
  END {
    printf "pwrite64: %d calls, %.1f MiB; fdatasync: %d calls\n", writes, bytes / 1048576, syncs
    if (syncs) printf "per fdatasync: %.1f writes, %.1f KiB\n", writes / syncs, bytes / syncs / 1024
  }' "$dir/trace"
