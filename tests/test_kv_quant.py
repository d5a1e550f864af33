"""int8 KV quantization: error bound and memory."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ops.kv_int8 import SCALE_DTYPE, dequantize_kv, quantize_kv


@settings(max_examples=40, deadline=None)
@given(
    magnitude=st.sampled_from([1e-5, 1e-2, 1.0, 30.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    d=st.sampled_from([1, 7, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_at_most_half_a_step(magnitude, dtype, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, d, generator=g) * magnitude).to(dtype)
    x[0, 0] = 0  # an all-zero vector
    x[1, 1, 0] = 50 * magnitude  # an outlier
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.dtype == SCALE_DTYPE and scale.shape == (3, 4, 1)
    assert int(q.abs().max()) <= 127
    err = (dequantize_kv(q, scale, torch.float32) - x.float()).abs()
    assert bool((err <= scale.float() / 2).all())
    assert dequantize_kv(q, scale, dtype).dtype == dtype


@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_kv_is_about_half_of_bf16(head_dim):
    x = torch.randn(16, 8, head_dim, dtype=torch.bfloat16)
    q, scale = quantize_kv(x)
    ratio = (q.nbytes + scale.nbytes) / x.nbytes
    assert ratio == pytest.approx(0.5 + 1 / head_dim)  # 0.516 at 64, 0.508 at 128
