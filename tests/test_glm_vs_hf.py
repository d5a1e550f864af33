"""Our GLM-4 matches transformers' GlmForCausalLM on identical weights (fp32, 1e-4)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from hf_oracle import assert_prefill_and_decode_match, hf_pair
from omegaconf import OmegaConf

from common.core.errors import RecipeError
from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.io.checkpoint import from_pretrained
from common.transforms.fusion import fuse_projections
from models.glm import GlmArgs, GlmForCausalLM

MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs/model/glm4_9b.yaml"

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    eos_token_id=[126, 127],
)
CASES = {
    "glm4": dict(num_key_value_heads=2),  # partial interleaved rotary, q/k/v bias
    "full_rotary_no_bias": dict(
        num_key_value_heads=4, partial_rotary_factor=1.0, attention_bias=False
    ),
    "tied_head_dim": dict(
        num_key_value_heads=1, head_dim=32, rope_theta=500.0, tie_word_embeddings=True
    ),
}


def hf_glm(args: GlmArgs) -> transformers.GlmForCausalLM:
    return transformers.GlmForCausalLM(transformers.GlmConfig(**args.to_hf_config())).eval()


def pair(case: str):
    return hf_pair(GlmForCausalLM, GlmArgs(**BASE, **CASES[case]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv,attn", [("dynamic", "eager"), ("contiguous", "sdpa")])
def test_prefill_and_decode_match_hf(case: str, kv: str, attn: str) -> None:
    assert_prefill_and_decode_match(*pair(case), kv, attn)


def test_rotary_inv_freq_matches_hf() -> None:
    ours, hf = pair("glm4")
    assert ours.args.rotary_dim == ours.args.kv_head_dim // 2
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("case", CASES)
def test_args_round_trip_through_hf_config(case: str) -> None:
    args = GlmArgs(**BASE, **CASES[case])
    cfg = transformers.GlmConfig(**args.to_hf_config()).to_dict()
    assert GlmArgs.from_hf_config(cfg) == replace(args, head_dim=args.kv_head_dim)


def test_reads_published_top_level_rope_keys() -> None:
    """glm-4-9b-chat-hf's config.json predates rope_parameters."""
    d = {**BASE, "num_key_value_heads": 2, "rope_theta": 500.0, "partial_rotary_factor": 0.25}
    args = GlmArgs.from_hf_config(d)
    assert (args.rope_theta, args.partial_rotary_factor) == (500.0, 0.25)


def test_full_preset_is_glm4_9b() -> None:
    """transformers' GlmConfig defaults are THUDM/glm-4-9b-chat-hf's config."""
    cfg = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIG))
    full = GlmArgs(**cfg["common"], **cfg["presets"]["full"])
    assert full == GlmArgs.from_hf_config(transformers.GlmConfig().to_dict())


def test_refuses_what_it_cannot_run() -> None:
    with pytest.raises(RecipeError, match="model_type 'chatglm'.*glm-4-9b-chat-hf"):
        GlmArgs.from_hf_config({"model_type": "chatglm", "num_layers": 40})
    scaled = {**BASE, "num_key_value_heads": 2, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(RecipeError, match="unsupported rope_type 'linear'"):
        GlmArgs.from_hf_config(scaled)


def test_from_pretrained_greedy_matches_hf_generate(tmp_path: Path) -> None:
    args = GlmArgs(**BASE, **CASES["glm4"])
    hf = hf_glm(args)
    prompts = [[3, 17, 42, 99, 5], [64, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19]]

    def hf_greedy(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        return out[0, len(prompt) :].tolist()

    # Make a token that prompt 0 generates mid-way the EOS, so stopping is exercised.
    first = hf_greedy(prompts[0])
    eos = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    hf.config.eos_token_id = hf.generation_config.eos_token_id = [127, eos]
    hf.save_pretrained(tmp_path)

    ours = from_pretrained(GlmForCausalLM, tmp_path)
    assert ours.args.eos_ids == [127, eos]
    engine = Engine(ours, Device("cpu"))
    got = engine.generate([Request(p, max_new_tokens=12) for p in prompts])
    assert [c.tokens for c in got] == [hf_greedy(p) for p in prompts]
    assert got[0].finish_reason == "eos" and got[0].tokens[-1] == eos
    for c in got:
        assert c.finish_reason == ("eos" if c.tokens[-1] in (127, eos) else "length")


def test_fused_qkv_with_bias_still_matches_hf() -> None:
    ours, hf = pair("glm4")
    fuse_projections(ours)
    assert ours.model.layers[0].self_attn.qkv_proj.bias is not None
    assert_prefill_and_decode_match(ours, hf, "dynamic", "flash")
