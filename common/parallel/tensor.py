"""Tensor parallel, Megatron-LM's layout: attention split by heads, the MLP column- then
row-parallel, embedding and LM head split by vocabulary; one all-reduce after each
row-parallel layer (o_proj, down_proj) and after the embedding, one all-gather of the logits
(collectives.py: torch.distributed, or shared memory between the CPU ranks of one node).

Two steps, so the other transforms never see a collective:
1. `shard(model)` before loading: every projection becomes its rank-local shape (on meta)
   and `parts` says which slice of each checkpoint tensor this rank reads (io/checkpoint.py
   reads only that slice from safetensors); attention learns its local head counts.
2. `parallelize(model)` after fusion and quantization: wraps the row-parallel projections,
   the embedding and the head with their collectives. Fusion stacks the local q/k/v and
   gate/up; int8 quantizes each local shard per output channel, as it would any matrix.

Hand-written rather than `torch.distributed.tensor.parallel.parallelize_module`: that API
distributes parameters that already exist (in full, or initialized on each rank) as DTensors,
while here each rank reads only its slice from the checkpoint; the int8 and fusion transforms
replace nn.Linear modules by their own classes holding plain tensors, which DTensor
parameters would not survive; and a fused gate_up matrix (GLM-4) shards as two row blocks
per rank, which ColwiseParallel's single even split gets wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.core.errors import RecipeError
from common.nn.attention import SelfAttention
from common.nn.causal_lm import CausalLM
from common.nn.mlp import FusedGatedMLP, GatedMLP
from common.parallel.collectives import Collectives
from common.parallel.layout import Layout, kv_heads_of_rank
from common.parallel.layout import shard as shard_dims
from common.parallel.placement import Part, Placement


def _even(total: int, tp: int, rank: int) -> tuple[int, int]:
    share = total // tp
    return rank * share, (rank + 1) * share


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: Any = None  # torch.distributed group; None = the world
    shm_bytes: int = 0  # CPU ranks of one node: collectives up to this size in shared memory

    def shard(self, model: CausalLM) -> Placement:
        """Give every sharded module its local shape (on meta) and return the checkpoint
        slices this rank reads, by parameter name."""
        args, tp, r = model.args, self.size, self.rank
        dims = shard_dims(args, Layout(tp=tp))  # checks that tp divides heads and channels
        d, vocab = args.kv_head_dim, args.vocab_size
        q0, q1 = _even(args.num_attention_heads, tp, r)
        h0, h1 = kv_heads_of_rank(args.num_key_value_heads, tp, r)
        i0, i1 = _even(args.intermediate_size, tp, r)
        inter = args.intermediate_size
        parts: dict[str, Part] = {}

        def rows(*blocks: tuple[int, int]) -> Part:
            return Part(0, blocks, sum(b - a for a, b in blocks))

        def col_parallel(prefix: str, old: nn.Linear, part: Part) -> nn.Linear:
            parts[f"{prefix}.weight"] = part
            if old.bias is not None:
                parts[f"{prefix}.bias"] = part
            return _meta_linear(old.in_features, part.size, old.bias is not None)

        def row_parallel(prefix: str, old: nn.Linear, cols: tuple[int, int]) -> nn.Linear:
            parts[f"{prefix}.weight"] = Part(1, (cols,), cols[1] - cols[0])
            if old.bias is not None:
                n = old.out_features
                parts[f"{prefix}.bias"] = Part(0, ((0, n),) if r == 0 else (), n)
            return _meta_linear(cols[1] - cols[0], old.out_features, old.bias is not None)

        for name, m in model.named_modules():
            if isinstance(m, SelfAttention):
                if m.qkv_proj is not None:
                    raise RecipeError("tensor parallel shards q/k/v before they are fused")
                m.q_proj = col_parallel(f"{name}.q_proj", m.q_proj, rows((q0 * d, q1 * d)))
                m.k_proj = col_parallel(f"{name}.k_proj", m.k_proj, rows((h0 * d, h1 * d)))
                m.v_proj = col_parallel(f"{name}.v_proj", m.v_proj, rows((h0 * d, h1 * d)))
                m.o_proj = row_parallel(f"{name}.o_proj", m.o_proj, (q0 * d, q1 * d))
                m.heads, m.kv_heads = q1 - q0, h1 - h0
            elif isinstance(m, GatedMLP):
                m.gate_proj = col_parallel(f"{name}.gate_proj", m.gate_proj, rows((i0, i1)))
                m.up_proj = col_parallel(f"{name}.up_proj", m.up_proj, rows((i0, i1)))
                m.down_proj = row_parallel(f"{name}.down_proj", m.down_proj, (i0, i1))
            elif isinstance(m, FusedGatedMLP):  # gate rows, then up rows: one block of each
                part = rows((i0, i1), (inter + i0, inter + i1))
                m.gate_up_proj = col_parallel(f"{name}.gate_up_proj", m.gate_up_proj, part)
                m.down_proj = row_parallel(f"{name}.down_proj", m.down_proj, (i0, i1))
        v0 = r * dims.vocab
        table = Part(0, ((v0, min(v0 + dims.vocab, vocab)),), dims.vocab)
        if model.model.embed_tokens is not None:
            parts["model.embed_tokens.weight"] = table
            model.model.embed_tokens = _meta(nn.Embedding, dims.vocab, args.hidden_size)
        if model.lm_head is not None:
            parts["lm_head.weight"] = table
            model.lm_head = _meta_linear(args.hidden_size, dims.vocab, False)
        model.kv_head_range = (h0, h1)
        return Placement(parts)

    def parallelize(self, model: CausalLM) -> CausalLM:
        """Add the collectives (after fusion and quantization swapped the local modules)."""
        device_type = next(model.parameters()).device.type
        comm = Collectives(self.group, device_type, self.shm_bytes)
        for m in list(model.modules()):
            if isinstance(m, SelfAttention):
                m.o_proj = RowParallel(m.o_proj, comm)
            elif isinstance(m, (GatedMLP, FusedGatedMLP)):
                m.down_proj = RowParallel(m.down_proj, comm)
        vocab_shard = -(-model.args.vocab_size // self.size)
        if model.model.embed_tokens is not None:
            model.model.embed_tokens = VocabParallelEmbedding(
                model.model.embed_tokens, self.rank * vocab_shard, vocab_shard, comm
            )
        if model.lm_head is not None:
            model.lm_head = VocabParallelHead(model.lm_head, model.args.vocab_size, comm)
        return model


def _meta(cls: type[nn.Module], *shape: int, **kw: Any) -> nn.Module:
    with torch.device("meta"):
        return cls(*shape, **kw)


def _meta_linear(inp: int, out: int, bias: bool) -> nn.Linear:
    return _meta(nn.Linear, inp, out, bias=bias)


class RowParallel(nn.Module):
    """A projection whose input channels are split: each rank's output is a partial sum."""

    def __init__(self, inner: nn.Module, comm: Collectives) -> None:
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        self.comm.all_reduce(out)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the table; other ids give zeros, the all-reduce fills them."""

    lookup_table = True  # the memory model counts one row read per token

    def __init__(self, inner: nn.Module, start: int, n: int, comm: Collectives) -> None:
        super().__init__()
        self.inner, self.start, self.n, self.comm = inner, start, n, comm

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.n)
        out = self.inner(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        self.comm.all_reduce(out)
        return out


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered into the full [.., vocab]: the
    sampler's processors (repetition penalty, top-p) need every logit of a row, so the
    gather is here rather than in a vocab-parallel argmax (Megatron keeps them split for
    its parallel cross entropy, which generation does not need)."""

    def __init__(self, inner: nn.Module, vocab: int, comm: Collectives) -> None:
        super().__init__()
        self.inner, self.vocab, self.comm = inner, vocab, comm

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.cat(self.comm.all_gather(self.inner(hidden)), -1)[..., : self.vocab]
