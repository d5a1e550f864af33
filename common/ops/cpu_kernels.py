"""Small C++ kernels for CPU decode, where a step is ~85 tiny calls and per-call cost counts.

int8_matvec_cpp: int8 weight-only matrix-vector product, y = (x @ w_int8ᵀ) * scales.
Decode reads every weight once per token, so it runs at the speed weights stream from DRAM
(the model is larger than L3). There this loop, one output channel at a time so each thread
reads one sequential stream, is much faster than torch._weight_int8pack_mm on the 2-core CI CPU
(results/llama65b/cpu/int8_kernels.md), and it also runs fp32 activations, where int8pack_mm has
only a scalar loop.

rms_norm_cpp: RMSNorm in one pass, ~4 us per call where the same math as torch ops
(cast, square, mean, rsqrt, two products) takes ~18 us at decode sizes.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.ops.build import CONVERT, load_cpp

_CPP = (
    CONVERT
    + r"""
#include <cmath>
#include <vector>
namespace {
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], accumulated in fp32. Threads split the output
// channels in contiguous ranges, so each reads one sequential stream of weights (the hardware
// prefetcher's best case); a weight row is read from memory once for all m.
template <class T>
void matvec(const T* x, const int8_t* w, const T* scale, T* y, int64_t M, int64_t N, int64_t K,
            int nthreads) {
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f32(x[i]);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wn = w + n * K;
    const float s = to_f32(scale[n]);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf.data() + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * float(wn[k]);
      store(acc * s, y + m * N + n);
    }
  }
}
// The transformers formulation: fp32 statistics, normalize, round to T, then multiply by the
// weight in T (one more rounding), so outputs match it bit for bit up to the summation order.
template <class T>
void rms_norm(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += to_f32(xr[i]) * to_f32(xr[i]);
    const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      T h;
      store(to_f32(xr[i]) * inv, &h);
      store(to_f32(w[i]) * to_f32(h), y + r * dim + i);
    }
  }
}
}  // namespace

extern "C" void rms_norm_f32(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                             float eps, int nt) {
  rms_norm((const float*)x, (const float*)w, (float*)y, rows, dim, eps, nt);
}
extern "C" void rms_norm_bf16(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                              float eps, int nt) {
  rms_norm((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, rows, dim, eps, nt);
}

extern "C" void matvec_f32(const void* x, const int8_t* w, const void* s, void* y, int64_t M,
                           int64_t N, int64_t K, int nt) {
  matvec((const float*)x, w, (const float*)s, (float*)y, M, N, K, nt);
}
extern "C" void matvec_bf16(const void* x, const int8_t* w, const void* s, void* y, int64_t M,
                            int64_t N, int64_t K, int nt) {
  matvec((const uint16_t*)x, w, (const uint16_t*)s, (uint16_t*)y, M, N, K, nt);
}
"""
)

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(_SUFFIX)
_ARGTYPES = {
    "matvec": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int],
    "rms_norm": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int],
}


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether the kernels build here (g++ with OpenMP); callers fall back to torch ops."""
    try:
        load_cpp("cpu_kernels", _CPP)
    except RecipeError:
        return False
    return True


@functools.cache
def _kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    fn = getattr(load_cpp("cpu_kernels", _CPP), f"{name}_{_SUFFIX[dtype]}")
    fn.argtypes = _ARGTYPES[name]
    return fn


def rms_norm_cpp(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) over the last dim, for float32/bfloat16 x and weight on cpu."""
    if (
        x.dtype not in _SUFFIX
        or not x.is_cpu
        or weight.dtype != x.dtype
        or weight.shape != x.shape[-1:]
    ):
        raise ValueError(f"rms_norm_cpp: x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _kernel("rms_norm", x.dtype)(
        x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x.numel() // max(dim, 1),
        dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y


def int8_matvec_cpp(x2d: Tensor, weight_int8: Tensor, scales: Tensor) -> Tensor:
    """x2d [M, K] float32/bfloat16 on cpu, weight_int8 [N, K] contiguous, scales [N] in x's
    dtype -> [M, N] in x's dtype. Checks are kept few: this runs ~85 times per decode step."""
    (m, k), (n, k_w) = x2d.shape, weight_int8.shape
    if (
        x2d.dtype not in _SUFFIX
        or not x2d.is_cpu
        or k != k_w
        or weight_int8.dtype != torch.int8
        or not weight_int8.is_contiguous()
        or scales.dtype != x2d.dtype
        or scales.shape != (n,)
    ):
        raise ValueError(
            f"int8_matvec_cpp needs x [M, K] float32/bfloat16 on cpu, contiguous int8 [N, K] "
            f"and scales [N] in x's dtype; got x {tuple(x2d.shape)} {x2d.dtype}, weight "
            f"{tuple(weight_int8.shape)} {weight_int8.dtype}, scales {scales.dtype}"
        )
    x2d = x2d.contiguous()
    y = torch.empty(m, n, dtype=x2d.dtype)
    _kernel("matvec", x2d.dtype)(
        x2d.data_ptr(), weight_int8.data_ptr(), scales.contiguous().data_ptr(), y.data_ptr(),
        m, n, k, torch.get_num_threads(),
    )  # fmt: skip
    return y
