"""cffi builder for kvcells._core: every csrc/*.c, declarations read from csrc/*.h.

Each header marks the part cffi should see with `// cffi-begin` and
`// cffi-end`, so the C API is written once.

KVCELLS_SANITIZE=1 builds with AddressSanitizer and UBSan; any report aborts.
KVCELLS_SANITIZE=thread builds with ThreadSanitizer (tools/tsan_tests.sh).
KVCELLS_SIMD_EMULATED=1 builds every x86 kernel path on SIMDe's portable
intrinsics (Debian's libsimde-dev), so tests run the AVX-512 and VNNI
kernels on CPUs without them (tools/emulated_tests.sh).
"""
import os
import pathlib

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
SANITIZE = {"1": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=all"],
            "thread": ["-fsanitize=thread"]}


def declarations(header):
    text = header.read_text()
    if "// cffi-begin" not in text:
        return ""
    return text.split("// cffi-begin", 1)[1].split("// cffi-end", 1)[0]


def make_builder(absolute_paths=False):
    # status.h first: the others use its kvc_status
    headers = sorted((h for h in CSRC.glob("*.h") if declarations(h)),
                     key=lambda h: (h.name != "status.h", h.name))
    sources = sorted(CSRC.glob("*.c"))
    ffi = FFI()
    ffi.cdef("\n".join(declarations(h) for h in headers))
    cflags = ["-std=c11", "-O3", "-pthread", "-Wall", "-Wextra",
              "-Wno-unused-parameter"]
    lflags = ["-pthread"]
    sanitize = SANITIZE.get(os.environ.get("KVCELLS_SANITIZE"))
    if sanitize:
        # -g1: the line tables the reports print; full -g made the build 1.5x longer
        cflags = [f for f in cflags if f != "-O3"] + ["-O1", "-g1"] + sanitize
        lflags += sanitize
    if os.environ.get("KVCELLS_SIMD_EMULATED") == "1":
        cflags += ["-DKVC_SIMD_EMULATED", "-Wno-psabi"]
    ffi.set_source(
        "kvcells._core",
        "\n".join(f'#include "{h.name}"' for h in headers),
        sources=[str(s) if absolute_paths else os.path.relpath(s) for s in sources],
        include_dirs=[str(CSRC)],
        extra_compile_args=cflags,
        extra_link_args=lflags,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # python _ffi_build.py OUTDIR: compile kvcells/_core into OUTDIR
    import sys
    make_builder(absolute_paths=True).compile(tmpdir=sys.argv[1])
