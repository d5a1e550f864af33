"""Peer rows: the tools users already have, run on the same weights and requests.

`hf`: transformers' generate() (dynamic cache, its default attention), greedy or with the
same sampling parameters; per-token times come from a generation streamer.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from common.bench.runners import Runner
from common.bench.workload import batches
from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.engine.stop import StopRule
from common.nn.causal_lm import CausalLM

PEERS = ("hf",)


class _Clock(BaseStreamer):
    """Records the time of every generated step (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def hf_model(model: CausalLM) -> transformers.PreTrainedModel:
    """The transformers implementation of this architecture holding our exact weights."""
    cls = getattr(transformers, model.hf_class_name)
    dtype = next(model.parameters()).dtype
    hf = cls._from_config(cls.config_class(**model.args.to_hf_config()), dtype=dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf.to(next(model.parameters()).device).eval()


def hf_runner(model: CausalLM, max_batch: int, tokenizer: Any | None = None) -> Runner:
    hf = hf_model(model)
    eos = model.args.eos_ids
    stop = StopRule(eos, tokenizer)  # the engine's rule, applied to what generate() returned
    pad = eos[0] if eos else 0
    peak = [0]

    @torch.inference_mode()
    def generate(requests: list[Request]) -> list[Completion]:
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left padding, as transformers expects for decoders
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.max_new_tokens for r in requests)
        s = requests[0].sampling
        clock = _Clock()
        out = hf.generate(
            ids.to(hf.device),
            attention_mask=mask.to(hf.device),
            max_new_tokens=new,
            # ignore_eos: EOS may be generated but does not stop (as in the engine);
            # min_new_tokens would instead forbid EOS and change the tokens.
            eos_token_id=None if requests[0].ignore_eos else eos,
            do_sample=s.do_sample,
            temperature=s.temperature if s.do_sample else None,
            top_k=s.top_k if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None,
            repetition_penalty=s.repetition_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size,
            pad_token_id=pad,
            streamer=clock,
            return_dict_in_generate=True,
        )
        cache = out.past_key_values
        peak[0] = max(peak[0], sum(x.keys.nbytes + x.values.nbytes for x in cache.layers))
        comps = []
        for i, r in enumerate(requests):
            generated = out.sequences[i, width : width + r.max_new_tokens].tolist()
            tokens, reason = stop.cut(r, generated, r.max_new_tokens)
            comps.append(Completion(tokens, reason, clock.times[: len(tokens)]))
        return comps

    @torch.inference_mode()
    def teacher_forced_logits(prompt: list[int], continuation: list[int]) -> torch.Tensor:
        seq = torch.tensor([prompt + continuation[:-1]], device=hf.device)
        return hf(seq).logits[0, len(prompt) - 1 :].float()

    return Runner(
        generate,
        teacher_forced_logits,
        lambda: peak[0],
        lambda reqs: batches(reqs, max_batch),
    )


def peer_runner(name: str, model: CausalLM, max_batch: int, tokenizer: Any | None = None) -> Runner:
    """transformers' generate() runs static batches of up to max_batch requests."""
    if name == "hf":
        return hf_runner(model, max_batch, tokenizer)
    raise RecipeError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
