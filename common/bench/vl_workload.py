"""The `vl` workload: requests of text and images for a multimodal model.

Generated: each request has `images_per_request` seeded synthetic images, each one an image
an earlier request used with probability `repeat` (a chat about the same picture, a product
catalogue), else a new one; then `prompt_len` random text tokens. From a file: one JSON
object per line, {"prompt": TEXT | "prompt_ids": [INT, ...], "images": [PATH, ...]} with an
optional "max_new_tokens"; paths are relative to the file. Images come first in the prompt,
as in Qwen-VL's chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from common.core.errors import RecipeError
from common.core.request import Request
from common.io.images import image_processor, load_image, multimodal_request, synthetic_image
from common.nn.causal_lm import CausalLM


def vl_requests(
    cfg: Any, model: CausalLM, tokenizer: Any | None = None, model_path: str | None = None
) -> list[Request]:
    """model_path: a checkpoint whose preprocessor_config.json sets the image processor."""
    processor = image_processor(model, model_path, cfg.min_pixels, cfg.max_pixels)
    if cfg.path:
        rows = _file_rows(cfg.path, cfg.max_new_tokens, tokenizer)
    else:
        rows = _generated_rows(cfg, model.args.vocab_size)
    return [
        multimodal_request(model, processor, [*images, ids], new, ignore_eos=cfg.ignore_eos)
        for images, ids, new in rows
    ]


def _generated_rows(cfg: Any, vocab: int) -> list[tuple[list, list[int], int]]:
    if cfg.num_requests <= 0 or cfg.prompt_len <= 0 or cfg.images_per_request < 0:
        raise RecipeError(
            "workload.num_requests and workload.prompt_len must be > 0 and "
            "workload.images_per_request >= 0"
        )
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens <= 0:
        raise RecipeError(f"workload.max_new_tokens must be an int > 0, got {cfg.max_new_tokens}")
    rng = random.Random(cfg.seed)
    height, width = cfg.image_size
    pool: list = []  # images used so far, the candidates for a repeat
    rows = []
    for _ in range(cfg.num_requests):
        images = []
        for _ in range(cfg.images_per_request):
            if pool and rng.random() < cfg.repeat:
                images.append(rng.choice(pool))
            else:
                pool.append(synthetic_image(height, width, seed=cfg.seed * 100_003 + len(pool)))
                images.append(pool[-1])
        ids = [rng.randrange(3, vocab) for _ in range(cfg.prompt_len)]
        rows.append((images, ids, cfg.max_new_tokens))
    return rows


def _file_rows(path: str, max_new: int, tokenizer: Any | None) -> list[tuple[list, list[int], int]]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"workload.path {path!r} is not a file")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise RecipeError(f'{where}: expected an object like {{"prompt": "...", "images": []}}')
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
        elif isinstance(row.get("prompt"), str):
            if tokenizer is None:
                raise RecipeError(f"{where}: text prompts need a tokenizer in model.path")
            ids = tokenizer(row["prompt"])["input_ids"]
        else:
            raise RecipeError(f"{where}: needs 'prompt' (text) or 'prompt_ids' (ints)")
        if not (isinstance(ids, list) and ids and all(type(t) is int for t in ids)):
            raise RecipeError(f"{where}: prompt_ids must be a non-empty list of ints")
        paths = row.get("images", [])
        if not (isinstance(paths, list) and all(isinstance(x, str) for x in paths)):
            raise RecipeError(f"{where}: images must be a list of file paths")
        new = row.get("max_new_tokens", max_new)
        if type(new) is not int or new <= 0:
            raise RecipeError(f"{where}: max_new_tokens must be an int > 0, got {new!r}")
        rows.append(([load_image(p.parent / x) for x in paths], ids, new))
    if not rows:
        raise RecipeError(f"workload.path {path!r} holds no requests")
    return rows
