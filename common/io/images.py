"""Images into model inputs: files read with PIL (or seeded synthetic images), preprocessed
by the model's own transformers image processor (its PIL backend: no torchvision), and
placed in a prompt as the model's placeholder tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import transformers
from PIL import Image, UnidentifiedImageError

from common.core.errors import RecipeError
from common.core.request import MultimodalItem, Request
from common.engine.multimodal import content_digest
from common.nn.causal_lm import CausalLM, MultimodalLM

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def image_processor(
    model: CausalLM,
    path: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Any:
    """The model's transformers image processor: a checkpoint's preprocessor_config.json when
    it has one, else the model's patch settings; min/max_pixels bound an image's resized area."""
    if not isinstance(model, MultimodalLM):
        raise RecipeError(f"{type(model).__name__} takes no images; choose a text workload")
    cls = getattr(transformers, model.image_processor)
    bounds = {
        k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
    }
    if path and (Path(path) / PREPROCESSOR_CONFIG).is_file():
        return cls.from_pretrained(path, **bounds)
    return cls(**model.image_processor_config(), **bounds)


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise RecipeError(f"cannot read image {path}: {str(e).splitlines()[0]}") from e


def synthetic_image(height: int, width: int, seed: int) -> Image.Image:
    """A seeded RGB image: smooth color gradients plus noise (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c * rng.uniform(0, 6)) for c in range(3)], -1) * 80 + 128
    noise = rng.normal(0, 20, (height, width, 3))
    pixels = np.clip(base + noise + 20 * y[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_inputs(processor: Any, image: Image.Image) -> dict:
    """{pixel_values [patches, C * T * P * P], image_grid_thw [1, 3]} for one image."""
    out = processor(images=[image], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def multimodal_request(
    model: MultimodalLM,
    processor: Any,
    parts: list[list[int] | Image.Image],
    max_new_tokens: int,
    **kw: Any,
) -> Request:
    """A request from text token ids and images in order: each image becomes the model's
    placeholder tokens plus a MultimodalItem keyed by a hash of its pixel values."""
    prompt: list[int] = []
    items = []
    for part in parts:
        if isinstance(part, Image.Image):
            inputs = image_inputs(processor, part)
            length = int(inputs["image_grid_thw"].prod()) // processor.merge_size**2
            tokens, offset = model.image_placeholder(length)
            digest = content_digest(inputs["pixel_values"], inputs["image_grid_thw"])
            items.append(MultimodalItem(len(prompt) + offset, length, digest, inputs))
            prompt += tokens
        else:
            prompt += list(part)
    return Request(prompt, max_new_tokens, mm_items=tuple(items), **kw)
