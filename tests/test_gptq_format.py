"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers layout) load into the int4 modules.

A tiny random LLaMA written by transformers is quantized here to 4-bit groups (GPTQ's min/max
grid, zero in 0..15) and packed by a packer written from AutoGPTQ's QuantLinear.pack, with
v1 zeros as GPTQModel writes them (each qzeros word minus 0x11111111). The reference is the
same model with every quantized linear's weight replaced by its dequantized W. transformers
itself cannot load GPTQ checkpoints without optimum and gptqmodel (not installed), so it is
not an oracle here.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from common.core.errors import RecipeError
from common.io.checkpoint import from_pretrained
from common.io.presets import build_model
from common.io.quantized import load_quantized
from common.ops.int4_linear import dequantize
from common.quant.int4 import Int4Linear
from common.transforms.forwards import forwards
from common.transforms.registry import apply_transforms
from models.llama import LlamaForCausalLM
from tests.tiny import random_batches, recipe_config

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 128


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words taken mod 2**32, as the int32 a checkpoint stores."""
    words = words % 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> [R/8, C] words: row 8i + j in bits 4j..4j+3 (AutoGPTQ's pack)."""
    v = values.long().view(-1, 8, values.shape[1])
    return sum(v[:, j] << (4 * j) for j in range(8))


def _quantize(w: torch.Tensor, g: int) -> tuple[torch.Tensor, ...]:
    """GPTQ's asymmetric grid per group of g inputs (the range always holds 0): q [N, K],
    fp16 scales [N, G], integer zeros [N, G] and the dequantized W [N, K] (float32)."""
    q, scales, zeros = torch.empty_like(w, dtype=torch.long), [], []
    for start in range(0, w.shape[1], g):
        cols = w[:, start : start + g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        scale = ((hi - lo) / 15).half().float()
        zero = (-lo / scale).round().clamp(0, 15)
        q[:, start : start + g] = ((cols / scale[:, None]).round() + zero[:, None]).clamp(0, 15)
        scales.append(scale)
        zeros.append(zero.long())
    scales, zeros = torch.stack(scales, 1), torch.stack(zeros, 1)
    deq = (q - _per_input(zeros, g, w.shape[1])) * _per_input(scales, g, w.shape[1])
    return q, scales.half(), zeros, deq


def _per_input(groups: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K]."""
    return groups.repeat_interleave(g, 1)[:, :k]


def _gptq_tensors(name: str, q, scales, zeros, g: int, fmt: str) -> dict[str, torch.Tensor]:
    k = q.shape[1]
    words = _pack(zeros).t()  # [G, N/8]: packed along the output dim
    return {
        f"{name}.qweight": _int32(_pack(q.t())),
        f"{name}.qzeros": _int32(words - 0x11111111 if fmt == "gptq" else words),
        f"{name}.scales": scales.t().contiguous(),
        f"{name}.g_idx": (torch.arange(k) // g).to(torch.int32),
    }


def _checkpoints(tmp_path: Path, fmt: str, bias: bool, tie: bool, g: int) -> tuple[Path, Path]:
    """(GPTQ checkpoint, float reference holding the dequantized weights)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    gptq: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            for name, linear in hf.model.layers[layer].named_modules():
                if name.rpartition(".")[2] not in LINEARS:
                    continue
                w = linear.weight
                w[0, :g] = w[0, :g].abs()  # zero 0: v1 stores -1, borrowing from its neighbour
                w[1, :g] = -w[1, :g].abs()  # zero 15
                if bias:  # values fp16 holds: the checkpoint stores them in fp16
                    linear.bias.copy_(torch.randn_like(linear.bias).half())
                q, scales, zeros, deq = _quantize(w.float(), g)
                w.copy_(deq)
                full = f"model.layers.{layer}.{name}"
                gptq.update(_gptq_tensors(full, q, scales, zeros, g, fmt))
                if bias:
                    gptq[f"{full}.bias"] = linear.bias.half()
    ref = tmp_path / "reference"
    hf.save_pretrained(ref)
    out = tmp_path / "gptq"
    out.mkdir()
    floats = load_file(ref / "model.safetensors")
    state = {k: v for k, v in floats.items() if k.rpartition(".")[0] + ".g_idx" not in gptq}
    save_file({**state, **gptq}, out / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((ref / "config.json").read_text())
    hf_config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": False,
        "checkpoint_format": fmt,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(hf_config))
    return out, ref


def _int4_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each int4 linear's W = (q - 8) * scale + zero, in float32."""
    return {
        name: dequantize(m.weight_packed, m.scales_and_zeros, m.group_size, torch.float32)[
            : m.out_features, : m.in_features
        ]
        for name, m in model.named_modules()
        if isinstance(m, Int4Linear)
    }


CASES = {  # fmt, bias, tied embeddings, group size (64 over 96 inputs: a narrower last group)
    "v1": ("gptq", False, True, 32),
    "v1-bias": ("gptq", True, False, 64),
    "v2": ("gptq_v2", False, False, 64),
    "v2-bias": ("gptq_v2", True, True, 32),
}


@pytest.mark.parametrize(("fmt", "bias", "tie", "g"), CASES.values(), ids=CASES.keys())
def test_loads_into_int4_modules_that_dequantize_to_the_reference(tmp_path, fmt, bias, tie, g):
    path, ref_path = _checkpoints(tmp_path, fmt, bias, tie, g)
    ref = from_pretrained(LlamaForCausalLM, ref_path, "cpu", torch.float32)
    model = load_quantized(LlamaForCausalLM, path, "cpu", torch.float32)
    weights = _int4_weights(model)
    assert len(weights) == 2 * len(LINEARS)  # every decoder linear; head and embedding float
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for name, w in weights.items():  # float32 holds fp16 scales and (8 - zero) * scale exactly
        assert torch.equal(w, ref.get_submodule(name).weight), name
        if bias:
            assert torch.equal(model.get_submodule(name).bias, ref.get_submodule(name).bias)
    (run,) = forwards(random_batches(VOCAB, 1, 12, seed=1))
    torch.testing.assert_close(run(model), run(ref))

    # fp16 -> bf16 rounds the scales (and (8 - zero) * scale once more): within an eighth of
    # each group's quantization step of the exact W.
    bf16 = load_quantized(LlamaForCausalLM, path, "cpu", torch.bfloat16)
    for name, w in _int4_weights(bf16).items():
        exact = model.get_submodule(name)
        step = _per_input(exact.scales_and_zeros[:, : w.shape[0], 0].t(), g, w.shape[1])
        assert ((w - weights[name]).abs() <= step / 8).all(), name


def test_recipe_loader_runs_it_as_saved_and_refuses_other_quantization(tmp_path):
    path, _ = _checkpoints(tmp_path, "gptq", False, False, 32)
    mcfg = recipe_config({"model": {"path": str(path)}}).model
    model, _, desc = build_model(mcfg, LlamaForCausalLM, torch.device("cpu"), torch.float32)
    assert desc == f"gptq-format checkpoint {path}"
    cfg = recipe_config({"quant": {"weights": "int4", "group_size": 32}})
    with pytest.raises(RecipeError, match=r"quantized as gptq format \(bits=4, group_size=32\)"):
        apply_transforms(model, cfg)


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as e:
        load_quantized(LlamaForCausalLM, path, "cpu", torch.float32)
    assert "\n" not in str(e.value)


def test_what_does_not_map_onto_int4_is_one_clear_line(tmp_path):
    path, _ = _checkpoints(tmp_path, "gptq_v2", True, False, 32)
    weights = path / "model.safetensors"
    state = load_file(weights)
    name = "model.layers.1.mlp.down_proj"
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    cases = {  # tensor changes, what the error says
        "act-order": (
            {f"{name}.g_idx": (perm // 32).to(torch.int32)},
            rf"{name}.g_idx is not contiguous groups of 32 .* desc_act=False",
        ),
        "no qzeros": ({f"{name}.qzeros": None}, rf"lacks {name}.qzeros \(it has {name}.qweight"),
        "shape": (
            {f"{name}.scales": state[f"{name}.scales"][:2].contiguous()},
            rf"{name}.scales is torch.float32 \(2, 64\); .* needs a float \(3, 64\)",
        ),
        "unexpected": ({"model.layers.0.extra.qweight": state[f"{name}.qweight"].clone()}, "extra"),
    }
    for changes, match in cases.values():
        new = {**state, **changes}
        save_file({k: v for k, v in new.items() if v is not None}, weights)
        _one_line_error(path, match)
    save_file(state, weights)

    config = json.loads((path / "config.json").read_text())
    for change, match in [
        ({"bits": 8}, "bits=8: only 4-bit GPTQ checkpoints load"),
        ({"group_size": -1}, "group_size=-1: the int4 kernels take groups of 32, 64, 128"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ]:
        quant = {**config["quantization_config"], **change}
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
        _one_line_error(path, match)
