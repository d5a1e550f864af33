"""Every weight scheme composes with the KV, attention and scheduling opts: the quantized model
gives the same greedy tokens under flash attention, paged KV and continuous batching as on the
plain path (fp32: exact), and int8 KV stays close to it."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.spec import KVSpec
from common.quant.calibrated import AWQ, GPTQ
from common.quant.data import byte_encoder, default_texts, token_blocks
from common.quant.int4 import Int4WeightOnly
from common.quant.int8 import Int8WeightOnly
from common.quant.w4a8 import W4A8
from common.transforms.calibrate import layerwise
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
PROMPTS = ([5, 17, 33, 8, 61, 22, 9], [40, 3], [12, 70, 44, 19, 88])
NEW = 6
SCHEMES = {
    "int8": Int8WeightOnly(),
    "int4": Int4WeightOnly(32),
    "w4a8": W4A8(32),
    "gptq": GPTQ(4, 32, act_order=True),
    "awq": AWQ(32, 5),
}
COMBOS = {  # combination class -> (KV spec, attention backend, scheduler)
    "flash_attn": (KVSpec("contiguous"), "flash", None),
    "paged_kv": (KVSpec("paged", block_size=4), "sdpa", None),
    "paged_kv+cont_batch": (KVSpec("paged", block_size=4), "flash", SchedulerParams("continuous")),
}


@functools.cache
def quantized(scheme: str) -> LlamaForCausalLM:
    model = from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.float32)
    blocks = token_blocks(default_texts("calib"), byte_encoder(TINY_LLAMA.vocab_size), 4, 32)
    calibration = (
        layerwise(model, blocks) if getattr(SCHEMES[scheme], "calibrated", False) else None
    )
    return SCHEMES[scheme].quantize(model, calibration)


def _generate(model, kv: KVSpec, attn: str, sched: SchedulerParams | None) -> list[list[int]]:
    eng = Engine(model, CPU, kv, attn, sched)
    return [c.tokens for c in eng.generate([Request(list(p), NEW) for p in PROMPTS])]


@functools.cache
def plain(scheme: str) -> list[list[int]]:
    return _generate(quantized(scheme), KVSpec("dynamic"), "eager", None)


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_composes(scheme: str, combo: str) -> None:
    kv, attn, sched = COMBOS[combo]
    assert _generate(quantized(scheme), kv, attn, sched) == plain(scheme)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_composes_with_int8_kv(scheme: str, kind: str) -> None:
    model = quantized(scheme)
    ref = Engine(model, CPU, KVSpec("dynamic")).teacher_forced_logits([1, 5, 9, 13], [7, 3, 4])
    eng = Engine(model, CPU, KVSpec(kind, int8=True, block_size=4), "sdpa")
    got = eng.teacher_forced_logits([1, 5, 9, 13], [7, 3, 4])
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    assert len(_generate(model, KVSpec(kind, int8=True, block_size=4), "sdpa", None)[0]) == NEW
