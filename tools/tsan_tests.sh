#!/usr/bin/env bash
# Runs the threaded tests against the C core built with ThreadSanitizer.
#   tools/tsan_tests.sh [pytest args]     (default: the tests that call the C
#                                          core from several threads, and the pool)
# Python is not instrumented, so libtsan is preloaded; races between our
# threads (csrc/pool.c's workers, Python threads calling the core) are seen
# through the instrumented core and the intercepted pthread calls.
# OpenBLAS (numpy's matmul in the tests' references) syncs its own threads
# with spinning TSan cannot see, so it runs on one thread here
# (OPENBLAS_NUM_THREADS=1); no suppressions file is needed.
# First proves the setup: a deliberate race in a throwaway module must be
# reported from inside pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
out=$(mktemp -d)
. "$root/tools/sanitizer_setup.sh"
trap 'rm -rf "$out"' EXIT

export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
export TSAN_OPTIONS="halt_on_error=1 exitcode=66"
export OPENBLAS_NUM_THREADS=1

# 1. a throwaway module whose two threads write one int without a lock
mkdir -p "$out/canary"
LD_PRELOAD= "$py" - "$out/canary" <<'PY'
import sys
from cffi import FFI
ffi = FFI()
ffi.cdef("int race(void);")
ffi.set_source("canary", """
#include <pthread.h>
static int shared;
static void *bump(void *arg) { for (int i = 0; i < 1000; i++) shared++; return arg; }
int race(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, bump, NULL);
    pthread_create(&b, NULL, bump, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return shared;
}
""", extra_compile_args=["-fsanitize=thread", "-g"], extra_link_args=["-fsanitize=thread"])
ffi.compile(tmpdir=sys.argv[1])
PY
cat >"$out/canary/test_canary.py" <<'PY'
import canary
def test_race():
    canary.lib.race()
PY
expect_pytest_report "WARNING: ThreadSanitizer: data race" "a deliberate data race"

# 2. the package with a ThreadSanitizer-built C core
use_sanitized_core thread
cd "$root"
if [ $# -eq 0 ]; then
  set -- tests/test_context.py::test_four_threads_on_one_context_lose_no_decode \
    tests/test_matmul.py::test_concurrent_callers_from_python_threads \
    tests/test_matmul.py::test_thread_counts_give_identical_results \
    tests/test_cache.py::test_many_sequences_decoding_on_two_threads_matches_dense \
    tests/test_cache.py::test_one_long_sequence_split_over_threads_matches_dense \
    tests/test_block.py::test_a_stack_equals_its_embeddings_layers_and_head_in_numpy
fi
"$py" -m pytest -p no:cacheprovider --capture=sys "$@"
