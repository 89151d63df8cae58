# Shared by tools/sanitize_tests.sh and tools/tsan_tests.sh (sourced; both
# set $py, $out and $root first).

# expect_pytest_report PATTERN WHAT: the canary test in $out/canary must fail
# under pytest with PATTERN in its log, so reports reach CI's log.
expect_pytest_report() {
  if (cd "$out/canary" && "$py" -m pytest -p no:cacheprovider --capture=sys test_canary.py) \
      >"$out/canary_pytest.log" 2>&1; then
    echo "setup FAILED: pytest passed $2"; exit 1
  fi
  grep -q "$1" "$out/canary_pytest.log" \
    || { cat "$out/canary_pytest.log"; echo "setup FAILED: no report of $2 in the log from pytest"; exit 1; }
  echo "setup: $2 was reported from inside pytest"
}

# use_sanitized_core MODE: a copy of the package in $out with its C core
# built with KVCELLS_SANITIZE=MODE, first on PYTHONPATH.
use_sanitized_core() {
  cp -r "$root/src/kvcells" "$out/kvcells"
  rm -f "$out"/kvcells/_core*.so
  KVCELLS_SANITIZE=$1 LD_PRELOAD= "$py" "$root/src/kvcells/_ffi_build.py" "$out" >"$out/build.log" 2>&1 \
    || { cat "$out/build.log"; exit 1; }
  export PYTHONPATH="$out"
  "$py" -c "import kvcells._core as c; assert c.__file__.startswith('$out'), c.__file__"
}
