#!/usr/bin/env bash
# A change to the Redis append script, before and after, in alternating runs (BENCHMARKS.md,
# "The append made leaner"): two bench binaries built from the tree of commit AFTER (default
# aa05495, the merge of branch redis-lean), one as it is ("after") and one with
# src/storage/redis/append.lua taken from commit BEFORE (default AFTER^1, `main` before the
# merge: "before"); then ROUNDS rounds (default 2), each running both binaries in turn through
# redis_commandstats.sh (throughput and the server's `usec_per_call` of the insert call, for
# storage_append, production_style_insert and engine, or the functions given after the two
# commits). Each step of the branch is one commit, so, for example:
#   benches/scripts/redis_append_ab.sh                   # the whole branch: before and after
#   benches/scripts/redis_append_ab.sh 3932cc0           # the fast path alone
#   benches/scripts/redis_append_ab.sh 4b4f35d           # the 16th-seq cleanup alone
#   benches/scripts/redis_append_ab.sh aa05495 aa05495^1 storage_append_clock
# (storage_append_clock exists from 05f2e36 on.) Needs OFFLINE_QUEUE_REDIS_URL; builds in
# git worktrees under a temporary directory (one target directory for both; each binary is
# copied out after its build) and removes them at exit. A release build or two, then about
# 10 s per function per build per round.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
source ./bench_lib.sh

: "${OFFLINE_QUEUE_REDIS_URL:?set OFFLINE_QUEUE_REDIS_URL, e.g. redis://127.0.0.1:6379/}"
after=${1:-aa05495}
before=${2:-$after^1}
shift $(($# < 2 ? $# : 2))
functions=("$@")
[ ${#functions[@]} -gt 0 ] || functions=(storage_append production_style_insert engine)
ROUNDS=${ROUNDS:-2}
lua=src/storage/redis/append.lua

repo=$(git rev-parse --show-toplevel)
dir=$(mktemp -d /tmp/oq-redis-ab.XXXXXX)
cleanup() {
  for build in before after; do
    [ ! -d "$dir/$build" ] || git -C "$repo" worktree remove --force "$dir/$build" || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

export CARGO_TARGET_DIR="$dir/target"
for build in before after; do
  git -C "$repo" worktree add --detach --quiet "$dir/$build" "$after"
  if [ "$build" = before ]; then
    git -C "$dir/before" show "$before:$lua" >"$dir/before/$lua"
  fi
  echo "$build: $(git -C "$dir/$build" rev-parse --short HEAD)$([ "$build" = before ] && echo " with $lua of $(git -C "$repo" rev-parse --short "$before")")" >&2
  cp "$(OQ_BENCH_BIN='' bench_bin redis redis "$dir/$build")" "$dir/redis-$build"
done

for round in $(seq "$ROUNDS"); do
  for build in before after; do
    echo "== round $round, $build"
    OQ_BENCH_BIN="$dir/redis-$build" ROUNDS=1 "$here/redis_commandstats.sh" "${functions[@]}" \
      | grep -E '^round|^   (fcall|evalsha) '
  done
done
