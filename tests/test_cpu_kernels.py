"""The C++ CPU kernels against plain torch math, and where the model code dispatches to them."""

import pytest
import torch
from torch import nn

import common.nn.norm
import common.quant.int8
from common.nn.norm import RMSNorm
from common.ops.cpu_kernels import int8_matvec_cpp, rms_norm_cpp
from common.quant.int8 import Int8WeightOnlyLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("k", [256, 40])  # 40: not a multiple of the vector width
def test_int8_matvec_matches_exact_product(dtype: torch.dtype, rows: int, k: int) -> None:
    x = torch.randn(rows, k).to(dtype)
    w = torch.randint(-127, 128, (96, k), dtype=torch.int8)
    scales = (torch.rand(96) / 50).to(dtype)
    exact = (x.double() @ w.double().t()) * scales.double()
    out = int8_matvec_cpp(x, w, scales)
    assert out.shape == (rows, 96) and out.dtype == dtype
    # fp32: summation order only; bf16: one rounding of the fp32 result (2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert ((out.double() - exact).abs() <= tol * exact.abs() + 1e-5).all()


def test_int8_matvec_rejects_mismatched_inputs() -> None:
    w = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_matvec_cpp needs"):
        int8_matvec_cpp(torch.randn(1, 32), w, torch.ones(8))  # K mismatch
    with pytest.raises(ValueError, match="int8_matvec_cpp needs"):
        int8_matvec_cpp(torch.randn(1, 16), w, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="int8_matvec_cpp needs"):
        int8_matvec_cpp(torch.randn(1, 16), w.t().contiguous().t(), torch.ones(8))


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 7, 64), (5, 40)])
def test_rms_norm_matches_transformers_formulation(shape: tuple[int, ...]) -> None:
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    # bf16: both round the normalized value, then the product, once each: bit-exact.
    xb, wb = x.bfloat16(), weight.bfloat16()
    assert torch.equal(rms_norm_cpp(xb, wb, 1e-5), _hf_rms_norm(xb, wb, 1e-5))
    torch.testing.assert_close(rms_norm_cpp(x, weight, 1e-5), _hf_rms_norm(x, weight, 1e-5))


def test_rms_norm_module_uses_kernel_only_where_it_applies(monkeypatch) -> None:
    calls = []
    real = common.nn.norm.rms_norm_cpp
    monkeypatch.setattr(common.nn.norm, "rms_norm_cpp", lambda *a: calls.append(a) or real(*a))
    norm = RMSNorm(32, 1e-5)
    norm(torch.randn(2, 32))
    norm.bfloat16()(torch.randn(2, 32, dtype=torch.bfloat16))
    assert len(calls) == 2
    norm.half()(torch.randn(2, 32, dtype=torch.float16))  # no kernel: torch ops
    norm.float()(torch.randn(2, 32, dtype=torch.bfloat16))  # dtypes differ: torch ops
    assert len(calls) == 2


def test_int8_linear_dispatch(monkeypatch) -> None:
    """bf16 at 1-2 rows and fp32 up to 8 take the C++ kernel; more rows dequantize + GEMM."""
    calls = []
    real = common.quant.int8.int8_matvec_cpp
    monkeypatch.setattr(
        common.quant.int8, "int8_matvec_cpp", lambda *a: calls.append(a) or real(*a)
    )
    q = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32).bfloat16())
    for rows, dtype in [(1, torch.bfloat16), (2, torch.bfloat16), (8, torch.float32)]:
        q(torch.randn(rows, 64, dtype=dtype))
    assert [a[0].shape[0] for a in calls] == [1, 2, 8]
    q(torch.randn(3, 64, dtype=torch.bfloat16))  # int8pack_mm
    q(torch.randn(9, 64))  # dequantize + GEMM
    assert len(calls) == 3
