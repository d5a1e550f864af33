"""Multimodal requests through the engine: every batching mode and KV kind gives each
request's tokens as if it ran alone; prefix caching keys blocks by tokens and image hash;
the vision-feature cache skips the encoder for a repeated image; overlapped encoding gives
the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vl_helpers import ARGS, image_request, synthetic_image

from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.feature_cache import FeatureCache
from common.kv.spec import KVSpec
from common.nn.vision import segment_attention
from models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

CPU = Device("cpu")


@pytest.fixture(scope="module")
def model():
    cls = Qwen2_5_VLForConditionalGeneration
    return from_seed(cls, ARGS[cls], seed=1)


def requests():
    a, b = synthetic_image(140, 84, 0), synthetic_image(56, 112, 1)
    return [
        image_request([a], seed=1),
        image_request([a, b], seed=2),
        image_request([], seed=3),
        image_request([b], seed=4),
    ]


_ALONE: dict[int, list[list[int]]] = {}


def alone(model) -> list[list[int]]:
    """Each request's tokens run by itself (computed once per model)."""
    if id(model) not in _ALONE:
        engine = Engine(model, CPU, "dynamic")
        _ALONE[id(model)] = [engine.generate([r])[0].tokens for r in requests()]
    return _ALONE[id(model)]


ENGINES = {
    "dynamic_static": dict(kv_kind="dynamic"),
    "contiguous_static": dict(kv_kind="contiguous", attention="sdpa"),
    "paged_static": dict(kv_kind="paged", attention="flash"),
    "paged_continuous": dict(kv_kind="paged", scheduler=SchedulerParams("continuous", max_batch=2)),
    # 7-token chunks cut the images' placeholder runs across steps
    "paged_chunked": dict(
        kv_kind="paged", scheduler=SchedulerParams("continuous", max_batch=3, max_tokens_per_step=7)
    ),
    "no_kv_cache": dict(kv_kind="none"),
}


@pytest.mark.parametrize("name", ENGINES)
def test_batched_requests_match_alone(model, name: str) -> None:
    engine = Engine(model, CPU, **ENGINES[name])
    got = [c.tokens for c in engine.generate(requests())]
    assert got == alone(model)


def test_teacher_forced_logits_predict_generated_tokens(model) -> None:
    req = requests()[1]
    engine = Engine(model, CPU, "paged")
    out = engine.generate([req])[0].tokens
    logits = engine.teacher_forced_logits(req.prompt, out, req.mm_items)
    assert logits.argmax(-1).tolist() == out


def _cached_tokens(engine: Engine, req) -> int:
    """Tokens of req's prompt the prefix cache would serve now."""
    blocks = engine._paged.blocks
    cached = blocks.allocate("probe", req.prompt, req.extra_keys)
    blocks.free("probe")
    return cached


def test_prefix_cache_never_shares_kv_across_images(model) -> None:
    a, b = synthetic_image(140, 84, 0), synthetic_image(140, 84, 9)  # same size, other pixels
    first, other, same = (image_request([im], seed=5) for im in (a, b, a))
    assert first.prompt == other.prompt == same.prompt  # equal tokens: only the image differs
    # a pool of 64 blocks: room to keep every request's blocks cached
    spec = KVSpec("paged", block_size=4, budget_bytes=64 * 4 * 512, prefix_cache=True)
    engine = Engine(model, CPU, spec)
    engine.generate([first])
    start = first.mm_items[0].start
    # the same image: every full block of the prompt is shared
    assert _cached_tokens(engine, same) == len(first.prompt) // 4 * 4
    # the other image: only the blocks before its placeholders are shared
    assert _cached_tokens(engine, other) == start // 4 * 4
    fresh = Engine(model, CPU, "paged")
    assert engine.generate([other])[0].tokens == fresh.generate([other])[0].tokens
    engine.runner.encoder.stats.clear()
    assert engine.generate([same])[0].tokens == fresh.generate([same])[0].tokens
    # the same image's placeholders all came from cached KV: its encoder never ran
    assert engine.runner.encoder.stats["encoded_items"] == 0


def test_vision_cache_skips_encoder_for_repeated_images(model) -> None:
    reqs = requests() * 2  # every image seen again
    plain = Engine(model, CPU, "paged")
    cached = Engine(model, CPU, "paged", feature_cache_bytes=1 << 20)
    want = [c.tokens for c in plain.generate(reqs)]
    assert [c.tokens for c in cached.generate(reqs)] == want
    items = sum(len(r.mm_items) for r in reqs)
    assert plain.stats["encoder_encoded_items"] == items
    assert cached.stats["encoder_encoded_items"] == 2  # two distinct images
    assert cached.stats["encoder_cache_hits"] == items - 2


def test_encode_overlap_gives_same_tokens(model) -> None:
    sched = SchedulerParams("continuous", max_batch=1)
    overlap = Engine(model, CPU, "paged", scheduler=sched, encode_overlap=True)
    assert [c.tokens for c in overlap.generate(requests())] == alone(model)
    stats = overlap.stats
    assert stats["encoder_encoded_items"] == 4  # each image once, some in the background
    assert stats["encoder_hidden_s"] > 0


def test_segment_attention_is_block_diagonal_sdpa() -> None:
    q, k, v = (torch.randn(23, 2, 8) for _ in range(3))
    bounds = [0, 4, 8, 15, 19, 23]  # lengths 4, 4, 7, 4, 4: grouped by length
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([4, 4, 7, 4, 4]))
    mask = seg[:, None] == seg[None, :]
    want = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), mask)
    torch.testing.assert_close(segment_attention(q, k, v, bounds), want.transpose(0, 1))


def test_feature_cache_is_lru_within_budget() -> None:
    cache = FeatureCache(budget_bytes=3 * 64)  # three [4, 4] fp32 tensors
    for key in (b"a", b"b", b"c"):
        cache.put(key, torch.zeros(4, 4))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", torch.zeros(4, 4))  # evicts b
    assert cache.get(b"b") is None and cache.get(b"c") is not None
    assert cache.nbytes <= cache.budget and cache.evictions == 1
    cache.put(b"huge", torch.zeros(100, 100))  # larger than the budget: not kept
    assert cache.get(b"huge") is None


def test_text_model_refuses_images() -> None:
    from tiny import TINY_LLAMA

    from common.core.errors import RecipeError
    from models.llama import LlamaForCausalLM

    engine = Engine(from_seed(LlamaForCausalLM, TINY_LLAMA, 0), CPU)
    with pytest.raises(RecipeError, match="takes no images"):
        engine.check(image_request([synthetic_image(56, 56, 0)]))


def test_qwen2_vl_class_runs_too() -> None:
    cls = Qwen2VLForConditionalGeneration
    model = from_seed(cls, ARGS[cls], seed=2)
    engine = Engine(model, CPU, "paged", scheduler=SchedulerParams("continuous", max_batch=2))
    got = [c.tokens for c in engine.generate(requests())]
    assert got == alone(model)


def test_language_opts_quantize_the_language_half(model) -> None:
    import copy

    from tiny import recipe_config

    from common.quant.int8 import Int8WeightOnlyLinear
    from common.transforms.registry import apply_transforms

    opts = recipe_config({"fusion": {"projections": True}, "quant": {"weights": "int8"}})
    m = apply_transforms(copy.deepcopy(model), opts)
    assert not any(isinstance(x, Int8WeightOnlyLinear) for x in m.model.visual.modules())
    assert isinstance(m.lm_head, Int8WeightOnlyLinear)
    assert isinstance(m.model.language_model.layers[0].self_attn.qkv_proj, Int8WeightOnlyLinear)
    reqs = requests()
    engine = Engine(m, CPU, "paged", attention="flash")
    outs = engine.generate(reqs)
    assert [len(c.tokens) for c in outs] == [r.max_new_tokens for r in reqs]
    # the same image features as the float model: the tower was left alone
    torch.testing.assert_close(
        m.encode(list(reqs[0].mm_items))[0], model.encode(list(reqs[0].mm_items))[0]
    )


def test_decode_reads_no_vision_weights(model) -> None:
    from common.parallel.measured import decode_weight_bytes, weight_bytes

    tower = weight_bytes(model.model.visual)
    embed = model.model.language_model.embed_tokens.weight.nbytes  # untied: one row read
    assert decode_weight_bytes(model) == weight_bytes(model) - tower - embed
