"""The fuse opt: each fused kernel equals the unfused ops it replaces, bit for bit (the sum is
rounded before the norm, and rotary's products and sum round as torch's separate ops do);
whole tiny LLaMA and GLM models give the same logits fused and unfused, bit for bit with
add+norm and rotary fused under each implementation, and within rounding with the
projections stacked too (a wider matmul may sum in another order)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import TINY_LLAMA

from common import ops
from common.device.select import Device
from common.engine.engine import Engine
from common.io.checkpoint import from_seed
from common.ops.rms_norm import add_rms_norm, rms_norm
from common.ops.rotary import rotary, rotary_torch
from common.transforms.fusion import fuse_kernels, fuse_projections
from models.glm import GlmArgs, GlmForCausalLM
from models.llama import LlamaForCausalLM

DTYPES = (torch.float32, torch.bfloat16)
MODELS = {
    "llama": (LlamaForCausalLM, replace(TINY_LLAMA, hidden_size=64, num_attention_heads=4)),
    # partial (half) interleaved rotary, q/k/v biases, stacked gate_up already
    "glm": (
        GlmForCausalLM,
        GlmArgs(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),  # fmt: skip
}


@pytest.fixture(autouse=True)
def _own_choices(tmp_path):
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_add_rms_norm_is_the_add_then_rms_norm(impl: str, dtype: torch.dtype) -> None:
    x, res = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype) * 4
    w = torch.randn(96, dtype=dtype)
    y, h = add_rms_norm.impls[impl].fn(x, res, w, 1e-5)
    assert torch.equal(h, res + x)
    assert torch.equal(y, rms_norm.impls[impl].fn(res + x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [16, 8])  # full and partial rotary
def test_rotary_kernel_equals_torch_math(dtype: torch.dtype, interleaved: bool, rot: int) -> None:
    """q and k as the projection leaves them: strided views of one [B, T, (H + 2 Hkv) D]."""
    b, t, h, hkv, d = 2, 3, 4, 2, 16
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, dtype=dtype)
    q = qkv[..., : h * d].view(b, t, h, d).transpose(1, 2)
    k = qkv[..., h * d : (h + hkv) * d].view(b, t, hkv, d).transpose(1, 2)
    cos, sin = torch.randn(b, t, rot, dtype=dtype), torch.randn(b, t, rot, dtype=dtype)
    want = rotary_torch(q, k, cos, sin, interleaved)
    got = rotary.impls["cpp"].fn(q, k, cos, sin, interleaved)
    for a, w in zip(got, want):
        assert torch.equal(a, w)


def _model(name: str, dtype: torch.dtype):
    cls, args = MODELS[name]
    return from_seed(cls, args, 0, "cpu", dtype)


def _logits(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """Prefill then one decode step per token of `new`, on a contiguous cache: logits of each."""
    eng = Engine(model, Device("cpu"), "contiguous", "eager")
    cache = eng.new_cache(1, len(prompt) + len(new))
    out, pos = [], 0
    with torch.inference_mode():
        for chunk in [prompt, *([t] for t in new)]:
            ids = torch.tensor([chunk])
            positions = torch.arange(pos, pos + len(chunk))[None]
            hidden = eng.forward(cache, ids, positions, torch.ones_like(ids, dtype=torch.bool))
            out.append(model.logits(hidden[0]))
            pos += len(chunk)
    return torch.cat(out)


PROMPT, NEW = [5, 17, 33, 8, 61, 22, 9], [40, 3, 12]


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_fused_add_norm_and_rotary_are_bit_exact(name: str, dtype: torch.dtype, impl: str) -> None:
    ops.pin({"rms_norm": impl, "add_rms_norm": impl, "rotary": impl})
    want = _logits(_model(name, dtype), PROMPT, NEW)
    fused = fuse_kernels(_model(name, dtype), add_norm=True, rotary=True)
    assert torch.equal(_logits(fused, PROMPT, NEW), want)
    used = ops.chosen()
    assert any(k.startswith("add_rms_norm[") and v == f"{impl} (pinned)" for k, v in used.items())
    assert any(k.startswith("rotary[") and v == f"{impl} (pinned)" for k, v in used.items())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_everything_fused_matches_unfused(name: str, dtype: torch.dtype) -> None:
    want = _logits(_model(name, dtype), PROMPT, NEW)
    fused = fuse_kernels(fuse_projections(_model(name, dtype)), add_norm=True, rotary=True)
    got = _logits(fused, PROMPT, NEW)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # a different summation order in a matmul is one bf16 rounding, then propagated
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
