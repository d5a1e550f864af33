"""Attention kernels ("backends"), chosen by name and device; `eager` is the reference.

A backend gets q [B, H, Tq, D] and k, v [B, Hkv, S, D] (GQA when Hkv < H) plus the
per-forward AttnMeta prepared by the KV cache, and returns [B, H, Tq, D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from common.attention.meta import AttnMeta, Backend, PagedMeta
from common.core.errors import RecipeError
from common.device.select import Device
from common.ops.attention import decode_attention
from common.ops.kv_int8 import QuantizedKV


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta) -> Tensor:
    """softmax(q kᵀ / √d) v, materializing the full score matrix (the naive baseline)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = meta.dense_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta) -> Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels)."""
    mask = meta.mask if meta.lens is None else meta.dense_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=meta.causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta) -> Tensor:
    """SDPA, except for decode steps: for one query per row torch's CPU flash kernel can be
    slower than eager attention (far slower with a padding mask). Rows that each see a prefix
    of the keys go to the decode_attention op, which measures the C++ online-softmax kernel
    over the cache in place against SDPA; rows with holes in what they see (left padding)
    to eager attention."""
    if q.shape[2] == 1:
        if meta.lens is not None:  # static shapes: each row's first lens[b] keys
            return decode_attention(q, k, v, meta.lens)
        if meta.mask is None and not (meta.causal and k.shape[2] > 1):  # every key visible
            return decode_attention(q, k, v, None)
        if meta.mask is not None and meta.prefix_lens is not None:
            return decode_attention(q, k, v, meta.prefix_lens)
        if meta.mask is not None:  # holes: SDPA with a mask is its slowest case here
            return eager_attention(q, k, v, meta)
    return sdpa_attention(q, k, v, meta)


def npu_fused_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta) -> Tensor:
    """torch_npu fused infer attention, BNSD layout. Unverified: no NPU in CI."""
    import torch_npu

    mask = meta.dense_mask(q.shape[2], k.shape[2], q.device)
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        atten_mask=None if mask is None else ~mask,  # npu convention: True = masked out
        num_heads=q.shape[1],
        num_key_value_heads=k.shape[1],
        scale=q.shape[-1] ** -0.5,
        input_layout="BNSD",
    )
    return out


def _packed(kernel: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, p: PagedMeta) -> Tensor:
    """A packed row q [1, H, N, D] (p.q_lens queries per sequence, one after another): the
    leading one-query sequences (the step's decodes) as one batch, each longer one (a prompt
    chunk) as a batch of its own; outputs in the same packed order."""
    lens = p.q_lens
    d = next((i for i, n in enumerate(lens) if n > 1), len(lens))
    outs = []
    if d:  # [1, H, d, D] -> [d, H, 1, D] and back
        rows = q[0, :, :d].transpose(0, 1).unsqueeze(2)
        out = kernel(rows, k, v, p.block_tables[:d], p.q_pos[0, :d, None], p.seq_lens[:d])
        outs.append(out[:, :, 0].transpose(0, 1)[None])
    at = d
    for i in range(d, len(lens)):
        part = slice(at, at + lens[i])
        tables, seq_lens = p.block_tables[i : i + 1], p.seq_lens[i : i + 1]
        outs.append(kernel(q[:, :, part], k, v, tables, p.q_pos[:, part], seq_lens))
        at += lens[i]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _paged(kernel_name: str, reads_int8: bool = False) -> Backend:
    """Adapt a common/paged_attention.py kernel to the backend signature (K/V are pools)."""

    def run(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta) -> Tensor:
        from common.attention import paged as paged_attention

        p = meta.paged
        name = kernel_name
        if isinstance(k, QuantizedKV) and not reads_int8:  # gather + dequantize instead
            name = "paged_attention_reference"
        kernel = getattr(paged_attention, name)
        if p.q_lens is not None:
            return _packed(kernel, q, k, v, p)
        return kernel(q, k, v, p.block_tables, p.q_pos, p.seq_lens)

    return run


_BY_DEVICE: dict[str, dict[str, Backend]] = {
    "cpu": {"eager": eager_attention, "sdpa": sdpa_attention, "flash": cpu_flash_attention},
    "cuda": {"eager": eager_attention, "sdpa": sdpa_attention, "flash": sdpa_attention},
    "npu": {"eager": eager_attention, "sdpa": sdpa_attention, "flash": npu_fused_attention},
}
# Paged KV: `eager` gathers each row's blocks (the reference); fused kernels read the pool
# (on cpu a C++ kernel that also reads int8 pools; FlexAttention on cuda).
_PAGED_BY_DEVICE: dict[str, dict[str, Backend]] = {
    "cpu": {
        "eager": _paged("paged_attention_reference"),
        "flash": _paged("paged_attention_cpu", True),
    },
    "cuda": {"eager": _paged("paged_attention_reference"), "flash": _paged("paged_attention_flex")},
    "npu": {"eager": _paged("paged_attention_reference"), "flash": _paged("paged_attention_npu")},
}


def get_backend(name: str, device: Device, paged: bool = False) -> Backend:
    choices = (_PAGED_BY_DEVICE if paged else _BY_DEVICE)[device.type]
    if name == "sdpa" and paged:
        name = "flash"
    if name not in choices:
        raise RecipeError(f"unknown attention.backend {name!r}; choose one of {', '.join(choices)}")
    return choices[name]
