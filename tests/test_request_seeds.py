"""Per-request seeds (SamplingParams.seed): a seeded request draws from a generator of its
own, so its sampled output is the same alone and in any batch, and differs across seeds."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.request import Request, SamplingParams
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.engine.spec import SpecConfig
from common.io.checkpoint import from_seed
from models.llama import LlamaForCausalLM

PROMPTS = ([5, 17, 33, 8, 61], [40, 3], [12, 70, 44, 19, 88, 2, 91], [77, 6, 6])
SAMPLING = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.95)


@functools.cache
def model() -> LlamaForCausalLM:
    return from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.float32)


def engine(kv: str, sched: str, spec: SpecConfig | None = None) -> Engine:
    return Engine(model(), Device("cpu"), kv, "eager", SchedulerParams(sched), spec=spec)


def request(i: int, seed: int | None) -> Request:
    return Request(list(PROMPTS[i]), 12, SamplingParams(**SAMPLING, seed=seed), ignore_eos=True)


@pytest.mark.parametrize(
    "kv,sched,spec",
    [("dynamic", "static", None), ("paged", "continuous", None),
     ("paged", "continuous", SpecConfig("ngram", 3))],
)  # fmt: skip
def test_seeded_request_is_independent_of_its_batch(kv, sched, spec) -> None:
    eng = engine(kv, sched, spec)
    alone = [eng.generate([request(i, 100 + i)], seed=i)[0].tokens for i in range(4)]
    batch = eng.generate([request(i, 100 + i) for i in range(4)], seed=99)
    assert [c.tokens for c in batch] == alone
    reordered = eng.generate([request(i, 100 + i) for i in (2, 0, 3, 1)], seed=7)
    assert [c.tokens for c in reordered] == [alone[i] for i in (2, 0, 3, 1)]


def test_seeds_matter() -> None:
    eng = engine("paged", "continuous")
    outs = {tuple(eng.generate([request(0, s)])[0].tokens) for s in range(6)}
    assert len(outs) > 1
    # without a seed, the call's generator decides: another call seed, another output
    unseeded = {tuple(eng.generate([request(0, None)], seed=s)[0].tokens) for s in range(6)}
    assert len(unseeded) > 1
