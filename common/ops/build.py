"""Build the small C++ sources next to this file with g++ once per source, machine and torch
version, cached under ~/.cache/llm-recipes (XDG_CACHE_HOME).

Two kinds: kernels that register torch ops (they include torch_op.h, are compiled against
torch's headers and libraries, ~6 s, and are loaded by common/ops/library.py), and plain
`extern "C"` functions taking pointers (no torch, ~1 s), loaded here with ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from common.core.errors import RecipeError

SOURCES = Path(__file__).resolve().parent  # NAME.cpp and the headers they share
HEADERS = ("weight_rows.h", "convert.h", "dpbf16.h", "torch_op.h", "quant_rows.h")

# Vectorizable reductions without -ffast-math (which on gcc < 13 also sets flush-to-zero
# for the whole process when the library loads).
FLAGS = "-O3 -march=native -fno-math-errno -fno-trapping-math -fassociative-math -fno-signed-zeros -fopenmp -shared -fPIC"


def cache_dir() -> Path:
    """Where built kernels and the measured kernel choices live."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-recipes"


@functools.cache
def machine() -> str:
    """What -march=native depends on, so a shared cache never serves another CPU's binary."""
    try:
        return next(
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")
        )
    except (OSError, StopIteration):
        return platform.machine() + platform.processor()


def _torch_flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags for the running torch (headers, ABI, libc10, libtorch_cpu)."""
    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    compile_flags = [
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    return compile_flags, [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


@functools.cache
def build(name: str) -> Path:
    """The shared library built from NAME.cpp (cached by a hash of the source, the headers,
    the flags, the CPU and, for torch ops, the torch version); RecipeError if g++ fails."""
    source = SOURCES / f"{name}.cpp"
    code = source.read_text()
    text = code + "".join((SOURCES / f).read_text() for f in HEADERS)
    torch_ops = '#include "torch_op.h"' in code  # a source that registers torch ops
    compile_flags, link_flags = _torch_flags() if torch_ops else ([], [])
    flags = [*FLAGS.split(), *compile_flags, f"-I{SOURCES}", str(source), *link_flags]
    key = hashlib.sha256(f"{text}{flags}{machine()}{torch.__version__}".encode()).hexdigest()[:16]
    cache = cache_dir()
    lib = cache / f"{name}_{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp, f"{name}.so")
            cmd = [os.environ.get("CXX", "g++"), *flags, "-o", str(out)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or e
                raise RecipeError(f"building the {name} kernel failed: {detail}") from e
            os.replace(out, lib)  # atomic: concurrent builds of the same key are harmless
    return lib


def load_cpp(name: str) -> ctypes.CDLL:
    """The plain C functions of NAME.cpp (a source that defines no torch ops)."""
    return ctypes.CDLL(str(build(name)))


@functools.cache
def builds(name: str) -> bool:
    """Whether NAME.cpp builds here (g++ with OpenMP, the CPU features the source needs)."""
    try:
        build(name)
    except RecipeError:
        return False
    return True
