"""Build the small C++ kernels next to this file with g++ once per source and machine, and load
them with ctypes.

No torch headers and no pybind: a kernel is a plain `extern "C"` function taking pointers,
so a build takes ~1-2 s and the result is cached under ~/.cache/llm-recipes (XDG_CACHE_HOME).
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

from common.core.errors import RecipeError

SOURCES = Path(__file__).resolve().parent  # NAME.cpp and the headers they share
HEADERS = ("weight_rows.h", "convert.h", "dpbf16.h")

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


@functools.cache
def load_cpp(name: str) -> ctypes.CDLL:
    """The shared library built from NAME.cpp (cached by a hash of the source, the headers,
    the flags and the CPU)."""
    source = SOURCES / f"{name}.cpp"
    text = "".join((SOURCES / f).read_text() for f in (source.name, *HEADERS))
    key = hashlib.sha256(f"{text}{FLAGS}{machine()}".encode()).hexdigest()[:16]
    cache = cache_dir()
    lib = cache / f"{name}_{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp, f"{name}.so")
            cmd = [os.environ.get("CXX", "g++"), *FLAGS.split(), f"-I{SOURCES}", str(source)]
            try:
                subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or e
                raise RecipeError(f"building the {name} kernel failed: {detail}") from e
            os.replace(out, lib)  # atomic: concurrent builds of the same key are harmless
    return ctypes.CDLL(str(lib))


@functools.cache
def builds(name: str) -> bool:
    """Whether NAME.cpp builds here (g++ with OpenMP); without it the torch implementations run."""
    try:
        load_cpp(name)
    except RecipeError:
        return False
    return True
