"""Attention over K/V read in place through strides (attention.cpp): paged pools through
block tables, or dense caches as one block per row; online softmax in fp32, int8 K/V with
float16 scales dequantized inside. Plus `decode_attention`, the dispatched op for one query
per row on a dense cache: the C++ kernel or torch SDPA, whichever is faster here.

Pool layout (vLLM's): [num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks];
q [B, H, Tq, D]; q_pos int64 [B, Tq]; seq_lens [B] = cached tokens per row. A query at
position p sees its row's cached positions <= p; a query that sees nothing returns zeros.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op

KV_SCALE_DTYPE = torch.float16  # what the kernel reads int8 K/V scales as


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    block_tables: Tensor,
    q_pos: Tensor,
    seq_lens: Tensor,
    block_size: int,
    token_dims: list[int],
) -> Tensor:
    if q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the C++ attention kernel needs float32/bfloat16 q, got {q.dtype}")
    quant = k_scale is not None
    if k.dtype != (torch.int8 if quant else q.dtype) or (
        quant and (v_scale is None or k_scale.dtype != KV_SCALE_DTYPE)
    ):
        raise ValueError(f"K/V dtype {k.dtype} does not match q dtype {q.dtype}")
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# The C++ kernel (attention.cpp). k/v (and their scales when int8) are indexed (block, token,
# head, d) with the strides of their dims `token_dims` = (block, token, head); the tables are
# trusted (callers check that reads stay inside k).
attention_cpp = kernel_op("attention", "attention_cpp", _check)


def dense_decode_cpp(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor | None = None) -> Tensor:
    """The C++ kernel over dense caches k, v [B, Hkv, S, D] (any strides over B, Hkv, S):
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
    return attention_cpp(q, k, v, None, None, tables, q_pos, lens, s, [0, 2, 1])


@functools.lru_cache(maxsize=8)
def _dense_rows(b: int, s: int, tq: int) -> tuple[Tensor, Tensor, Tensor]:
    """Block tables, query positions and lengths for rows that each see all s keys: shared
    by the layers of one decode step, so built once per step, not per layer."""
    lens = torch.full((b,), s, dtype=torch.int64)
    tables = torch.arange(b, dtype=torch.int32)[:, None]
    return tables, (lens - 1).clamp(min=0)[:, None].expand(b, tq).contiguous(), lens


def dense_decode_sdpa(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor | None = None) -> Tensor:
    """torch SDPA with the same visibility: row b sees its first seq_lens[b] keys (default all);
    a row that sees nothing returns zeros, as the C++ kernel does."""
    gqa = k.shape[1] != q.shape[1]
    if seq_lens is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    seen = torch.arange(k.shape[2], device=q.device) < seq_lens.to(q.device)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None, None], enable_gqa=gqa)
    return out.masked_fill(~seen.any(-1)[:, None, None, None], 0.0)


decode_attention = Op(
    "decode_attention",
    [
        Impl(
            "cpp",
            dense_decode_cpp,
            devices=("cpu",),
            dtypes=(torch.float32, torch.bfloat16),
            cpp="attention",
        ),
        Impl("sdpa", dense_decode_sdpa),
    ],
    rows=lambda q, k, v, seq_lens: q.shape[0],
    size=lambda q, k, v, seq_lens: k[0].numel() * k.element_size(),  # one row's K
)
