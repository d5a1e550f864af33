"""Every implementation of the dispatched CPU ops against plain torch math (the dispatch
table may pick any of them, so each must match the reference), and the rules that decide
where each may run."""

import pytest
import torch
from torch import nn

from common import ops
from common.ops.int8_linear import int8_linear, int8_matvec_cpp
from common.ops.library import loads
from common.ops.rms_norm import rms_norm, rms_norm_cpp


@pytest.fixture(autouse=True)
def _own_choices(tmp_path):
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset()


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


@pytest.mark.parametrize(
    "impl",
    ["cpp_matvec", "cpp_bf16dot", "cpp_bf16outer", "int8pack_mm", "dequant_mm", "cpp_dequant_mm"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 17, 35])  # the cpp kernels' row blocks and tails
@pytest.mark.parametrize("k", [256, 100, 37])  # 100, 37: a partial column step, an odd K
@pytest.mark.parametrize("group", [0, 32, 128])  # per channel; groups (100, 37: a partial one)
def test_every_int8_linear_implementation_matches_exact(impl, dtype, rows, k, group) -> None:
    chosen = int8_linear.impls[impl]
    scales = (torch.rand((88, -(-k // group)) if group else (88,)) / 50).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    w = torch.randint(-127, 128, (88, k), dtype=torch.int8)  # 88: a partial block of 16
    if not chosen.available("cpu", dtype) or not chosen.allows((x, w, scales, group)):
        pytest.skip(f"{impl} does not run {dtype} with K={k}, group_size {group} here")
    per_input = scales.double().repeat_interleave(group, 1)[:, :k] if group else scales[:, None]
    exact = x.double() @ (w.double() * per_input).t()
    out = chosen.fn(x, w, scales, group)
    assert out.shape == (rows, 88) and out.dtype == dtype
    # Same int8 values and scales; rounding and summation order differ (bf16: a few ulps of
    # the result). dequant_mm with groups rounds each weight times its scale to bf16 first: a
    # few ulps of each product, so the bound is on the sum of their sizes (cpp_dequant_mm too).
    size = exact.abs()
    if impl.endswith("dequant_mm") and group:
        size = x.double().abs() @ (w.double() * per_input).abs().t()
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    assert ((out.double() - exact).abs() <= tol * size + 1e-3).all()


def test_int8_linear_group_scales_are_checked() -> None:
    """Scales must fit the group size: [N, ceil(K / g)] for g a multiple of 32, else [N]."""
    x, w = torch.randn(2, 100), torch.zeros(8, 100, dtype=torch.int8)
    for scales, group in [(torch.ones(8, 4), 0), (torch.ones(8, 3), 32), (torch.ones(8, 5), 20)]:
        with pytest.raises(ValueError, match="int8_matvec_cpp needs scales"):
            int8_matvec_cpp(x, w, scales, group)
    assert int8_matvec_cpp(x, w, torch.ones(8, 4), 32).shape == (2, 8)


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


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 7, 64), (5, 40)])
def test_rms_norm_matches_transformers_formulation(impl: str, shape: tuple[int, ...]) -> None:
    fn = rms_norm.impls[impl].fn
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    # bf16: both round the normalized value, then the product, once each: bit-exact.
    xb, wb = x.bfloat16(), weight.bfloat16()
    assert torch.equal(fn(xb, wb, 1e-5), _hf_rms_norm(xb, wb, 1e-5))
    torch.testing.assert_close(fn(x, weight, 1e-5), _hf_rms_norm(x, weight, 1e-5))


def test_rms_norm_cpp_rejects_mixed_dtypes() -> None:
    with pytest.raises(ValueError, match="rms_norm_cpp"):
        rms_norm_cpp(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5)


def _eligible(op: ops.dispatch.Op, *args) -> set[str]:
    x = args[0]
    return {i.name for i in op.impls.values() if i.available("cpu", x.dtype) and i.allows(args)}


def test_rms_norm_rules() -> None:
    """The C++ kernel takes float32/bfloat16 with a weight of the same dtype; else torch."""
    for dtype in (torch.float32, torch.bfloat16):
        assert _eligible(
            rms_norm, torch.randn(2, 8, dtype=dtype), torch.ones(8, dtype=dtype), 0
        ) == {
            "cpp",
            "torch",
        }
    assert _eligible(rms_norm, torch.randn(2, 8).half(), torch.ones(8).half(), 0) == {"torch"}
    assert _eligible(rms_norm, torch.randn(2, 8).bfloat16(), torch.ones(8), 0) == {"torch"}


def test_int8_linear_rules() -> None:
    """int8pack_mm: bf16 activations and K % 16 == 0 only (fp32 is a scalar loop there, other
    K read garbage), per-channel scales; the C++ kernel: fp32/bf16; dequantize + GEMM:
    anything, and with group-wise scales on cpu its C++ dequantize too."""
    w64, w40 = torch.zeros(32, 64, dtype=torch.int8), torch.zeros(32, 40, dtype=torch.int8)
    s = torch.ones(32, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    bf16dot = {"cpp_bf16dot", "cpp_bf16outer"} if loads("int8_bf16dot") else set()  # AVX512-BF16
    assert (
        _eligible(int8_linear, x, w64, s) == {"cpp_matvec", "int8pack_mm", "dequant_mm"} | bf16dot
    )
    assert _eligible(int8_linear, x[:, :40], w40, s) == {"cpp_matvec", "dequant_mm"} | bf16dot
    assert _eligible(int8_linear, x.float(), w64, s.float()) == {"cpp_matvec", "dequant_mm"}
    assert _eligible(int8_linear, x.half(), w64, s.half()) == {"dequant_mm"}
    grouped = torch.ones(32, 2, dtype=torch.bfloat16)  # int8pack_mm: per channel only
    assert _eligible(int8_linear, x, w64, grouped, 32) == (
        _eligible(int8_linear, x, w64, s) - {"int8pack_mm"} | {"cpp_dequant_mm"}
    )


def test_modules_run_what_the_registry_chooses() -> None:
    """RMSNorm and Int8WeightOnlyLinear name no kernel: a pin decides, where its rule holds."""
    from common.nn.norm import RMSNorm
    from common.quant.int8 import Int8WeightOnlyLinear

    ops.pin("rms_norm=torch,int8_linear=int8pack_mm")
    norm = RMSNorm(64).bfloat16()
    norm(torch.randn(2, 64, dtype=torch.bfloat16))
    linear = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32).bfloat16())
    linear(torch.randn(3, 64, dtype=torch.bfloat16))
    linear(torch.randn(3, 64))  # fp32: int8pack_mm's rule fails, the ranking decides
    got = ops.chosen()
    assert got["rms_norm[cpu,bfloat16,rows=2,bytes<=256]"] == "torch (pinned)"
    assert got["int8_linear[cpu,bfloat16,rows=3-4,bytes<=4K]"] == "int8pack_mm (pinned)"
    assert got["int8_linear[cpu,float32,rows=3-4,bytes<=4K]"] in ("cpp_matvec", "dequant_mm")
