"""Our LLaMA matches transformers' LlamaForCausalLM on identical weights (fp32, 1e-4)."""

from dataclasses import replace

import pytest
import torch
import transformers

from common.device import Device
from common.engine import Engine
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


def pair(case: str) -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM]:
    args = LlamaArgs(**BASE, **CASES[case])
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config())).eval()
    ours = LlamaForCausalLM(args).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    if args.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    assert set(ours.state_dict()) == set(hf.state_dict())
    return ours, hf


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv,attn", [("dynamic", "eager"), ("contiguous", "sdpa")])
def test_prefill_and_decode_match_hf(case: str, kv: str, attn: str) -> None:
    ours, hf = pair(case)
    engine = Engine(ours, Device("cpu"), kv_kind=kv, attention=attn)
    prompt = torch.randint(0, 128, (1, 20))
    cache = engine.new_cache(1, 40)
    pos = torch.arange(20)[None]
    with torch.inference_mode():
        got = ours.logits(engine.forward(cache, prompt, pos, torch.ones_like(prompt, dtype=bool)))
        out = hf(prompt, use_cache=True)
        torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(8):
            p = torch.tensor([[20 + step]])
            got = ours.logits(engine.forward(cache, tok, p, torch.ones_like(tok, dtype=bool)))
            out = hf(tok, past_key_values=past, use_cache=True)
            torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)


def test_rope_inv_freq_matches_hf_llama3() -> None:
    ours, hf = pair("llama3_rope")
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)


def test_args_round_trip_through_hf_config() -> None:
    args = LlamaArgs(**BASE, **CASES["llama3_rope"])
    cfg = transformers.LlamaConfig(**args.to_hf_config()).to_dict()
    assert LlamaArgs.from_hf_config(cfg) == replace(args, head_dim=args.kv_head_dim)
