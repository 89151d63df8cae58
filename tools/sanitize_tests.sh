#!/usr/bin/env bash
# Runs tests against the C core built with AddressSanitizer and UBSan.
#   tools/sanitize_tests.sh [pytest args]     (default: the tests of the C core
#                                              and of threads on contexts)
# First proves the setup catches a deliberate out-of-bounds write and that
# the report reaches the log from inside pytest. pytest runs with
# --capture=sys: it captures Python's sys.stderr only, so what the
# sanitizers write to file descriptor 2 is printed as it happens.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
out=$(mktemp -d)
. "$root/tools/sanitizer_setup.sh"
trap 'rm -rf "$out"' EXIT

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# 1. a throwaway module with an out-of-bounds write must abort with a report
mkdir -p "$out/canary"
LD_PRELOAD= "$py" - "$out/canary" <<'PY'
import sys
from cffi import FFI
ffi = FFI()
ffi.cdef("int oob(int n);")
ffi.set_source("canary", """
#include <stdlib.h>
#include <string.h>
int oob(int n) { int *a = malloc(4 * sizeof(int)); memset(a, 0, n * sizeof(int)); int r = a[0]; free(a); return r; }
""", extra_compile_args=["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                         "-fno-sanitize-recover=all"],
     extra_link_args=["-fsanitize=address,undefined"])
ffi.compile(tmpdir=sys.argv[1])
PY
if (cd "$out/canary" && "$py" -c "import canary; canary.lib.oob(5)") 2>"$out/canary.log"; then
  echo "sanitizer setup FAILED: an out-of-bounds write went unreported"; exit 1
fi
grep -q "AddressSanitizer: heap-buffer-overflow" "$out/canary.log" \
  || { cat "$out/canary.log"; echo "sanitizer setup FAILED: no ASan report"; exit 1; }
echo "sanitizer setup: a deliberate out-of-bounds write was caught"

cat >"$out/canary/test_canary.py" <<'PY'
import canary
def test_oob():
    canary.lib.oob(5)
PY
expect_pytest_report "AddressSanitizer: heap-buffer-overflow" "an out-of-bounds write"

# 2. the package with a sanitized C core
use_sanitized_core 1
cd "$root"
if [ $# -eq 0 ]; then
  set -- tests/test_cells*.py tests/test_cache.py tests/test_kv_quant.py tests/test_matmul.py \
    tests/test_native.py tests/test_block.py \
    tests/test_context.py::test_four_threads_on_one_context_lose_no_decode \
    tests/test_context.py::test_two_contexts_on_one_model_decode_concurrently_as_alone
fi
"$py" -m pytest -p no:cacheprovider --capture=sys "$@"
