"""int8 x int8 linear with dynamic per-row (per-token) int8 activations, five ways:

    y = (q @ w_int8ᵀ) * (x_scale ⊗ w_scale),  q, x_scale = quantize_rows(x * smooth)

- vnni: int8_vnni.cpp, AVX512-VNNI vpdpbusd with int32 accumulation, activation quantization
  in the same call; one sequential weight stream per thread, each row loaded once for up to 8
  rows. Built only where the CPU has VNNI (elsewhere g++ refuses it and the table skips it).
- int_mm: quantize_rows in torch + torch._int_mm (int32 accumulation; oneDNN on cpu).
- int_mm_cpp: the same GEMM with the C++ quantization and scaling around it, one call
  (int8_vnni.cpp): the torch ops around _int_mm cost as much as the GEMM in an eager prefill.
- onednn: int_mm_cpp with oneDNN's int8 GEMM on the weight packed once into its blocked
  layout (torch.ops.onednn.qlinear_prepack, what inductor's x86 int8 path uses) instead of
  _int_mm, which reorders the weight on every call: 16 rows of a small LLaMA's linears, the
  GEMMs alone, 8.4 against 12.7 ms here (scratch). The packing is a second copy of the
  weight's bytes, kept as long as the weight lives (it shows in peak memory, not in the
  weights column).
- dequant_mm: the same integers multiplied in fp32 (exact while partial sums stay below 2^24,
  i.e. any K up to ~1000 at full range): the portable fallback every device runs.
- npu: torch_npu.npu_dynamic_quant + npu_quant_matmul (unverified: no NPU in CI).
smooth ([K] or None) multiplies x before quantization: SmoothQuant's 1/s for a linear whose
input no norm produces (common/quant/w8a8.py). Every implementation quantizes the same way,
so all but dequant_mm agree exactly in int32; the dispatch table measures which is fastest.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op
from common.ops.working_set import weight_copies

_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels take
_MIN_AMAX = 1e-8  # an all-zero row quantizes to zeros (the C++ kernel uses the same floor)


def quantize_rows(x2d: Tensor, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (q int8 [M, K], scale fp32 [M]) with x * smooth ≈ q * scale per row:
    symmetric, round half to even, in the float ops and order the C++ kernel uses."""
    xs = x2d.float()
    if smooth is not None:
        xs = xs * smooth.float()
    amax = xs.abs().amax(dim=1).clamp(min=_MIN_AMAX)
    full = torch.full_like(amax, 127.0)  # tensor / tensor: torch turns `127 / t` and `t / 127`
    q = (xs * (full / amax)[:, None]).round().to(torch.int8)  # into products with reciprocals
    return q, amax / full


def _scale(acc: Tensor, x_scale: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (acc.float() * (x_scale[:, None] * w_scale.float())).to(dtype)


def _out(x2d: Tensor, weight_int8: Tensor, scales: Tensor, smooth: Tensor | None) -> Tensor:
    (m, k), (n, k_w) = x2d.shape, weight_int8.shape
    if (
        k != k_w
        or weight_int8.dtype != torch.int8
        or scales.shape != (n,)
        or (smooth is not None and smooth.shape != (k,))
    ):
        raise ValueError(
            f"w8a8_linear needs x [M, K], int8 [N, K], scales [N], smooth [K] or None; got x "
            f"{tuple(x2d.shape)}, weight {tuple(weight_int8.shape)} {weight_int8.dtype}, "
            f"scales {tuple(scales.shape)}, smooth {None if smooth is None else tuple(smooth.shape)}"
        )
    return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)


# x [M, K] f32/bf16 on cpu, contiguous int8 [N, K], scales [N] and smooth [K] (or None) in x's
# dtype -> [M, N] in x's dtype (int8_vnni.cpp).
w8a8_vnni = kernel_op("int8_vnni", "w8a8_vnni", _out)


def _s8s8_out(q: Tensor, weight_int8: Tensor) -> Tensor:
    return torch.empty(q.shape[0], weight_int8.shape[0], dtype=torch.int32, device=q.device)


# int_mm with its quantization and scaling in C++: the same arguments and result.
int_mm_cpp = kernel_op("int8_vnni", "w8a8_int_mm", _out)


# The VNNI kernel's integer product alone: int8 [M, K] @ int8 [N, K]ᵀ -> int32 [M, N].
s8s8_vnni = kernel_op("int8_vnni", "s8s8_vnni", _s8s8_out)


def int_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, smooth: Tensor | None) -> Tensor:
    q, x_scale = quantize_rows(x2d, smooth)
    return _scale(torch._int_mm(q, weight_int8.t()), x_scale, scales, x2d.dtype)


# id(weight) -> (the weight, (its packing, unit scales, zero points))
_PACKED: dict[int, tuple[weakref.ref, tuple[Tensor, Tensor, Tensor]]] = {}


def _onednn_weight(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w int8 [N, K] in oneDNN's layout, with unit scales and zero points [N] for it; packed on
    first use and dropped with w. A buffer refilled in place with other weights (offload's,
    marked `refilled_in_place`; a read into it need not bump its version) is packed per call."""
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    key, n = id(w), w.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    entry = (packed, torch.ones(n), torch.zeros(n, dtype=torch.long))
    if not getattr(w, "refilled_in_place", False):
        _PACKED[key] = (weakref.ref(w, lambda _: _PACKED.pop(key, None)), entry)
    return entry


# int_mm_cpp's quantization and scaling around oneDNN's GEMM on the packed weight (int8_vnni.cpp).
_w8a8_onednn = kernel_op(
    "int8_vnni", "w8a8_onednn", lambda x2d, p, ones, zeros, w, s, smooth: _out(x2d, w, s, smooth)
)


@torch.library.custom_op("llm_recipes::w8a8_onednn_packed", mutates_args=())
def onednn_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, smooth: Tensor | None) -> Tensor:
    """w8a8_onednn on weight_int8's packing: an opaque op, so a compiled graph calls it
    without tracing the packing cache."""
    return _w8a8_onednn(x2d, *_onednn_weight(weight_int8), weight_int8, scales, smooth)


onednn_mm.register_fake(_out)


# oneDNN's quantized linear ships with torch's CPU builds that have mkldnn.
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def dequant_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, smooth: Tensor | None) -> Tensor:
    q, x_scale = quantize_rows(x2d, smooth)
    return _scale(F.linear(q.float(), weight_int8.float()), x_scale, scales, x2d.dtype)


def npu_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, smooth: Tensor | None) -> Tensor:
    import torch_npu  # unverified: no NPU in CI

    q, x_scale = torch_npu.npu_dynamic_quant(x2d, smooth_scales=smooth)
    return torch_npu.npu_quant_matmul(
        q, weight_int8.t(), scales, pertoken_scale=x_scale, output_dtype=x2d.dtype
    )


def _int_mm_fits(x2d: Tensor, w: Tensor, s: Tensor, smooth: Tensor | None) -> bool:
    # cuda's _int_mm needs more than 16 rows and dimensions in multiples of 8 (unverified).
    return x2d.is_cpu or (x2d.shape[0] > 16 and w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0)


w8a8_linear = Op(
    "w8a8_linear",
    [
        Impl("vnni", w8a8_vnni, devices=("cpu",), dtypes=_DTYPES, cpp="int8_vnni"),
        Impl("int_mm", int_mm, devices=("cpu", "cuda"), when=_int_mm_fits),
        Impl("int_mm_cpp", int_mm_cpp, devices=("cpu",), dtypes=_DTYPES, cpp="int8_vnni"),
        *(
            [Impl("onednn", onednn_mm, devices=("cpu",), dtypes=_DTYPES, cpp="int8_vnni")]
            if _HAS_ONEDNN
            else []
        ),
        Impl("npu", npu_mm, devices=("npu",), dtypes=(torch.float16, torch.bfloat16)),
        Impl("dequant_mm", dequant_mm),
    ],
    rows=lambda x2d, w, s, smooth: x2d.shape[0],
    size=lambda x2d, w, s, smooth: w.numel(),  # int8 weight bytes
    bench_args=weight_copies,
)
