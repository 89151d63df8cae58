"""The door to the C core: every C entry point that can fail returns a
kvc_status and leaves a message, and `native` turns both into the right
exception. The C-level checks are driven through the door's cffi handles
with arguments no wrapper lets through (NULL pointers, bad strides)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import kvcells
from kvcells import CacheFullError, CellTable, KVCellsError, StateError, native

ffi, lib = native.ffi, native.lib


def message():
    return ffi.string(lib.kvc_last_error()).decode()


def test_matmul_entry_points_validate_their_arguments():
    w = ffi.new("uint8_t[]", 34 * 4)
    x = ffi.new("float[]", 64)
    y = ffi.new("float[]", 8)
    ids = ffi.new("int64_t[]", [0, 1])
    out = ffi.new("float[]", 128)
    q8 = lib.KVC_TYPE_Q8_0
    assert lib.matmul(q8, w, 68, 2, 64, x, 1, y, 1) == lib.KVC_OK
    bad = [
        lambda: lib.matmul(99, w, 68, 2, 64, x, 1, y, 1),
        lambda: lib.matmul(q8, ffi.NULL, 68, 2, 64, x, 1, y, 1),
        lambda: lib.matmul(q8, w, 67, 2, 64, x, 1, y, 1),
        lambda: lib.matmul(q8, w, 68, 0, 64, x, 1, y, 1),
        lambda: lib.matmul(q8, w, 68, 2, 63, x, 1, y, 1),
        lambda: lib.matmul(q8, w, 68, 2, 64, ffi.NULL, 1, y, 1),
        lambda: lib.matmul(q8, w, 68, 2, 64, x, 0, y, 1),
        lambda: lib.matmul(q8, w, 68, 2, 64, x, 1, ffi.NULL, 1),
        lambda: lib.matmul(q8, w, 68, 2, 64, x, 1, y, 0),
        lambda: lib.matmul(q8, w, 2**62, 2, 64, x, 1, y, 1),
        lambda: lib.matmul_dequantize_rows(q8, w, 68, 2, 64, ids, 2, ffi.NULL),
        lambda: lib.matmul_dequantize_rows(q8, w, 68, 1, 64, ids, 2, out),
        lambda: lib.matmul_dequantize_rows(q8, w, 68, 2, 64, ids, -1, out),
    ]
    sentinel = ffi.new("kvc_table **")
    for call in bad:
        lib.kvc_new(0, 1, 0, lib.KVC_SWA_NONE, sentinel)   # leaves a message of its own
        before = message()
        assert call() == lib.KVC_EINVAL
        assert message() and message() != before
    n = ffi.new("int64_t *")
    assert lib.quant_row_bytes(lib.KVC_TYPE_Q6_K, 512, n) == lib.KVC_OK and n[0] == 420
    assert lib.quant_row_bytes(lib.KVC_TYPE_Q6_K, 0, n) == lib.KVC_EINVAL


def test_kvc_new_reports_why_its_parameters_are_bad():
    out = ffi.new("kvc_table **")
    assert lib.kvc_new(0, 1, 0, lib.KVC_SWA_NONE, out) == lib.KVC_EINVAL
    assert "n_cells" in message()
    assert lib.kvc_new(8, 1, 0, lib.KVC_SWA_STANDARD, out) == lib.KVC_EINVAL
    assert "n_swa" in message()


def test_block_entry_points_report_bad_arguments():
    """Straight through cffi, past native.py's checks: the C side refuses too."""
    b = ffi.new("kvc_block *", {"n_embd": 8, "n_head": 3, "n_head_kv": 2, "head_dim": 4,
                                "n_ff": 8})
    out = ffi.new("kvc_scratch **")
    assert lib.block_scratch_new(b, 4, out) == lib.KVC_EINVAL
    assert "bad sizes" in message()
    b.n_head = 2
    assert lib.block_scratch_new(b, 4, out) == lib.KVC_EINVAL
    assert "norm" in message()
    x = ffi.new("float[]", 8)
    b.attn_norm = b.ffn_norm = x
    assert lib.block_scratch_new(b, 4, out) == lib.KVC_EINVAL
    assert "matrix attn_q" in message()
    assert lib.block_run(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, x, 1, x, x, ffi.NULL, -1, 1) \
        == lib.KVC_EINVAL
    assert lib.block_output(x, 1e-6, ffi.NULL, 4, 8, 0.0, x, 1, x, ffi.NULL, 1) \
        == lib.KVC_EINVAL
    assert "missing" in message()


def test_kv_entry_points_report_bad_arguments():
    k = np.zeros((4, 64), np.float32)
    q = np.zeros((1, 2, 64), np.float32)
    f32, q8 = native.TYPES["F32"], native.TYPES["Q8_0"]
    cells, lo, hi = np.array([0, 9], np.int32), np.zeros(1, np.int32), np.ones(1, np.int32)
    with pytest.raises(ValueError, match="cell 9 outside"):
        native.kv_attend(f32, k, f32, k, 4, 1, 64, cells, lo, hi, q, 1.0, q.copy(), 1)
    with pytest.raises(ValueError, match="cannot hold"):
        q48 = np.zeros((1, 2, 48), np.float32)
        native.kv_attend(q8, k, f32, k, 4, 1, 48, cells[:1], lo, hi, q48, 1.0, q48.copy(), 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.quantize(q8, np.zeros((2, 40), np.float32), np.zeros(100, np.uint8))


def test_check_maps_each_status_to_its_exception():
    out = ffi.new("kvc_table **")
    with pytest.raises(ValueError, match="n_seq_max"):
        native.check(lib.kvc_new(8, 0, 0, lib.KVC_SWA_NONE, out))
    t = CellTable(2)
    with pytest.raises(CacheFullError, match="do not fit"):
        t.find_slot(3)
    with pytest.raises(StateError, match="cell table state: "):
        CellTable.from_bytes(b"\0" * 40)
    cases = {lib.KVC_EINVAL: ValueError, lib.KVC_EFULL: CacheFullError,
             lib.KVC_ESTATE: StateError, lib.KVC_ENOMEM: MemoryError,
             lib.KVC_EBROKEN: KVCellsError}
    for status, exc in cases.items():
        with pytest.raises(exc):
            native.check(status)
    native.check(lib.KVC_OK)


def test_one_integer_check():
    assert native.as_int(np.int64(5), "n", 0, 10) == 5
    for bad in (1.5, "2", None, True, 11, -1):
        with pytest.raises(ValueError, match="n"):
            native.as_int(bad, "n", 0, 10)
    assert native.as_int(2**40, "big", 0, None) == 2**40


def test_default_threads_are_the_usable_cores():
    # in a fresh process: other tests may have set it here
    code = "import kvcells; print(kvcells.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(os.sched_getaffinity(0))
    old = kvcells.get_num_threads()
    try:
        kvcells.set_num_threads(1)
        assert kvcells.get_num_threads() == 1
    finally:
        kvcells.set_num_threads(old)
    for bad in (0, -1, 1.5, "2", True, lib.KVC_MAX_THREADS + 1):
        with pytest.raises(ValueError):
            kvcells.set_num_threads(bad)
