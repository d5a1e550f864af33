"""Shared oracle check: our model against the transformers class of the same architecture."""

from __future__ import annotations

import torch
import transformers

from common.device.select import Device
from common.engine.engine import Engine
from common.nn.causal_lm import CausalLM, ModelArgs


def hf_pair(cls: type[CausalLM], args: ModelArgs) -> tuple[CausalLM, transformers.PreTrainedModel]:
    """A random transformers model and ours holding the very same weights."""
    hf_cls = getattr(transformers, cls.hf_class_name)
    hf = hf_cls(hf_cls.config_class(**args.to_hf_config())).eval()
    ours = cls(args).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    if args.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    assert set(ours.state_dict()) == set(hf.state_dict())
    return ours, hf


def assert_prefill_and_decode_match(
    ours: CausalLM, hf: transformers.PreTrainedModel, kv: str, attn: str, steps: int = 8
) -> None:
    """Logits within 1e-4 (fp32) for a 20-token prefill and `steps` greedy decode steps."""
    engine = Engine(ours, Device("cpu"), kv_kind=kv, attention=attn)
    prompt = torch.randint(0, ours.args.vocab_size, (1, 20))
    cache = engine.new_cache(1, 20 + steps)
    with torch.inference_mode():
        got = ours.logits(engine.forward(cache, prompt, torch.arange(20)[None], prompt >= 0))
        out = hf(prompt, use_cache=True)
        torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            pos = torch.tensor([[20 + step]])
            got = ours.logits(engine.forward(cache, tok, pos, tok >= 0))
            out = hf(tok, past_key_values=past, use_cache=True)
            torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
