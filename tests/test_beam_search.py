"""Beam search against transformers' generate(num_beams=...) on identical weights, fp32:
the same sequences and the same sequence scores, for several length penalties and every
early_stopping mode, in the paged layout (forked, copy-on-write blocks) and the row layouts
(copied rows)."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from hf_oracle import hf_pair

from common.core.errors import RecipeError
from common.core.request import Request, SamplingParams
from common.device.select import Device
from common.engine.beam import BeamConfig
from common.engine.engine import Engine
from common.engine.spec import SpecConfig
from common.kv.spec import KVSpec
from models.llama import LlamaArgs, LlamaForCausalLM

ARGS = LlamaArgs(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    eos_token_id=5,
)  # fmt: skip
PROMPT = [7, 21, 3, 40, 11, 9]


@functools.cache
def pair(eos: int = 5):
    torch.manual_seed(3)  # the same weights whatever the EOS id
    ours, hf = hf_pair(LlamaForCausalLM, replace(ARGS, eos_token_id=eos))
    # sharper distributions, so EOS is reached by some beams within the budget
    with torch.no_grad():
        for m in (ours, hf):
            m.lm_head.weight.mul_(4.0)
    return ours, hf


def hf_beams(num_beams, new, length_penalty, early_stopping, eos=5, **kw):
    _, hf = pair(eos)
    out = hf.generate(
        torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        num_beams=num_beams, max_new_tokens=new, length_penalty=length_penalty,
        early_stopping=early_stopping, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=0, **kw,
    )  # fmt: skip
    seq = out.sequences[0, len(PROMPT) :].tolist()
    return seq, float(out.sequences_scores[0])


def ours_beams(kv, num_beams, new, length_penalty, early_stopping, eos=5, **sampling):
    ours, _ = pair(eos)
    eng = Engine(ours, Device("cpu"), KVSpec(kv), "eager",
                 beams=BeamConfig(num_beams, length_penalty, early_stopping))  # fmt: skip
    (c,) = eng.generate([Request(PROMPT, new, SamplingParams(**sampling))])
    return c, eng


@pytest.mark.parametrize("kv", ["paged", "contiguous", "dynamic"])
@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [(2, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (4, -0.5, False), (3, 1.5, True)],
)
def test_matches_transformers(kv, num_beams, length_penalty, early_stopping) -> None:
    new = 12
    want_seq, want_score = hf_beams(num_beams, new, length_penalty, early_stopping)
    got, _ = ours_beams(kv, num_beams, new, length_penalty, early_stopping)
    # the part transformers pads after the best hypothesis ends is not output
    assert got.tokens == want_seq[: len(got.tokens)]
    assert all(t == 0 for t in want_seq[len(got.tokens) :])
    assert got.score == pytest.approx(want_score, abs=1e-4)


def test_processors_and_eos_reached() -> None:
    want_seq, want_score = hf_beams(
        3, 16, 1.0, False, repetition_penalty=1.3, no_repeat_ngram_size=2
    )
    got, _ = ours_beams("paged", 3, 16, 1.0, False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert got.tokens == want_seq[: len(got.tokens)]
    assert got.score == pytest.approx(want_score, abs=1e-4)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_hypotheses_ending_at_eos(early_stopping) -> None:
    """EOS = the token greedy decoding repeats (41 here), so beams finish early and compete
    with running ones under each stopping rule."""
    want_seq, want_score = hf_beams(3, 10, 0.7, early_stopping, eos=41)
    got, _ = ours_beams("paged", 3, 10, 0.7, early_stopping, eos=41)
    assert got.tokens == want_seq[: len(got.tokens)]
    assert got.score == pytest.approx(want_score, abs=1e-4)
    assert got.finish_reason == "eos" and got.tokens[-1] == 41


def test_paged_beams_share_prompt_blocks() -> None:
    """Forked beams share the prompt's blocks: peak KV is far below num_beams full copies."""
    long_prompt = list(range(10, 58))  # 48 tokens: 3 full blocks of 16
    ours, _ = pair()
    peaks = {}
    for kv in ("paged", "contiguous"):
        eng = Engine(ours, Device("cpu"), KVSpec(kv), "eager", beams=BeamConfig(4))
        eng.generate([Request(long_prompt, 4, ignore_eos=True)])
        peaks[kv] = eng.peak_kv_bytes
    per_token = peaks["contiguous"] / (4 * (48 + 4))  # 4 rows of 52 slots
    # the prompt's 3 blocks once, plus one block per beam for its own tokens
    assert peaks["paged"] == (3 + 4) * 16 * per_token


def test_beam_search_errors() -> None:
    ours, _ = pair()
    with pytest.raises(RecipeError, match="early_stopping"):
        BeamConfig(2, 1.0, "sometimes")
    with pytest.raises(RecipeError, match="beam search"):
        Engine(ours, Device("cpu"), KVSpec("paged"), beams=BeamConfig(2), spec=SpecConfig())
    eng = Engine(ours, Device("cpu"), KVSpec("paged"), beams=BeamConfig(2))
    with pytest.raises(RecipeError, match="do_sample"):
        eng.generate([Request(PROMPT, 4, SamplingParams(do_sample=True))])
