# Sourced by benches/scripts/*.sh, not run on its own: finds (building it first) the release
# binary of one of the crate's benches, so a script can run one criterion function at a time
# (`$bin --bench --noplot FILTER`) and measure around it.

# bench_bin BENCH FEATURES [TREE]: builds the bench of the crate in TREE (default: OQ_TREE if
# set, a worktree of an earlier commit for its figures; else this tree) with cargo and prints
# the path of its binary. OQ_BENCH_BIN, if set, is printed instead and nothing is built (a
# binary built before).
bench_bin() {
  if [ -n "${OQ_BENCH_BIN:-}" ]; then
    echo "$OQ_BENCH_BIN"
    return
  fi
  local tree=${3:-${OQ_TREE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}} bin
  bin=$(cd "$tree" && cargo bench ${2:+--features "$2"} --bench "$1" --no-run \
      --message-format=json \
    | grep '"kind":\["bench"\]' | grep -o '"executable":"[^"]*"' | tail -1 \
    | sed 's/^"executable":"\(.*\)"$/\1/')
  [ -n "$bin" ] || { echo "bench $1: no binary built" >&2; return 1; }
  echo "$bin"
}
