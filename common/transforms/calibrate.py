"""Layer-by-layer calibration walk for GPTQ and AWQ (common/quant/calibrated.py).

Calibration token blocks go through the embedding once; then each decoder layer in turn gets
its linears' inputs captured (one forward of the layer on the current hidden states), is
handed to the scheme, which quantizes it in place, and runs again to produce the next layer's
inputs, so later layers are calibrated on what the quantized earlier ones produce. A last
step hands over the model itself with the LM head's input (the final norm's output).
Attention here is plain causal SDPA over each block: no cache, no engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from common.nn.attention import SelfAttention
from common.nn.causal_lm import CausalLM
from common.nn.decoder import PreNormDecoderLayer
from common.nn.mlp import FusedGatedMLP, GatedMLP
from common.quant.calibrated import LayerStep, ScaleGroup

_CHUNK = 4  # sequences per layer forward: bounds attention temporaries


class _Causal:
    """AttentionContext: causal attention within each block, keys = the block's own."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """Linears reading one input and what produces it, where folding a scale is exact: the
    norms before attention and MLP, up -> down, and v -> o when every query head has its own
    value head (with GQA a value channel feeds several heads' o_proj inputs)."""
    if not isinstance(layer, PreNormDecoderLayer):
        return []
    attn, mlp = layer.self_attn, layer.mlp
    fused_qkv = attn.qkv_proj is not None
    qkv = ["self_attn.qkv_proj"] if fused_qkv else [f"self_attn.{p}_proj" for p in "qkv"]
    groups = [ScaleGroup(qkv, layer.input_layernorm)]
    if isinstance(attn, SelfAttention) and attn.heads == attn.kv_heads:
        q_size, kv_size, _ = attn.qkv_sizes
        v_rows = slice(q_size + kv_size, None) if fused_qkv else slice(None)
        groups.append(
            ScaleGroup(["self_attn.o_proj"], attn.qkv_proj if fused_qkv else attn.v_proj, v_rows)
        )
    if isinstance(mlp, GatedMLP):
        groups.append(ScaleGroup(["mlp.gate_proj", "mlp.up_proj"], layer.post_attention_layernorm))
        groups.append(ScaleGroup(["mlp.down_proj"], mlp.up_proj, slice(None)))
    elif isinstance(mlp, FusedGatedMLP):
        groups.append(ScaleGroup(["mlp.gate_up_proj"], layer.post_attention_layernorm))
        inter = mlp.down_proj.in_features
        groups.append(ScaleGroup(["mlp.down_proj"], mlp.gate_up_proj, slice(inter, None)))
    return groups


def _hidden(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """One decoder layer on the whole residual stream h: its output added back to the stream
    (layers carry the stream apart from their output, common/nn/decoder.py)."""
    out, residual = layer(h, None, cos, sin, _Causal())
    return out + residual


def _run(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    chunks = range(0, h.shape[0], _CHUNK)
    return torch.cat(
        [
            _hidden(layer, h[i : i + _CHUNK], cos[i : i + _CHUNK], sin[i : i + _CHUNK])
            for i in chunks
        ]
    )


def _capture(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> dict[str, Tensor]:
    """Inputs [tokens, K] (float32) of every nn.Linear in the layer; linears reading the same
    tensor (q/k/v read one normed input) share one entry."""
    captured: dict[str, list[Tensor]] = {}
    shared: dict[str, str] = {}  # linear -> the earlier linear that read the same tensor
    seen: dict[int, tuple[str, Tensor]] = {}  # per chunk; holding x keeps its address unique

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        x = args[0]
        owner, _ = seen.setdefault(x.data_ptr(), (name, x))
        if owner != name:
            shared[name] = owner
        else:
            captured.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float())

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        for i in range(0, h.shape[0], _CHUNK):
            seen.clear()
            _hidden(layer, h[i : i + _CHUNK], cos[i : i + _CHUNK], sin[i : i + _CHUNK])
    finally:
        for handle in hooks:
            handle.remove()
    seen.clear()
    inputs = {name: torch.cat(chunks) for name, chunks in captured.items()}
    return {**inputs, **{name: inputs[owner] for name, owner in shared.items()}}


@torch.no_grad()
def layerwise(model: CausalLM, blocks: Tensor) -> Iterator[LayerStep]:
    """Walk the decoder layers on calibration token blocks [B, T] (see module doc)."""
    decoder = model.model
    device = next(model.parameters()).device
    ids = blocks.to(device)
    h = decoder.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    cos, sin = decoder.rotary_emb(positions, h.dtype)
    for i, layer in enumerate(tqdm(decoder.layers, desc="calibrating", unit="layer")):
        groups = scale_groups(layer)
        yield LayerStep(layer, f"model.layers.{i}", _capture(layer, h, cos, sin), groups)
        h = _run(layer, h, cos, sin)
    # The LM head's step: the model itself, its head reading the final norm's output.
    yield LayerStep(model, "", {"lm_head": decoder.norm(h).reshape(-1, h.shape[-1]).float()})
