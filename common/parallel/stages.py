"""Pipeline parallel's split of a model: which layers, embedding and head a stage holds
(the schedule that runs the stages is common/engine/pipeline.py)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.nn.attention import SelfAttention
from common.nn.causal_lm import CausalLM
from common.parallel.layout import stage_layers
from common.parallel.placement import Placement


def stage_placement(stage: int, stages: int) -> Callable[[CausalLM], Placement]:
    """Prune a meta model to one stage's share: its layers (under their checkpoint names),
    the embedding on the first stage, the final norm and head on the last."""

    def place(model: CausalLM) -> Placement:
        counts = stage_layers(model.args.num_hidden_layers, stages)
        first_layer = sum(counts[:stage])
        ids = range(first_layer, first_layer + counts[stage])
        decoder = model.model
        decoder.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in ids})
        for local, layer in enumerate(decoder.layers.values()):
            for m in layer.modules():
                if isinstance(m, SelfAttention):
                    m.layer = local  # this stage's KV storage holds its own layers only
        first, last = stage == 0, stage == stages - 1
        aliases = {}
        if not first:
            decoder.embed_tokens = None
        if not last:
            decoder.norm = model.lm_head = None
        if model.tied_weights and not (first and last):
            model.tied_weights = {}  # a tied head on the last stage holds its own copy
            if last:
                aliases = {"lm_head.weight": "model.embed_tokens.weight"}
        return Placement(aliases=aliases, subset=True)

    return place
