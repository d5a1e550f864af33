"""W4A8: the int4 x int8 kernel against the reference math, and the scheme on the tiny LLaMA."""

import pytest
import torch

from common import ops
from common.ops.library import loads, registered
from common.ops.w4a8_linear import pack, reference, unpack, w4a8_linear, w4a8_vnni
from common.ops.w8a8_linear import quantize_rows

needs_vnni = pytest.mark.skipif(not loads("int4_vnni"), reason="this CPU has no AVX512-VNNI")
ROWS = [1, 3, 8, 17]  # one row, a register-block tail, a full block, blocks and a tail
KS = [64, 80, 100, 576, 1000]  # chunks of 64 and tails; K % g == 0 and not, for each g
GROUPS = [32, 64, 128]


def _case(m: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[:, 3] *= 20  # an outlier channel: most of a row rounds to few levels
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    groups = -(-k // g)
    scales = (torch.rand(n, groups, generator=gen) / 50 + 1e-3).to(dtype)
    zeros = (torch.randn(n, groups, generator=gen) / 20).to(dtype)
    return x, q, scales, zeros


def _exact(x, q, scales, zeros, g):
    """The definition in float64: quantized rows times W = (q - 8) * s + z, scaled per row;
    and the sum of the terms' magnitudes, what float rounding is relative to."""
    xq, sx = quantize_rows(x)
    k = q.shape[1]
    s, z = (t.double().repeat_interleave(g, 1)[:, :k] for t in (scales, zeros))
    w = (q.double() - 8) * s + z
    scale = sx.double()[:, None]
    return (xq.double() @ w.t()) * scale, (xq.double().abs() @ w.abs().t()) * scale


@pytest.mark.parametrize("n", [16, 37])
def test_pack_roundtrip_and_layout(n):
    q = torch.randint(0, 16, (n, 100), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (n, 64) and packed.dtype == torch.uint8  # 2 chunks of 32 bytes
    assert torch.equal(unpack(packed, 100), q)
    assert torch.equal(packed[:, 1] & 15, q[:, 1]) and torch.equal(packed[:, 1] >> 4, q[:, 33])
    assert torch.equal(packed[:, 32 + 3] >> 4, q[:, 64 + 32 + 3])  # chunk 1
    assert torch.equal(packed[:, 32 + 4] >> 4, torch.full((n,), 8, dtype=torch.uint8))  # pad


@pytest.mark.parametrize("impl", ["reference", "vnni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_definition_to_float_rounding(impl, dtype):
    """Every rows count, chunk tail and group size. fp32: within a few fp32 roundings of the
    terms' magnitudes (the integer dots are exact; only the float sums round). bf16: the same
    before the output's rounding, so at most one bf16 step apart (2^-8 relative)."""
    if impl == "vnni" and not loads("int4_vnni"):
        pytest.skip("this CPU has no AVX512-VNNI")
    fn = {"reference": reference, "vnni": w4a8_vnni}[impl]
    for g in GROUPS:
        for k in KS:
            for m in ROWS:
                x, q, s, z = _case(m, k, 19, g, dtype)
                out = fn(x, pack(q), s, z, g)
                assert out.dtype == dtype and out.shape == (m, 19)
                exact, size = _exact(x, q, s, z, g)
                err = (out.double() - exact).abs()
                bound = size * 1e-6 + (exact.abs() * 2**-8 if dtype == torch.bfloat16 else 0)
                assert (err <= bound).all(), (impl, g, k, m, (err / size).max().item())


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_agrees_with_the_reference(dtype):
    """Same quantized rows and integer dots: the two differ only in the order of float sums."""
    for g in GROUPS:
        for k in (100, 576):
            for m in ROWS:
                x, q, s, z = _case(m, k, 37, g, dtype, seed=1)
                a, b = w4a8_vnni(x, pack(q), s, z, g), reference(x, pack(q), s, z, g)
                if dtype == torch.float32:
                    _, size = _exact(x, q, s, z, g)
                    assert ((a - b).double().abs() <= size * 1e-6).all(), (g, k, m)
                else:  # at most one bf16 rounding step apart
                    assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7).all()


@needs_vnni
def test_vnni_integer_dot_is_exact():
    """With s = 1 and z = 8 (W = q) and integer x whose row max is 127 (sx = 1, xq = x), the
    output is the integer product itself, over every group size and chunk tail."""
    for k in (64, 100, 4096):
        for m in (1, 5, 9):
            for g in GROUPS:
                q = torch.randint(0, 16, (23, k), dtype=torch.uint8)
                x = torch.randint(-127, 128, (m, k)).float()
                x[:, 0] = 127
                groups = -(-k // g)
                out = w4a8_vnni(
                    x, pack(q), torch.ones(23, groups), torch.full((23, groups), 8.0), g
                )
                assert torch.equal(out, (x.double() @ q.double().t()).float()), (k, m, g)


@pytest.mark.parametrize("impl", ["reference", "vnni"])
def test_bad_shapes_are_a_clear_error(impl):
    if impl == "vnni" and not loads("int4_vnni"):
        pytest.skip("this CPU has no AVX512-VNNI")
    fn = {"reference": reference, "vnni": w4a8_vnni}[impl]
    x, q, s, z = _case(2, 100, 8, 32, torch.float32)
    w = pack(q)
    bad = [
        (x, w, s, z, 48),  # a group size the layout cannot take
        (x, w[:, :32].contiguous(), s, z, 32),  # weight columns for K = 64
        (x, w, s[:, :3].contiguous(), z, 32),  # scales for K = 96
        (x, w, s, z.bfloat16(), 32),  # zeros in another dtype than x
        (x, w.to(torch.int8), s, z, 32),  # not the packed uint8
    ]
    for args in bad:
        with pytest.raises(ValueError, match=r"w4a8_\w+ needs x \[M, K\]"):
            fn(*args)


@needs_vnni
def test_vnni_op_registration():
    for m, k, g, dtype in [(3, 100, 32, torch.bfloat16), (1, 128, 128, torch.float32)]:
        x, q, s, z = _case(m, k, 8, g, dtype)
        torch.library.opcheck(registered(w4a8_vnni), (x, pack(q), s, z, g))


@pytest.fixture
def own_choices(tmp_path):
    """Kernel choices and pins of this test only (in a temp file, never the user's cache)."""
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset(tmp_path / "after.json")


@needs_vnni
def test_dispatch_runs_a_measured_or_pinned_choice(own_choices):
    x, q, s, z = _case(4, 128, 32, 64, torch.bfloat16)
    args = (x, pack(q), s, z, 64)
    want = {"reference": reference(*args), "vnni": w4a8_vnni(*args)}
    out = w4a8_linear(*args)
    (label,) = [k for k in ops.chosen() if k.startswith("w4a8_linear[cpu,bfloat16,rows=3-4")]
    assert torch.equal(out, want[ops.chosen()[label]])
    other = "vnni" if ops.chosen()[label] == "reference" else "reference"
    ops.pin({"w4a8_linear": other})
    assert torch.equal(w4a8_linear(*args), want[other])
    assert f"{other} (pinned)" in ops.chosen()[label]
