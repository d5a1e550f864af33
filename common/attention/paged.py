"""Attention that reads K/V through block tables (paged KV), checked against dense eager math.

Layout (vLLM's): k_pool, v_pool [num_blocks, block_size, Hkv, D], so one token's K for all
heads is one contiguous row and a step's writes are a single scatter by slot
(block * block_size + offset); int8 pools are (data int8 [..., D], scale float16 [..., 1])
pairs from common/kv_quant.py. block_tables int32 [B, max_blocks] (entries past a row's
length are never read); q [B, H, Tq, D]; q_pos int64 [B, Tq]; seq_lens [B] = cached tokens
per row, new ones included (already written). A query at position p sees its row's cached
positions <= p; a query that sees nothing returns zeros. GQA when H is a multiple of Hkv.

Kernels (time per call relative to torch SDPA on a contiguous cache, measured on the 2-core
CI CPU at 12 heads x 64, bf16, block 16, context 128-1024, batch 1 and 8):
- paged_attention_reference: gathers the blocks into dense tensors, eager fp32 softmax.
- paged_attention_cpp: a small C++ kernel (built once with g++, no torch headers, 1.5 s)
  walking each row's blocks in place with an online softmax; reads int8 pools directly.
  Decode 0.4-0.7x (int8: 0.4-1.05x); prefill 1.5-2.4x.
- paged_attention_gather_sdpa: copies this step's rows, then SDPA. Prefill 1.2-1.7x;
  decode 2-3x (the copy costs more than the attention).
- paged_attention_cpu: the CPU choice: cpp up to 128 queries per row, gather + SDPA above.
- paged_attention_flex: compiled FlexAttention, block mask over the physical blocks. Two
  graphs (decode, prefill) per dtype, pool size and head layout. On CPU 2-11x (decode) and
  2.6-8x (prefill): inductor's generic CPU template has a fixed cost per call, allocates
  pool-sized buffers and, for bf16 prefill, repacks the whole pool. Meant for GPUs
  (untested here: no GPU in CI).
- paged_attention_npu: torch_npu fused infer attention with block_table (unverified).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from common.kv.quant import SCALE_DTYPE, dequantize_kv
from common.ops.build import CONVERT, load_cpp

Pool = Tensor | tuple[Tensor, Tensor]  # [N, bs, Hkv, D] float, or (int8 data, float16 scale)


def _split(pool: Pool) -> tuple[Tensor, Tensor | None]:
    return (pool[0], pool[1]) if isinstance(pool, tuple) else (pool, None)


def _check(q: Tensor, k_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor) -> None:
    data, _ = _split(k_pool)
    b, h, tq, d = q.shape
    if data.dim() != 4 or data.shape[-1] != d or h % data.shape[2]:
        raise ValueError(f"pool {tuple(data.shape)} does not fit q {tuple(q.shape)}")
    if block_tables.shape[0] != b or q_pos.shape != (b, tq) or seq_lens.shape != (b,):
        raise ValueError(
            "block_tables [B, max_blocks], q_pos [B, Tq] and seq_lens [B] must match q"
        )


# -- reference ------------------------------------------------------------------------------


def _dense(pool: Pool, block_tables: Tensor, dtype: torch.dtype) -> Tensor:
    """Each row's blocks in table order: [B, Hkv, max_blocks * block_size, D]."""
    data, scale = _split(pool)
    idx = block_tables.long()
    x = data[idx] if scale is None else dequantize_kv(data[idx], scale[idx], dtype)
    return x.flatten(1, 2).transpose(1, 2)


def paged_attention_reference(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """Gather + softmax(q kᵀ / √d) v in fp32 with the position mask. Copies every row's K/V."""
    _check(q, k_pool, block_tables, q_pos, seq_lens)
    k, v = _dense(k_pool, block_tables, q.dtype), _dense(v_pool, block_tables, q.dtype)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    key_pos = torch.arange(k.shape[2], device=q.device)
    seen = (key_pos <= q_pos[..., None]) & (key_pos < seq_lens[:, None, None])
    probs = scores.masked_fill(~seen[:, None], float("-inf")).softmax(dim=-1)
    return (probs.nan_to_num(0.0) @ v).to(q.dtype)  # nan: a query that sees no key


def paged_attention_gather_sdpa(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """Gather this step's rows into dense K/V, then torch SDPA with the position mask. The
    copy is small next to prefill's compute, so this is the fast prefill path on CPU."""
    _check(q, k_pool, block_tables, q_pos, seq_lens)
    k, v = _dense(k_pool, block_tables, q.dtype), _dense(v_pool, block_tables, q.dtype)
    key_pos = torch.arange(k.shape[2], device=q.device)
    seen = (key_pos <= q_pos[..., None]) & (key_pos < seq_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=seen[:, None], enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.masked_fill(~seen.any(-1)[:, None, :, None], 0.0)  # a query that sees no key


# -- C++ kernel -----------------------------------------------------------------------------

_CPP = (
    CONVERT
    + r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

static inline float to_f32(int8_t x) { return float(x); }  // beside the shared overloads

namespace {
float f16_to_f32(uint16_t h) {  // kv scales; never negative, inf or nan
  const int e = (h >> 10) & 31, m = h & 1023;
  return e ? std::ldexp(float(m | 1024), e - 25) : std::ldexp(float(m), -24);
}
constexpr int64_t QTILE = 16;  // queries of one row handled together (prefill)

// One task = (row, kv head, tile of queries): every query head of the group and every query
// of the tile share each K/V block load. Online softmax in fp32; invisible keys are skipped.
// K/V element (block, token, head, d) is at block * st[0] + token * st[1] + head * st[2] + d,
// its scale at block * st[3] + token * st[4] + head * st[5]: pools and dense caches alike.
template <class T, class KV>
void attend(const T* q, const KV* kp, const KV* vp, const uint16_t* ks, const uint16_t* vs,
            const int32_t* bt, const int64_t* qpos, const int64_t* slen, T* out, int64_t B,
            int64_t H, int64_t Hkv, int64_t Tq, int64_t D, int64_t bs, int64_t mb,
            const int64_t* st, int nthreads) {
  const int64_t rep = H / Hkv, tiles = (Tq + QTILE - 1) / QTILE;
  const float scale = 1.f / std::sqrt(float(D));
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> kf(bs * D), vf(bs * D), qf(rep * QTILE * D), acc(rep * QTILE * D),
        mx(rep * QTILE), sum(rep * QTILE), s(bs);
    std::vector<int64_t> lim(rep * QTILE);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < B * Hkv * tiles; ++task) {
      const int64_t b = task / (Hkv * tiles), g = task / tiles % Hkv, t0 = task % tiles * QTILE;
      const int64_t nt = std::min(QTILE, Tq - t0), nq = rep * nt;
      int64_t last = -1;
      for (int64_t j = 0; j < nq; ++j) {
        const int64_t h = g * rep + j / nt, t = t0 + j % nt;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_f32(q[((b * H + h) * Tq + t) * D + d]) * scale;
        lim[j] = std::min(qpos[b * Tq + t], slen[b] - 1);  // last visible key position
        last = std::max(last, lim[j]);
        mx[j] = -std::numeric_limits<float>::infinity(), sum[j] = 0.f;
        std::fill(&acc[j * D], &acc[(j + 1) * D], 0.f);
      }
      for (int64_t blk = 0; blk * bs <= last; ++blk) {
        const int64_t n = std::min(bs, last + 1 - blk * bs);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t blk_id = bt[b * mb + blk], row = blk_id * st[0] + i * st[1] + g * st[2];
          const int64_t srow = blk_id * st[3] + i * st[4] + g * st[5];
          const float kscale = ks ? f16_to_f32(ks[srow]) : 1.f, vscale = vs ? f16_to_f32(vs[srow]) : 1.f;
          for (int64_t d = 0; d < D; ++d) {
            kf[i * D + d] = to_f32(kp[row + d]) * kscale;
            vf[i * D + d] = to_f32(vp[row + d]) * vscale;
          }
        }
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t nv = std::min(n, lim[j] - blk * bs + 1);
          if (nv <= 0) continue;
          float m = mx[j];
          for (int64_t i = 0; i < nv; ++i) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qf[j * D + d] * kf[i * D + d];
            s[i] = dot, m = std::max(m, dot);
          }
          const float corr = std::exp(mx[j] - m);
          float* a = &acc[j * D];
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          sum[j] *= corr, mx[j] = m;
          for (int64_t i = 0; i < nv; ++i) {
            const float p = std::exp(s[i] - m);
            sum[j] += p;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vf[i * D + d];
          }
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        const int64_t h = g * rep + j / nt, t = t0 + j % nt;
        const float inv = sum[j] > 0.f ? 1.f / sum[j] : 0.f;
        for (int64_t d = 0; d < D; ++d) store(acc[j * D + d] * inv, out + ((b * H + h) * Tq + t) * D + d);
      }
    }
  }
}
}  // namespace

#define ARGS const int32_t *bt, const int64_t *qpos, const int64_t *slen, void *out, int64_t B, \
    int64_t H, int64_t Hkv, int64_t Tq, int64_t D, int64_t bs, int64_t mb, const int64_t *st, int nt
#define REST bt, qpos, slen, (T*)out, B, H, Hkv, Tq, D, bs, mb, st, nt
#define KERNEL(name, Q, K)                                                                      \
  extern "C" void name(const void* q, const void* k, const void* v, const void* ks,           \
                       const void* vs, ARGS) {                                                  \
    using T = Q;                                                                                \
    attend<Q, K>((const Q*)q, (const K*)k, (const K*)v, (const uint16_t*)ks, (const uint16_t*)vs, REST); \
  }
KERNEL(paged_f32, float, float)
KERNEL(paged_bf16, uint16_t, uint16_t)
KERNEL(paged_f32_i8, float, int8_t)
KERNEL(paged_bf16_i8, uint16_t, int8_t)
"""
)


@functools.cache
def _kernel(name: str) -> ctypes._CFuncPtr:
    fn = getattr(load_cpp("paged_attention", _CPP), name)
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 7 + [ctypes.c_void_p, ctypes.c_int]
    return fn


@functools.lru_cache(maxsize=64)
def _strides_arg(strides: tuple[int, ...]) -> Tensor:
    return torch.tensor(strides, dtype=torch.int64)  # cached: every layer passes the same


def _cpp_call(
    q: Tensor,
    k: Pool,
    v: Pool,
    tables: Tensor,
    q_pos: Tensor,
    seq_lens: Tensor,
    block_size: int,
    token_dims: tuple[int, int, int],
) -> Tensor:
    """Run the kernel; k/v (data, and scales when int8) are indexed (block, token, head, d)
    with the strides of their dims `token_dims` = (block, token, head)."""
    (k, ks), (v, vs) = _split(k), _split(v)
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"the C++ attention kernel needs float32/bfloat16 on cpu, got {q.dtype} on {q.device}"
        )
    quant = ks is not None
    if k.dtype != (torch.int8 if quant else q.dtype) or (quant and ks.dtype != SCALE_DTYPE):
        raise ValueError(f"K/V dtype {k.dtype} does not match q dtype {q.dtype}")
    strides = [k.stride(i) for i in token_dims] + [ks.stride(i) if quant else 0 for i in token_dims]
    same = [v.stride(i) for i in token_dims] + [vs.stride(i) if quant else 0 for i in token_dims]
    if k.dtype != v.dtype or strides != same or (k.shape[-1] > 1 and k.stride(-1) != 1):
        raise ValueError("K and V must share dtype and strides, with unit stride over head_dim")
    b, h, tq, d = q.shape
    q = q.contiguous()
    bt = tables.to(torch.int32).contiguous()
    pos, lens = q_pos.to(torch.int64).contiguous(), seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    name = ("paged_bf16" if q.dtype == torch.bfloat16 else "paged_f32") + ("_i8" if quant else "")
    _kernel(name)(
        *(t.data_ptr() if t is not None else None for t in (q, k, v, ks, vs, bt, pos, lens, out)),
        b, h, k.shape[token_dims[2]], tq, d, block_size, bt.shape[1],
        _strides_arg(tuple(strides)).data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def paged_attention_cpp(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """The C++ kernel: reads each row's blocks in place (bf16/fp32 pools, or int8 pools with
    float16 scales), any q_pos (decode, prefill, prefix-cached prefill), CPU only."""
    _check(q, k_pool, block_tables, q_pos, seq_lens)
    k, _ = _split(k_pool)
    if not all(t.is_contiguous() for t in (*_split(k_pool), *_split(v_pool)) if t is not None):
        raise ValueError("pools must be contiguous")  # never copy a pool
    n, bs = k.shape[:2]
    # The kernel trusts the tables: check the reads it will do stay inside the pool.
    lo, hi = torch.aminmax(block_tables)
    if int(seq_lens.max()) > block_tables.shape[1] * bs or int(lo) < 0 or int(hi) >= n:
        raise ValueError("block_tables too short for seq_lens, or a block id outside the pool")
    return _cpp_call(q, k_pool, v_pool, block_tables, q_pos, seq_lens, bs, (0, 1, 2))


def dense_decode_cpp(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor | None = None) -> Tensor:
    """The same kernel over dense caches k, v [B, Hkv, S, D] (any strides over B, Hkv, S):
    row b's queries see its first seq_lens[b] keys (default all S), as in a decode step on a
    contiguous cache. Each row is one block."""
    b, s = k.shape[0], k.shape[2]
    if (
        k.shape[1] == 0
        or q.shape[1] % k.shape[1]
        or q.shape[-1] != k.shape[-1]
        or k.shape[0] != q.shape[0]
    ):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if k.stride()[:3] != v.stride()[:3]:  # e.g. a fresh v still in the projection's order
        k = k.clone(memory_format=torch.contiguous_format)
        v = v.clone(memory_format=torch.contiguous_format)
    if seq_lens is None:
        tables, q_pos, lens = _dense_rows(b, s, q.shape[2])
    else:
        lens = seq_lens.clamp(max=s)
        tables = torch.arange(b, dtype=torch.int32)[:, None]
        q_pos = (lens - 1).clamp(min=0)[:, None].expand(b, q.shape[2]).contiguous()
    return _cpp_call(q, k, v, tables, q_pos, lens, s, (0, 2, 1))


@functools.lru_cache(maxsize=8)
def _dense_rows(b: int, s: int, tq: int) -> tuple[Tensor, Tensor, Tensor]:
    """Block tables, query positions and lengths for rows that each see all s keys: shared
    by the layers of one decode step, so built once per step, not per layer."""
    lens = torch.full((b,), s, dtype=torch.int64)
    tables = torch.arange(b, dtype=torch.int32)[:, None]
    return tables, (lens - 1).clamp(min=0)[:, None].expand(b, tq).contiguous(), lens


_PREFILL_TQ = 128  # above this many queries per row, gather + SDPA beats the C++ kernel here


def paged_attention_cpu(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """The fastest measured CPU choice: the C++ kernel for decode and short chunks (reads
    the pool in place), gather + SDPA for long prefills (compute-bound)."""
    kernel = paged_attention_cpp if q.shape[2] <= _PREFILL_TQ else paged_attention_gather_sdpa
    return kernel(q, k_pool, v_pool, block_tables, q_pos, seq_lens)


# -- FlexAttention --------------------------------------------------------------------------

_Q_BLOCK = 128  # query rows per block-mask tile


def _flex_call(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, gqa: bool) -> Tensor:
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    # Each (dtype, pool size, head layout) takes two graphs; past dynamo's limit (8 by
    # default) flex would run uncompiled, materializing scores over the whole pool. Raise it
    # once, process-wide (a scoped config.patch costs ~1.6 ms per call).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # dynamic=None + explicit marks: batch and query length are symbolic from the first call
    # (a static first call would specialize on every new shape; dynamic=True would also make
    # the pool size symbolic).
    return torch.compile(_flex_call, dynamic=None)


# Per (device, pool size): q_start [cap], seq_lens [cap], physical -> logical block
# [cap, num_blocks + 1], rows [0, B) rewritten for each new mask. What mask_mod reads must
# have static shapes: in torch 2.13 a symbolic size inside the CPU mask_mod code can collide
# with the kernel's own size names and fail to compile ("cur_qSplitSize8 was not declared").
_ROWS: dict[tuple[torch.device, int], tuple[Tensor, Tensor, Tensor]] = {}


def _row_buffers(dev: torch.device, num_blocks: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
    bufs = _ROWS.get((dev, num_blocks))
    if bufs is None or bufs[0].shape[0] < b:
        cap = max(64, 1 << (b - 1).bit_length())  # growing recompiles once
        bufs = (
            torch.zeros(cap, dtype=torch.long, device=dev),
            torch.zeros(cap, dtype=torch.long, device=dev),
            torch.full((cap, num_blocks + 1), -1, dtype=torch.long, device=dev),
        )
        for t in bufs:
            torch._dynamo.mark_static(t)
        _ROWS[(dev, num_blocks)] = bufs
    return bufs


def _flex_block_mask(
    block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor, num_blocks: int, block_size: int
) -> BlockMask:
    """Block mask over the physical pool (kv length num_blocks * block_size): for each row
    and tile of _Q_BLOCK queries, the blocks partly visible (mask_mod decides per element)
    and the blocks fully visible (no mask_mod). Valid until the next call (shared buffers).

    Shapes are padded so only two graphs compile (decode Tq == 1, prefill Tq > 1): batch to
    >= 2 (a dummy row without blocks) and tiles to >= 2 when Tq > 1, avoiding 0/1
    specialization."""
    dev = block_tables.device
    b, tq = q_pos.shape
    if not torch.equal(q_pos, q_pos[:, :1] + torch.arange(tq, device=dev)):
        raise ValueError("paged_attention_flex needs consecutive query positions per row")
    pad = (0, max(0, 2 - b))
    tables = F.pad(block_tables.long(), (0, 0, *pad))
    q_start, lens = F.pad(q_pos[:, 0], pad), F.pad(seq_lens.long(), pad)  # dummy: length 0
    b, mb = tables.shape
    rows = max(2, -(-tq // _Q_BLOCK)) if tq > 1 else 1
    first = q_start[:, None] + torch.arange(rows, device=dev) * _Q_BLOCK  # [B, rows]
    last = q_start[:, None] + (torch.arange(1, rows + 1, device=dev) * _Q_BLOCK).clamp(max=tq) - 1
    start = torch.arange(mb, device=dev) * block_size  # logical start of each table entry
    end = start + block_size
    full = (end - 1 <= first[..., None]) & (end <= lens[:, None, None])
    partial = ~full & (start <= last[..., None]) & (start < lens[:, None, None])

    def compact(sel: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # selected first
        ids = torch.gather(tables[:, None].expand(b, rows, mb), -1, order).to(torch.int32)
        ids = F.pad(ids, (0, num_blocks - mb))  # flex wants pool-wide columns
        return sel.sum(-1, dtype=torch.int32)[:, None], ids[:, None]

    start_buf, lens_buf, logical = _row_buffers(dev, num_blocks, b)
    start_buf[:b], lens_buf[:b] = q_start, lens
    # Physical block -> its index in the row's table. Unused table entries (padding, maybe
    # repeating a real id) go to the spare last column so they cannot overwrite one.
    rows_logical = logical[:b].fill_(-1)
    idx = torch.where(start < lens[:, None], tables, num_blocks)
    rows_logical.scatter_(1, idx, torch.arange(mb, device=dev).expand(b, mb).contiguous())

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        pos = logical[bi, kv // block_size] * block_size + kv % block_size
        return (pos >= 0) & (pos <= start_buf[bi] + qi) & (pos < lens_buf[bi])

    (kn, ki), (fn, fi) = compact(partial), compact(full)
    return BlockMask.from_kv_blocks(
        kn, ki, fn, fi, BLOCK_SIZE=(_Q_BLOCK, block_size), mask_mod=mask_mod,
        seq_lengths=(tq, num_blocks * block_size), compute_q_blocks=False,
    )  # fmt: skip


_last_mask: tuple = ()  # (inputs, mask): the layers of one forward pass share their mask


def _mask_for(block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor, n: int, bs: int) -> BlockMask:
    global _last_mask
    key = (block_tables, q_pos, seq_lens, n, bs)
    if not _last_mask or any(a is not b for a, b in zip(_last_mask[0], key, strict=True)):
        _last_mask = (key, _flex_block_mask(block_tables, q_pos, seq_lens, n, bs))
    return _last_mask[1]


def paged_attention_flex(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """Compiled FlexAttention over the whole pool viewed as one [1, Hkv, N * bs, D] sequence;
    the block mask restricts each row to its own blocks, so nothing is copied. Needs
    consecutive query positions per row. The mask is rebuilt only when new metadata tensors
    arrive (one forward passes the same ones to every layer; don't modify them in place)."""
    _check(q, k_pool, block_tables, q_pos, seq_lens)
    if isinstance(k_pool, tuple):
        raise ValueError("FlexAttention cannot read int8 pools; use paged_attention_cpp")
    n, bs, hkv, d = k_pool.shape
    b = q.shape[0]
    mask = _mask_for(block_tables, q_pos, seq_lens, n, bs)
    if b < 2:
        q = torch.cat((q, q.new_zeros(2 - b, *q.shape[1:])))
    k = k_pool.view(1, n * bs, hkv, d).transpose(1, 2)
    v = v_pool.view(1, n * bs, hkv, d).transpose(1, 2)
    torch._dynamo.mark_static(k)  # a new pool size recompiles rather than going symbolic
    torch._dynamo.mark_static(v)
    dims = (q, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
    for t in dims:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 2)
    out = _compiled_flex()(q, k, v, mask, hkv != q.shape[1])
    return out[:b]


# -- Ascend NPU -----------------------------------------------------------------------------


def paged_attention_npu(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """torch_npu fused infer attention reading the pools through block_table (BSH layout).
    Assumes each row's valid queries are its last tokens (q_pos ends at seq_len - 1), which
    sparse_mode 3 (right-down causal) expresses. Bf16/fp16 pools only."""
    # unverified: no NPU in CI
    import torch_npu

    b, h, tq, d = q.shape
    n, bs, hkv, _ = k_pool.shape
    valid_q = (seq_lens - q_pos[:, 0]).clamp(0, tq)
    causal = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1) if tq > 1 else None
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q.transpose(1, 2).reshape(b, tq, h * d),
        k_pool.view(n, bs, hkv * d),
        v_pool.view(n, bs, hkv * d),
        atten_mask=causal,
        actual_seq_lengths=valid_q.tolist(),
        actual_seq_lengths_kv=seq_lens.tolist(),
        block_table=block_tables.to(torch.int32),
        block_size=bs,
        num_heads=h,
        num_key_value_heads=hkv,
        scale=d**-0.5,
        input_layout="BSH",
        sparse_mode=3 if tq > 1 else 0,
    )
    return out.view(b, tq, h, d).transpose(1, 2)
