"""Build small C++ kernels with g++ once per source and machine, and load them with ctypes.

No torch headers and no pybind: a kernel is a plain `extern "C"` function taking pointers,
so a build takes ~1-2 s and the result is cached under ~/.cache/llm-recipes.
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

# Vectorizable reductions without -ffast-math (which on gcc < 13 also sets flush-to-zero
# for the whole process when the library loads).
FLAGS = "-O3 -march=native -fno-math-errno -fno-trapping-math -fassociative-math -fno-signed-zeros -fopenmp -shared -fPIC"

# Shared by every kernel: element types as raw C types (bf16 is uint16_t), loaded as fp32 with
# to_f32 and written back with store (bf16 rounds to nearest even).
CONVERT = r"""
#include <cstdint>
#include <cstring>
static inline float to_f32(float x) { return x; }
static inline float to_f32(uint16_t x) { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline void store(float f, float* d) { *d = f; }
static inline void store(float f, uint16_t* d) {
  uint32_t u; std::memcpy(&u, &f, 4); *d = uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
"""


def _machine() -> str:
    """What -march=native depends on, so a shared cache never serves another CPU's binary."""
    try:
        return next(
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")
        )
    except (OSError, StopIteration):
        return platform.machine() + platform.processor()


@functools.cache
def load_cpp(name: str, source: str) -> ctypes.CDLL:
    """The shared library built from `source` (cached by a hash of source, flags and CPU)."""
    key = hashlib.sha256(f"{source}{FLAGS}{_machine()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-recipes"
    lib = cache / f"{name}_{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp, f"{name}.cpp"), Path(tmp, f"{name}.so")
            src.write_text(source)
            cmd = [os.environ.get("CXX", "g++"), *FLAGS.split(), str(src), "-o", str(out)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or e
                raise RecipeError(f"building the {name} kernel failed: {detail}") from e
            os.replace(out, lib)  # atomic: concurrent builds of the same key are harmless
    return ctypes.CDLL(str(lib))
