"""Our LLaMA matches transformers' LlamaForCausalLM on identical weights (fp32, 1e-4)."""

from dataclasses import replace

import pytest
import torch
import transformers
from hf_oracle import assert_prefill_and_decode_match, hf_pair

from common.transforms.fusion import fuse_projections
from models.llama import LlamaArgs, LlamaForCausalLM

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": dict(
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
}


def pair(case: str):
    return hf_pair(LlamaForCausalLM, LlamaArgs(**BASE, **CASES[case]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv,attn", [("dynamic", "eager"), ("contiguous", "sdpa")])
def test_prefill_and_decode_match_hf(case: str, kv: str, attn: str) -> None:
    assert_prefill_and_decode_match(*pair(case), kv, attn)


def test_rope_inv_freq_matches_hf_llama3() -> None:
    ours, hf = pair("llama3_rope")
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)


def test_args_round_trip_through_hf_config() -> None:
    args = LlamaArgs(**BASE, **CASES["llama3_rope"])
    cfg = transformers.LlamaConfig(**args.to_hf_config()).to_dict()
    assert LlamaArgs.from_hf_config(cfg) == replace(args, head_dim=args.kv_head_dim)


@pytest.mark.parametrize("case", ["gqa", "tied"])
def test_fused_projections_still_match_hf(case: str) -> None:
    ours, hf = pair(case)
    fuse_projections(ours)
    assert not any(n.endswith(("q_proj", "gate_proj")) for n, _ in ours.named_modules())
    assert_prefill_and_decode_match(ours, hf, "contiguous", "flash")
