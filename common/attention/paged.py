"""Attention that reads K/V through block tables (paged KV), checked against dense eager math.

Layout (vLLM's): k_pool, v_pool [num_blocks, block_size, Hkv, D], so one token's K for all
heads is one contiguous row and a step's writes are a single scatter by slot
(block * block_size + offset); int8 pools are (data int8 [..., D], scale float16 [..., 1])
pairs from common/ops/kv_int8.py. block_tables int32 [B, max_blocks] (entries past a row's
length are never read); q [B, H, Tq, D]; q_pos int64 [B, Tq]; seq_lens [B] = cached tokens
per row, new ones included (already written). A query at position p sees its row's cached
positions <= p; a query that sees nothing returns zeros. GQA when H is a multiple of Hkv.

Kernels (time per call relative to torch SDPA on a contiguous cache, measured on the 2-core
CI CPU at 12 heads x 64, bf16, block 16, context 128-1024, batch 1 and 8):
- paged_attention_reference: gathers the blocks into dense tensors, eager fp32 softmax.
- paged_attention_cpp: a small C++ kernel (common/ops/attention.cpp, built once with g++)
  walking each row's blocks in place with an online softmax; reads int8 pools directly.
  Decode 0.4-0.7x (int8: 0.4-1.05x); prefill 1.5-2.4x.
- paged_attention_gather_sdpa: copies this step's rows, then SDPA. Prefill 1.2-1.7x;
  decode 2-3x (the copy costs more than the attention).
- paged_attention_cpu: the CPU choice between those two, made by the dispatch table
  (common/ops/dispatch.py) per bucket of queries per row, by measurement on this machine.
- paged_attention_flex: compiled FlexAttention, block mask over the physical blocks. Two
  graphs (decode, prefill) per dtype, pool size and head layout. On CPU 2-11x (decode) and
  2.6-8x (prefill): inductor's generic CPU template has a fixed cost per call, allocates
  pool-sized buffers and, for bf16 prefill, repacks the whole pool. Meant for GPUs
  (untested here: no GPU in CI).
- paged_attention_npu: torch_npu fused infer attention with block_table (unverified).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from common.ops.attention import attention_cpp
from common.ops.dispatch import Impl, Op
from common.ops.kv_int8 import QuantizedKV, dequantize_kv

Pool = Tensor | QuantizedKV  # [N, bs, Hkv, D] float, or int8 data with float16 scales


def _split(pool: Pool) -> tuple[Tensor, Tensor | None]:
    return (pool.data, pool.scale) if isinstance(pool, QuantizedKV) else (pool, None)


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


# -- C++ kernel and the CPU choice ----------------------------------------------------------


def paged_attention_cpp(
    q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, q_pos: Tensor, seq_lens: Tensor
) -> Tensor:
    """The C++ kernel (common/ops/attention.cpp): reads each row's blocks in place (bf16/fp32
    pools, or int8 pools with float16 scales), any q_pos (decode, prefill, prefix-cached
    prefill), CPU only."""
    _check(q, k_pool, block_tables, q_pos, seq_lens)
    (k, ks), (v, vs) = _split(k_pool), _split(v_pool)
    if not all(t.is_contiguous() for t in (k, ks, v, vs) if t is not None):
        raise ValueError("pools must be contiguous")  # never copy a pool
    n, bs = k.shape[:2]
    # The kernel trusts the tables: check the reads it will do stay inside the pool (eager
    # only: a compiled step cannot read tensor values while tracing; its eager runs checked).
    if not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(block_tables)
        if int(seq_lens.max()) > block_tables.shape[1] * bs or int(lo) < 0 or int(hi) >= n:
            raise ValueError("block_tables too short for seq_lens, or a block id outside the pool")
    return attention_cpp(q, k, v, ks, vs, block_tables, q_pos, seq_lens, bs, [0, 1, 2])


def _row_bytes(k_pool: Pool, block_tables: Tensor) -> int:
    """Bytes of K one row's table can reach: what the kernel streams per row."""
    data, _ = _split(k_pool)
    return block_tables.shape[1] * data[0].numel() * data.element_size()


# The CPU choice: the C++ kernel reads the pool in place (decode, short chunks); gather +
# SDPA copies this step's rows but then runs torch's GEMMs (long, compute-bound prefills).
# Where one overtakes the other depends on the CPU, so the dispatch table measures it per
# bucket of queries per row.
paged_attention_cpu = Op(
    "paged_attention",
    [
        Impl(
            "cpp",
            paged_attention_cpp,
            devices=("cpu",),
            dtypes=(torch.float32, torch.bfloat16),
            cpp="attention",
        ),
        Impl("gather_sdpa", paged_attention_gather_sdpa),
    ],
    rows=lambda q, *rest: q.shape[2],
    size=lambda q, k_pool, v_pool, tables, *rest: _row_bytes(k_pool, tables),
)


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
