"""Activation and workspace bytes of one forward on one device: an estimate, not a measurement.

For N = batch x seq_len new tokens attending to `context` keys each, on one tensor-parallel
rank holding h query heads, k KV heads (head_dim D), I/tp MLP channels and V/tp vocabulary,
in a model dtype of e bytes:

- activations (live through the whole forward): the residual stream and the normed input of
  the current sublayer, 2 * N * hidden * e (replicated on every rank: tensor parallel
  all-reduces each sublayer's output).
- workspace (the largest temporaries of one phase; phases run one after another and inference
  frees each before the next):
  - attention: q/k/v and their rotated copies, 2 * N * (h + 2k) * D * e; eager attention adds
    the score matrix [batch, h, seq_len, context] in the model dtype, its fp32 softmax and
    the probabilities cast back, batch * h * seq_len * context * (2e + 4) (8 bytes in fp32,
    where the cast copies nothing; fused kernels tile the matrix instead), and with fewer
    KV heads than query heads K and V repeated to h heads, 2 * batch * h * context * D * e
    (the largest term when one token reads a long context);
  - MLP: gate and up outputs (stacked or not), silu(gate) and the product, 4 * N * I/tp * e;
  - logits of the last token of each row, [batch, V/tp] in the model dtype and in fp32.
  Weights stored quantized and dequantized per matmul (weight-only int8 in prefill) add, in
  every phase, its largest weight in the model dtype: stacked q/k/v, gate/up, the LM head.

Not counted: the allocator's caching and fragmentation, kernels' own scratch, the cos/sin
tables, communication buffers, and inputs held by a pipeline stage for more than one
micro-batch. tests/test_memory.py holds it within 25% of the peak of live tensors the
profiler records for the tiny presets; compare with a device's peak memory before trusting
it near a limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.core.errors import RecipeError
from common.parallel.layout import ONE_DEVICE, Layout, shard

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs


def activation_bytes(args: ModelArgs, dtype: torch.dtype, batch: int, seq_len: int) -> int:
    _check_shape(batch, seq_len)
    return 2 * batch * seq_len * args.hidden_size * dtype.itemsize


def workspace_bytes(
    args: ModelArgs,
    dtype: torch.dtype,
    batch: int,
    seq_len: int,
    context: int | None = None,
    layout: Layout = ONE_DEVICE,
    eager_attention: bool = True,
    dequantized_weights: bool = False,
    head: bool = True,
) -> int:
    """The largest phase's temporaries (see the module docstring); context defaults to seq_len
    (a prefill with nothing cached). dequantized_weights: the weights are stored quantized
    and dequantized for each matmul (weight-only int8 in prefill). head: this device
    computes the logits (the last pipeline stage)."""
    _check_shape(batch, seq_len)
    s, e = shard(args, layout), dtype.itemsize
    n, d, hidden = batch * seq_len, args.kv_head_dim, args.hidden_size
    qkv = (s.heads + 2 * s.kv_heads) * d
    casts = dtype != torch.float32  # casts to and from fp32 copy only from another dtype
    context = context or seq_len
    scores = batch * s.heads * seq_len * context * (e + 4 + e * casts)
    repeated_kv = 2 * batch * s.heads * context * d * e if s.kv_heads < s.heads else 0
    attention = 2 * n * qkv * e + (scores + repeated_kv if eager_attention else 0)
    mlp = 4 * n * s.intermediate * e
    logits = batch * s.vocab * (e + 4 * casts)
    if dequantized_weights:  # the phase's largest weight [out, in] in the model dtype
        attention += qkv * hidden * e  # stacked q/k/v (o_proj is smaller)
        mlp += 2 * s.intermediate * hidden * e
        logits += s.vocab * hidden * e
    return max(attention, mlp, logits if head else 0)


def _check_shape(batch: int, seq_len: int) -> None:
    if batch < 1 or seq_len < 1:
        raise RecipeError(
            f"activations need batch >= 1 and seq_len >= 1, got {batch} and {seq_len}"
        )
