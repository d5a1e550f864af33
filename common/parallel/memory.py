"""One memory model: the bytes a model needs per device, from its config alone.

Weights (for a dtype and a weight quantization scheme), KV per token, activations and
workspace, split over a parallel layout (tensor-parallel ranks x pipeline stages). Everything
that sizes memory (the bench's KV and roofline columns, KV capacity, the GQA table, the
planner) asks this module; common/parallel/measured.py holds the measured counterparts the
tests compare it with, and common/parallel/activations.py the activation estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.ops.kv_int8 import SCALE_DTYPE
from common.parallel.activations import activation_bytes, workspace_bytes
from common.parallel.layout import ONE_DEVICE, Layout, Shard, shard
from common.quant.formats import FLOAT, WeightFormat, weight_format

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs

Scheme = str | WeightFormat  # a quant.weights name or its format (common/quant/formats.py)


def as_format(scheme: Scheme) -> WeightFormat:
    return scheme if isinstance(scheme, WeightFormat) else weight_format(scheme)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes one device holds, by part."""

    embedding: int  # token embedding table (a forward reads one row per token)
    layers: int  # this stage's decoder layers
    head: int  # final norm + LM head; the head's table is `embedding` when tied on this device
    head_reads_embedding: bool  # tied head on the embedding's device: decode reads the table
    other: int = 0  # weights outside the decoder (a vision tower): not read by a decode step

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.head + self.other

    @property
    def decode_read(self) -> int:
        """Bytes a decode step reads: all but the embedding table, unless the head is that table."""
        return self.total - self.other - (0 if self.head_reads_embedding else self.embedding)


def layer_weight_bytes(args: ModelArgs, dtype: torch.dtype, scheme: Scheme, s: Shard) -> int:
    """One decoder layer on one tensor-parallel rank: q/k/v and gate/up split by output
    channel (q by heads, k/v by KV heads), o/down by input channel (their biases and int8
    scales cover every output channel, so each rank holds all of them), norms replicated."""
    h, d, e = args.hidden_size, args.kv_head_dim, dtype.itemsize
    qkv_bias, o_bias, mlp_bias = args.biases
    q, kv, inter = s.heads * d, s.kv_heads * d, s.intermediate
    mat = lambda rows, cols: as_format(scheme).matrix_bytes(rows, cols, dtype)  # noqa: E731
    attention = mat(q + 2 * kv, h) + mat(h, q) + e * ((q + 2 * kv) * qkv_bias + h * o_bias)
    mlp = mat(2 * inter, h) + mat(h, inter) + e * (2 * inter + h) * mlp_bias
    norms = 2 * h * e
    return attention + mlp + norms


def weights_per_device(
    args: ModelArgs,
    dtype: torch.dtype,
    scheme: Scheme = "none",
    layout: Layout = ONE_DEVICE,
    stage: int = 0,
    other_params: int = 0,
) -> WeightBytes:
    """Weights on one device of `stage` (every tensor-parallel rank of a stage holds the same
    bytes; a vocab that does not divide is padded to the largest shard). Embeddings live on
    the first stage, final norm and head on the last; a tied head shares the embedding table
    when both are on one stage and holds its own copy on the last stage otherwise.
    other_params: parameters outside the decoder (a vision tower), kept in the model dtype on
    the first stage and split over the tensor-parallel ranks (an estimate: norms and biases
    replicate)."""
    fmt = as_format(scheme)
    s = shard(args, layout)
    first, last = stage == 0, stage == layout.pp - 1
    table_fmt = fmt if fmt.embeddings else FLOAT
    table = table_fmt.matrix_bytes(s.vocab, args.hidden_size, dtype)
    shared = args.tie_word_embeddings and first and last
    head_fmt = table_fmt if args.tie_word_embeddings else fmt if fmt.head else FLOAT
    head_table = 0 if shared else head_fmt.matrix_bytes(s.vocab, args.hidden_size, dtype)
    return WeightBytes(
        embedding=table if first else 0,
        layers=s.stage_layers[stage] * layer_weight_bytes(args, dtype, fmt, s),
        head=args.hidden_size * dtype.itemsize + head_table if last else 0,
        head_reads_embedding=shared,
        other=-(-other_params // layout.tp) * dtype.itemsize if first else 0,
    )


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the float model (a tied head counted once)."""
    return weights_per_device(args, torch.int8).total  # 1 byte per parameter


def kv_bytes_per_token(
    args: ModelArgs,
    dtype: torch.dtype,
    int8: bool = False,
    layout: Layout = ONE_DEVICE,
    stage: int = 0,
) -> int:
    """K + V bytes one token occupies on one device: its stage's layers x the rank's KV heads
    (int8: the int8 vector plus one float16 scale per token and head, common/kv/quant.py)."""
    s = shard(args, layout)
    d = args.kv_head_dim
    per_head = d + SCALE_DTYPE.itemsize if int8 else d * dtype.itemsize
    return 2 * s.stage_layers[stage] * s.kv_heads * per_head


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds: any tensor-parallel rank of pipeline stage `stage`."""

    stage: int
    weights: WeightBytes
    kv: int
    activations: int
    workspace: int  # an estimate, like activations (common/parallel/activations.py)

    @property
    def total(self) -> int:
        return self.weights.total + self.kv + self.activations + self.workspace


def device_memory(
    args: ModelArgs,
    dtype: torch.dtype,
    layout: Layout = ONE_DEVICE,
    scheme: Scheme = "none",
    kv_int8: bool = False,
    kv_tokens: int = 0,
    batch: int = 1,
    seq_len: int = 1,
    context: int | None = None,
    eager_attention: bool = True,
    other_params: int = 0,
) -> list[DeviceMemory]:
    """Each pipeline stage's device: weights, KV for `kv_tokens` tokens (every sequence's
    reserved slots together), and the activations and workspace of a forward of `batch` rows
    of `seq_len` new tokens seeing `context` keys. The planner wants max(..., key=total)."""
    fmt = as_format(scheme)
    return [
        DeviceMemory(
            stage=stage,
            weights=weights_per_device(args, dtype, fmt, layout, stage, other_params),
            kv=kv_tokens * kv_bytes_per_token(args, dtype, kv_int8, layout, stage),
            activations=activation_bytes(args, dtype, batch, seq_len),
            workspace=workspace_bytes(
                args,
                dtype,
                batch,
                seq_len,
                context,
                layout,
                eager_attention,
                dequantized_weights=fmt.dequantizes,
                head=stage == layout.pp - 1,
            ),
        )
        for stage in range(layout.pp)
    ]
