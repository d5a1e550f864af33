"""Calibration forwards for schemes that look at activations (common/quant/smooth.py): each
is a function running the model on one batch of token ids, whole-sequence causal prefill
without a KV cache, LM head on every position (so its input statistics are a whole batch's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from common.attention.backends import sdpa_attention
from common.attention.meta import AttnMeta, ForwardContext
from common.kv.rows import NoCache


def forwards(batches: Iterable[Tensor]) -> Iterator[Callable[[nn.Module], Tensor]]:
    """One calibration forward per batch of ids [B, T]."""
    for ids in batches:

        def run(model: nn.Module, ids: Tensor = ids) -> Tensor:
            device = next(model.parameters()).device
            ids = ids.to(device)
            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
            ctx = ForwardContext(NoCache(), sdpa_attention, AttnMeta(causal=True))
            with torch.no_grad():
                return model.logits(model(ids, positions, ctx))

        yield run
