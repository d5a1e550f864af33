"""Tiny Qwen2-VL / Qwen2.5-VL configs and image requests for the multimodal tests."""

from __future__ import annotations

import functools
import random

from common.core.request import Request
from common.io.images import image_processor, multimodal_request
from common.io.images import synthetic_image as synthetic_image
from models.qwen2_vl import (
    Qwen2_5_VLArgs,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLArgs,
    Qwen2VLForConditionalGeneration,
)

IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    mrope_section=[2, 3, 3],
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
)
ARGS = {
    Qwen2VLForConditionalGeneration: Qwen2VLArgs(
        **TEXT, vision_config=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2)
    ),
    # windows of 2 x 2 merged units (56 px): 5 x 3 merged units leave partial edge windows
    Qwen2_5_VLForConditionalGeneration: Qwen2_5_VLArgs(
        **TEXT,
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
    ),  # fmt: skip
}


@functools.cache
def _tiny():
    model = Qwen2VLForConditionalGeneration(ARGS[Qwen2VLForConditionalGeneration])
    return model, image_processor(model)


def image_request(images, new: int = 8, seed: int = 0) -> Request:
    """Random text ids around each image: text, image, text, image, ..., text."""
    model, processor = _tiny()
    rng = random.Random(seed)
    parts = [[rng.randrange(0, 100) for _ in range(5)]]
    for im in images:
        parts += [im, [rng.randrange(0, 100) for _ in range(4)]]
    return multimodal_request(model, processor, parts, new, ignore_eos=True)
