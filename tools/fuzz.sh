#!/usr/bin/env bash
# Coverage-guided fuzzing of the C core with libFuzzer, ASan and UBSan
# (needs clang). Targets in fuzz/: the cell-table state reader and a
# call-sequence fuzzer over the cell table.
#   tools/fuzz.sh [seconds per target, default 30]
#   FUZZ_KEEP=1 tools/fuzz.sh 3600    also merge new inputs into fuzz/corpus/
# Starts from the corpus in fuzz/corpus/<target>; a crash fails the run and
# leaves its input in fuzz/crashes/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-30}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc=${CC_FUZZ:-clang}
flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I"$root/csrc"
       -fsanitize-coverage-ignorelist="$root/fuzz/not_covered.txt")
export ASAN_OPTIONS=detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
mkdir -p "$root/fuzz/crashes"
for target in fuzz_state fuzz_cells; do
  "$cc" "${flags[@]}" "$root/fuzz/$target.c" "$root/csrc/cells.c" "$root/csrc/status.c" -o "$out/$target"
  mkdir -p "$out/new-$target" "$root/fuzz/corpus/$target"
  "$out/$target" -max_total_time="$seconds" -print_final_stats=1 -max_len=4096 \
    -artifact_prefix="$root/fuzz/crashes/$target-" \
    "$out/new-$target" "$root/fuzz/corpus/$target" 2>"$out/$target.log" \
    || { tail -60 "$out/$target.log"; echo "$target: FAILED"; exit 1; }
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$target.log" | grep -o '[0-9]*$')
  cov=$(grep -E '^#[0-9]+' "$out/$target.log" | tail -1 | grep -o 'cov: [0-9]* ft: [0-9]*' || true)
  echo "$target: $runs executions in ${seconds}s, $cov, no crash"
  if [ "${FUZZ_KEEP:-0}" = 1 ]; then
    "$out/$target" -merge=1 "$root/fuzz/corpus/$target" "$out/new-$target" 2>/dev/null
  fi
done
