"""Paged attention kernels against dense eager attention on each sequence's own K/V.

One head layout (4 query heads over 2 KV heads, d=32, block 4) for every test, so the
compiled flex kernels are shared: two graphs (decode, prefill) per dtype.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from common.attention import paged as pa
from common.attention.backends import get_backend
from common.attention.meta import AttnMeta, PagedMeta
from common.device.select import Device
from common.ops.attention import dense_decode_cpp, dense_decode_sdpa
from common.ops.kv_int8 import dequantize_kv, quantize_kv

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 32, 4, 128
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
KERNELS = {
    "reference": pa.paged_attention_reference,
    "cpp": pa.paged_attention_cpp,
    "gather_sdpa": pa.paged_attention_gather_sdpa,
    "flex": pa.paged_attention_flex,
}


class Batch:
    """Sequences with random K/V scattered into shuffled, non-contiguous pool blocks; row b
    feeds new_tokens[b] tokens ending at its length, padded to a common Tq with positions
    that keep counting (as the engine pads)."""

    def __init__(self, lengths, new_tokens, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(HKV, n, D, generator=g).to(dtype) for n in lengths]
        self.v = [torch.randn(HKV, n, D, generator=g).to(dtype) for n in lengths]
        self.k_pool = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g).to(dtype)  # garbage
        self.v_pool = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g).to(dtype)
        free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
        width = max(-(-n // BS) for n in lengths)
        self.block_tables = torch.zeros(len(lengths), width, dtype=torch.int32)
        for b, n in enumerate(lengths):
            for j in range(-(-n // BS)):
                block = free.pop()
                self.block_tables[b, j] = block
                m = min(BS, n - j * BS)
                self.k_pool[block, :m] = self.k[b][:, j * BS : j * BS + m].transpose(0, 1)
                self.v_pool[block, :m] = self.v[b][:, j * BS : j * BS + m].transpose(0, 1)
        tq = max(new_tokens)
        self.seq_lens = torch.tensor(lengths)
        start = self.seq_lens - torch.tensor(new_tokens)
        self.q_pos = start[:, None] + torch.arange(tq)
        self.q = torch.randn(len(lengths), H, tq, D, generator=g).to(dtype)
        self.meta = (self.block_tables, self.q_pos, self.seq_lens)

    def dense(self) -> torch.Tensor:
        """softmax(q kᵀ/√d) v per row in float64, keys at positions <= the query's."""
        out = []
        for b, (k, v) in enumerate(zip(self.k, self.v)):
            k = k.double().repeat_interleave(H // HKV, 0)
            v = v.double().repeat_interleave(H // HKV, 0)
            scores = self.q[b].double() @ k.transpose(-1, -2) / D**0.5
            seen = torch.arange(k.shape[1]) <= self.q_pos[b][:, None]
            out.append(scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v)
        return torch.stack(out)


CASES = {
    "decode": ([5, 17, 1, 12, 33], [1, 1, 1, 1, 1]),
    "prefill": ([7, 20, 13], [7, 20, 13]),
    "prefix_cached_prefill": ([13, 24, 9], [5, 8, 1]),  # starts at block boundaries 8, 16, 8
    "mixed_chunked": ([30, 6, 19], [3, 6, 1]),
    "batch_of_one": ([21], [1]),
    "long_prefill": ([150, 40, 131], [150, 10, 131]),  # several query tiles of the flex mask
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_dense_attention(kernel, case, dtype):
    batch = Batch(*CASES[case], dtype)
    out = KERNELS[kernel](batch.q, batch.k_pool, batch.v_pool, *batch.meta)
    assert out.shape == batch.q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), batch.dense(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("new_tokens", [[1, 1, 1], [140, 6, 8]], ids=["decode", "prefill"])
def test_cpu_choice_matches_dense(new_tokens):
    batch = Batch([150, 6, 32], new_tokens, torch.bfloat16)
    out = pa.paged_attention_cpu(*_args(batch))
    tol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.double(), batch.dense(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["eager", "flash"])
def test_packed_row_equals_the_padded_batch(backend):
    """A packed forward's one row (two decodes, then two prompt chunks one after another,
    vLLM's varlen layout): each sequence's outputs are the dense ones of the padded batch."""
    new = [1, 1, 7, 12]
    batch = Batch([9, 17, 30, 12], new, torch.float32)
    q = torch.cat([batch.q[b, :, :n] for b, n in enumerate(new)], dim=1)[None]
    q_pos = torch.cat([batch.q_pos[b, :n] for b, n in enumerate(new)])[None]
    meta = AttnMeta(paged=PagedMeta(batch.block_tables, q_pos, batch.seq_lens, tuple(new)))
    out = get_backend(backend, Device("cpu"), paged=True)(q, batch.k_pool, batch.v_pool, meta)
    want = torch.cat([batch.dense()[b, :, :n] for b, n in enumerate(new)], dim=1)[None]
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 5, 20])
def test_cpp_decode_over_runs_of_kv_heads(rows):
    """Decode tasks of the C++ kernel read runs of adjacent KV heads, as long as the rows and
    threads allow (at 2 threads, runs of 1, 2 and 3 of the 3 heads: a run of 2 leaves a short
    last run)."""
    g = torch.Generator().manual_seed(rows)
    heads, kv_heads, blocks = 6, 3, 4 * rows
    k_pool, v_pool = (torch.randn(blocks, BS, kv_heads, D, generator=g) for _ in "kv")
    tables = torch.randperm(blocks, generator=g).view(rows, 4).int()
    lens = torch.randint(1, 4 * BS + 1, (rows,), generator=g)
    q = torch.randn(rows, heads, 1, D, generator=g)
    meta = (tables, (lens - 1)[:, None], lens)
    out = pa.paged_attention_cpp(q, k_pool, v_pool, *meta)
    want = pa.paged_attention_reference(q, k_pool, v_pool, *meta)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [32, 64, 128, 48])  # 48: no register path, the general loop
@pytest.mark.parametrize("rows", [3, 5, 20])
def test_cpp_bf16_decode_equals_its_fp32_math(rows, d):
    """bf16 decode widens K/V rows in registers (D of 32, 64 or 128) instead of the fp32
    copies the general loop makes: on the same bf16 values, the fp32 kernel's output to
    within bf16 rounding, over runs of heads and query heads sharing a KV head."""
    g = torch.Generator().manual_seed(rows + d)
    heads, kv_heads, blocks = 6, 3, 4 * rows
    k_pool, v_pool = (torch.randn(blocks, BS, kv_heads, d, generator=g).bfloat16() for _ in "kv")
    tables = torch.randperm(blocks, generator=g).view(rows, 4).int()
    lens = torch.randint(1, 4 * BS + 1, (rows,), generator=g)
    q = torch.randn(rows, heads, 1, d, generator=g).bfloat16()
    meta = (tables, (lens - 1)[:, None], lens)
    out = pa.paged_attention_cpp(q, k_pool, v_pool, *meta)
    want = pa.paged_attention_cpp(q.float(), k_pool.float(), v_pool.float(), *meta)
    torch.testing.assert_close(out, want.bfloat16())


@pytest.mark.parametrize("kernel", ["reference", "cpp", "gather_sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_pools(kernel, dtype):
    """int8 pools with float16 scales: equal to attention over the dequantized K/V."""
    batch = Batch([19, 6, 32], [1, 6, 8], dtype)
    kq, vq = quantize_kv(batch.k_pool), quantize_kv(batch.v_pool)
    out = KERNELS[kernel](batch.q, kq, vq, *batch.meta)
    batch.k = [
        dequantize_kv(*quantize_kv(k.transpose(0, 1)), dtype).transpose(0, 1) for k in batch.k
    ]
    batch.v = [
        dequantize_kv(*quantize_kv(v.transpose(0, 1)), dtype).transpose(0, 1) for v in batch.v
    ]
    torch.testing.assert_close(out.double(), batch.dense(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kernel", KERNELS)
def test_query_that_sees_nothing_returns_zeros(kernel):
    batch = Batch([5, 9], [1, 1], torch.float32)
    batch.seq_lens[0] = 0  # an idle row
    out = KERNELS[kernel](batch.q, batch.k_pool, batch.v_pool, *batch.meta)
    assert bool((out[0] == 0).all()) and bool(out[1].isfinite().all())


def test_flex_compiles_once_per_phase_under_continuous_batching():
    """Batch size, lengths and query lengths change every step; after one decode and one
    prefill graph, nothing recompiles."""
    steps = [([9, 3], [9, 3]), ([10, 4], [1, 1]), ([11, 5, 8], [1, 1, 8])]
    steps += [([40, 6, 9, 17], [1, 1, 1, 1]), ([2], [2]), ([50], [1]), ([41, 18, 7], [24, 1, 7])]
    pa.paged_attention_flex(*_args(Batch([5], [1], torch.float32)))  # warm: decode
    pa.paged_attention_flex(*_args(Batch([5], [5], torch.float32)))  # warm: prefill
    before = counters["stats"]["unique_graphs"]
    for lengths, new in steps:
        batch = Batch(lengths, new, torch.float32)
        out = pa.paged_attention_flex(*_args(batch))
        torch.testing.assert_close(out.double(), batch.dense(), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == before


def _args(batch: Batch) -> tuple:
    return (batch.q, batch.k_pool, batch.v_pool, *batch.meta)


def test_cpp_kernel_rejects_tables_that_would_read_outside_the_pool():
    batch = Batch([9, 3], [1, 1], torch.float32)
    with pytest.raises(ValueError, match="block"):
        pa.paged_attention_cpp(
            batch.q, batch.k_pool, batch.v_pool, batch.block_tables[:, :1], *batch.meta[1:]
        )
    batch.block_tables[1, 0] = NUM_BLOCKS
    with pytest.raises(ValueError, match="block"):
        pa.paged_attention_cpp(*_args(batch))


def test_flex_rejects_int8_and_non_consecutive_positions():
    batch = Batch([9, 3], [2, 2], torch.float32)
    with pytest.raises(ValueError, match="int8"):
        pa.paged_attention_flex(batch.q, quantize_kv(batch.k_pool), batch.v_pool, *batch.meta)
    batch.q_pos[0] = torch.tensor([8, 3])
    with pytest.raises(ValueError, match="consecutive"):
        pa.paged_attention_flex(batch.q, batch.k_pool, batch.v_pool, *batch.meta)


DENSE_DECODE = {"cpp": dense_decode_cpp, "sdpa": dense_decode_sdpa}  # decode_attention's choices


@pytest.mark.parametrize("impl", DENSE_DECODE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_decode_on_strided_cache_views(impl, dtype):
    """The kernel over dense caches: a [B, Hkv, S, D] slice of a longer preallocated cache
    (the contiguous cache's view) gives SDPA's result for one query per row."""
    g = torch.Generator().manual_seed(0)
    full_k = torch.randn(3, HKV, 40, D, generator=g).to(dtype)
    full_v = torch.randn(3, HKV, 40, D, generator=g).to(dtype)
    k, v = full_k[:, :, :27], full_v[:, :, :27]
    q = torch.randn(3, H, 1, D, generator=g).to(dtype)
    out = DENSE_DECODE[impl](q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), enable_gqa=True
    )
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("impl", DENSE_DECODE)
def test_dense_decode_per_row_prefix_lengths(impl):
    """Rows of a contiguous cache see different prefixes; a row that sees nothing gives 0."""
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(3, HKV, 20, D, generator=g) for _ in range(2))
    q = torch.randn(3, H, 1, D, generator=g)
    lens = torch.tensor([20, 7, 0])
    out = DENSE_DECODE[impl](q, k, v, lens)
    for b in (0, 1):
        n = int(lens[b])
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], enable_gqa=True
        )
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)
    assert bool((out[2] == 0).all())
