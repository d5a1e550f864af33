"""Our Qwen2-VL / Qwen2.5-VL match transformers' classes on identical weights (fp32, 1e-4):
one image, two images of different sizes, and text only, in prefill and 8 decode steps;
checkpoints written by transformers' save_pretrained load with model.path and give its
greedy tokens. Images go through transformers' own Qwen2VLImageProcessor (PIL backend)."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from vl_helpers import ARGS, IMAGE, VISION_END, VISION_START, image_request, synthetic_image

from common.device.select import Device
from common.engine.engine import Engine
from common.io.checkpoint import from_pretrained
from models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

CLASSES = [Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration]
IMAGES = {  # (height, width) in pixels: grids of 10x6 and 4x8 patches (15 and 8 tokens)
    "one_image": [(140, 84)],
    "two_images": [(140, 84), (56, 112)],
    "text_only": [],
}


def hf_pair(cls):
    hf_cls = getattr(transformers, cls.hf_class_name)
    hf = hf_cls(hf_cls.config_class(**ARGS[cls].to_hf_config())).eval()
    ours = cls(ARGS[cls]).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, hf


def hf_inputs(req) -> dict:
    ids = torch.tensor([req.prompt])
    kw = {"input_ids": ids}
    if req.mm_items:
        kw["pixel_values"] = torch.cat([it.inputs["pixel_values"] for it in req.mm_items])
        kw["image_grid_thw"] = torch.cat([it.inputs["image_grid_thw"] for it in req.mm_items])
        kw["mm_token_type_ids"] = (ids == IMAGE).int()
    return kw


@pytest.mark.parametrize("case", IMAGES)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_prefill_and_decode_match_hf(cls, case: str) -> None:
    ours, hf = hf_pair(cls)
    req = image_request([synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES[case])])
    engine = Engine(ours, Device("cpu"), kv_kind="contiguous", attention="sdpa")
    runner = engine.runner
    content = runner.prepare(req)
    n, steps = len(req.prompt), 8
    cache = runner.new_rows(1, n + steps)
    with torch.inference_mode():
        ids = torch.tensor([req.prompt])
        pos = torch.arange(n)[None]
        extra = runner.extras([(content, 0, n)], pos)
        got = ours.logits(runner.forward(cache, ids, pos, ids >= 0, extra=extra))
        out = hf(**hf_inputs(req), use_cache=True)
        torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
        past, tok = out.cache, out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            pos = torch.tensor([[n + step]])
            extra = runner.extras([(content, n + step, 1)], pos)
            got = ours.logits(runner.forward(cache, tok, pos, tok >= 0, extra=extra))
            out = hf(tok, cache=past, use_cache=True)
            torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
            past, tok = out.cache, out.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_vision_features_match_hf(cls) -> None:
    ours, hf = hf_pair(cls)
    req = image_request([synthetic_image(140, 84, 0), synthetic_image(56, 112, 1)])
    kw = hf_inputs(req)
    with torch.inference_mode():
        want = hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
        got = ours.encode(list(req.mm_items))
    for g, w in zip(got, want.pooler_output):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["saved", "in_memory"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_saved_checkpoint_gives_hf_greedy_tokens(cls, layout: str, tmp_path) -> None:
    _, hf = hf_pair(cls)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    # save_pretrained writes the published layout (visual.*, model.*); transformers renames it
    # to model.visual.* / model.language_model.* when loading: both must load here
    assert any(k.startswith("visual.") for k in state)
    if layout == "in_memory":
        save_file(hf.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = from_pretrained(cls, tmp_path)
    req = image_request([synthetic_image(140, 84, 3), synthetic_image(56, 112, 4)], new=6)
    engine = Engine(ours, Device("cpu"), kv_kind="paged", attention="sdpa")
    got = engine.generate([req])[0].tokens
    with torch.inference_mode():
        want = hf.generate(**hf_inputs(req), max_new_tokens=6, do_sample=False)
    assert got == want[0, len(req.prompt) :].tolist()


def test_placeholders_are_bracketed() -> None:
    req = image_request([synthetic_image(56, 112, 0)])
    (item,) = req.mm_items
    assert req.prompt[item.start - 1] == VISION_START
    assert req.prompt[item.start + item.length] == VISION_END
    assert req.prompt[item.start : item.start + item.length] == [IMAGE] * item.length
