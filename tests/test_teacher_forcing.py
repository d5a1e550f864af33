"""Fidelity teacher-forces the baseline's tokens through a variant. Stepwise, it runs them as
generation does (the prompt, then one decode step per token), so a variant whose decode step
differs from its prefill (a compiled step, row-1 kernels) is compared on the path it is timed
on: its logits are exactly those generation computed, and a compiled step's graph is reused,
not recompiled. One-forward teacher forcing (perplexity) is left as it was."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.spec import KVSpec
from common.quant.scheme import get_scheme
from common.transforms.compile import compile_decode, compile_stats
from common.transforms.fusion import fuse_kernels, fuse_projections
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
pytestmark = pytest.mark.usefixtures("fresh_compile")
PROMPT, NEW = [5, 17, 33, 8, 61, 22, 9], 9
CASES = {  # name: (KV spec, attention, compiled, weights)
    "dynamic": (KVSpec("dynamic"), "eager", False, None),
    "contiguous compiled": (KVSpec("contiguous", static=True), "flash", True, None),
    "paged": (KVSpec("paged", block_size=4), "flash", False, None),
    "paged compiled": (KVSpec("paged", block_size=4, static=True), "flash", True, None),
    # int8 weights: row-1 kernels of their own (the head's too)
    "int8 compiled": (KVSpec("contiguous", static=True), "flash", True, "int8"),
}


def _model(compiled: bool, scheme: str | None) -> LlamaForCausalLM:
    model = from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.bfloat16)
    fuse_kernels(fuse_projections(model), add_norm=True, rotary=True)
    if scheme:
        model = get_scheme(scheme).quantize(model)
    if compiled:
        settings = SimpleNamespace(backend="aot_eager", mode=None, cpp_wrapper=False,
                                   freezing=False)  # fmt: skip
        compile_decode(model, settings)
    return model


@pytest.mark.parametrize("case", CASES)
def test_stepwise_logits_are_the_ones_generation_computed(case: str, monkeypatch):
    spec, attention, compiled, scheme = CASES[case]
    model = _model(compiled, scheme)
    sched = SchedulerParams(kind="continuous" if spec.paged else "static", max_batch=2)
    engine = Engine(model, CPU, spec, attention, sched)
    seen: list[torch.Tensor] = []
    head = model.logits
    monkeypatch.setattr(model, "logits", lambda h: seen.append(head(h)) or seen[-1])
    (out,) = engine.generate([Request(list(PROMPT), NEW, ignore_eos=True)])
    generated = torch.cat(seen).float()
    graphs = compile_stats(model).graphs if compiled else 0
    got = engine.teacher_forced_logits(PROMPT, out.tokens, stepwise=True)
    assert got.shape == generated.shape == (NEW, TINY_LLAMA.vocab_size)
    assert torch.equal(got, generated)
    if compiled:  # the decode steps ran the run's own graph
        assert compile_stats(model).graphs == graphs == 1


def test_one_forward_matches_stepwise_where_the_paths_agree():
    """Eager fp32 on a dynamic cache: prefill and decode steps are the same math, so the one
    forward (perplexity's) and the stepwise logits agree to rounding."""
    model = from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.float32)
    engine = Engine(model, CPU, KVSpec("dynamic"), "eager")
    tokens = [3, 14, 15, 92, 65]
    one = engine.teacher_forced_logits(PROMPT, tokens)
    step = engine.teacher_forced_logits(PROMPT, tokens, stepwise=True)
    torch.testing.assert_close(step, one, rtol=1e-4, atol=1e-4)
