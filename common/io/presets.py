"""Build a recipe's model from its config: a real checkpoint, or a seeded preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from common.core.errors import RecipeError
from common.io.checkpoint import from_pretrained, from_seed
from common.io.quantized import load_quantized, quantization_config
from common.nn.causal_lm import CausalLM
from common.parallel.placement import Placement

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def preset_args(mcfg: Any, model_cls: type[CausalLM]):
    presets = dict(mcfg.presets)
    if mcfg.scale not in presets:
        raise RecipeError(f"unknown model.scale {mcfg.scale!r}; choose one of {', '.join(presets)}")
    if mcfg.scale == "full" and not mcfg.allow_random_full:
        raise RecipeError(
            "model.scale=full with random weights would allocate the real model; "
            "give model.path=DIR (real weights) or set model.allow_random_full=true"
        )
    plain = OmegaConf.to_container  # lists must be lists for transformers' strict configs
    return model_cls.args_cls(**{**plain(mcfg.common), **plain(presets[mcfg.scale])})


def load_tokenizer(path: str | Path):
    """A tokenizer from the checkpoint dir when it has one; never remote code."""
    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise RecipeError(
            f"tokenizer in {path} could not be loaded: {str(e).splitlines()[0]}"
        ) from e


def build_model(
    mcfg: Any,
    model_cls: type[CausalLM],
    device: torch.device,
    dtype: torch.dtype,
    place: Callable[[CausalLM], Placement] | None = None,
):
    """(model, tokenizer or None, description of the weights used). place: this rank's
    share of a parallel run (common/parallel/placement.py)."""
    if mcfg.path and quantization_config(mcfg.path) is not None:
        if place is not None:
            raise RecipeError(
                f"{mcfg.path} is a quantized checkpoint, which loads on one device only; "
                "parallel.tp/pp need the float checkpoint (the opt quantizes each rank's shard)"
            )
        model = load_quantized(model_cls, mcfg.path, device, dtype)
        saved = model.quantization_config  # another tool's (GPTQ) names no scheme of ours
        scheme = saved.get("scheme") or f"{saved.get('quant_method')}-format"
        return model, load_tokenizer(mcfg.path), f"{scheme} checkpoint {mcfg.path}"
    if mcfg.path:
        model = from_pretrained(model_cls, mcfg.path, device, dtype, mcfg.allow_pickle, place)
        return model, load_tokenizer(mcfg.path), f"checkpoint {mcfg.path}"
    args = preset_args(mcfg, model_cls)
    model = from_seed(model_cls, args, mcfg.seed, device, dtype, place)
    return model, None, f"seeded random weights (seed {mcfg.seed}), scale {mcfg.scale}"


def build_draft(
    draft: Any,
    mcfg: Any,
    model_cls: type[CausalLM],
    device: torch.device,
    dtype: torch.dtype,
    vocab_size: int,
) -> tuple[CausalLM, str]:
    """Speculative decoding's draft model: a checkpoint (spec.draft.path), or a preset of the
    recipe's model (spec.draft.scale) with seeded weights and the target's vocabulary."""
    if draft.path:
        return from_pretrained(model_cls, draft.path, device, dtype, mcfg.allow_pickle), draft.path
    presets = dict(mcfg.presets)
    if draft.scale not in presets:
        raise RecipeError(
            f"unknown spec.draft.scale {draft.scale!r}; choose one of {', '.join(presets)}"
        )
    plain = OmegaConf.to_container
    fields = {**plain(mcfg.common), **plain(presets[draft.scale]), "vocab_size": vocab_size}
    model = from_seed(model_cls, model_cls.args_cls(**fields), draft.seed, device, dtype)
    return model, f"preset {draft.scale}, seed {draft.seed}"
