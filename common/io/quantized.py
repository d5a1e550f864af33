"""Quantized checkpoints: quantize once, load many times without the float weights.

A quantized checkpoint is an ordinary HF model directory: model.safetensors holds the
scheme's state dict (common/quant/scheme.py: int8 tables under NAME.weight plus
NAME.weight_scale, everything else as in the float model), config.json is the float model's
plus `quantization_config` (transformers' key; quant_method "llm_recipes", the scheme and its
options), and the tokenizer files are copied. Loading builds the model on the meta device,
lets the scheme swap in its modules from the saved tables, and checks names, shapes and
values as strictly as a float checkpoint; the loaded model remembers its quantization_config,
so asking for other quantization opts on it is an error (common/transforms/registry.py).
GPTQ checkpoints written by AutoGPTQ, GPTQModel or transformers (quant_method "gptq") load
the same way into the int4 modules (common/quant/gptq_format.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.core.errors import RecipeError
from common.io.checkpoint import (
    SAFE_SINGLE,
    _check_finite,
    _find_weight_files,
    _first_line,
    _open_checkpoint,
    _tie,
    _tied_weights,
    _write_safetensors,
    build_empty,
    check_architecture,
    read_hf_config,
)
from common.nn.causal_lm import CausalLM
from common.quant.gptq_format import METHOD as GPTQ
from common.quant.gptq_format import gptq_format, load_gptq
from common.quant.scheme import SCHEMES, QuantScheme, get_scheme
from common.transforms.fusion import fuse_projections

KEY = "quantization_config"
FUSED = "fused_projections"  # layout, not quantization: q/k/v and gate/up stacked when saved
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's quantization_config, or None for a float checkpoint."""
    config = read_hf_config(path).get(KEY)
    if config is not None and not isinstance(config, dict):
        raise RecipeError(f"{path}/config.json: {KEY} must be an object, got {config!r}")
    return config


def save_quantized(
    model: CausalLM,
    scheme: QuantScheme,
    path: str | Path,
    source: str | Path | None = None,
    fused: bool = False,
) -> Path:
    """Write `model` (quantized by `scheme`; fused: fuse_projections ran before) to directory
    `path`, which must not exist or be empty; config.json comes from `source` (the float
    checkpoint) or the model's own args. Written into a temporary directory and renamed, so a
    failure leaves no partial checkpoint."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RecipeError(f"{path} exists and is not an empty directory: choose another quant.save")
    if source is not None:
        source = Path(source).expanduser()
        config = read_hf_config(source)
        config.pop(KEY, None)
    else:
        import transformers

        hf_cls = getattr(transformers, model.hf_class_name)
        config = hf_cls.config_class(**model.args.to_hf_config()).to_dict()
        config["architectures"] = [model.hf_class_name]
    config[KEY] = {**scheme.quantization_config(), FUSED: fused}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        out = Path(tmp) / path.name
        out.mkdir()
        _write_safetensors(out / SAFE_SINGLE, scheme.state_dict(model))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in EXTRA_FILES if source is not None else ():
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        if path.exists():
            path.rmdir()
        os.replace(out, path)
    return path


def load_quantized(
    cls: type[CausalLM], path: str | Path, device: torch.device | str, dtype: torch.dtype
) -> CausalLM:
    """The quantized model saved in `path` (no rounding: the tables are read as saved)."""
    path = Path(path).expanduser()
    config = read_hf_config(path)
    check_architecture(cls, config, path)
    saved = quantization_config(path)
    if saved is None:
        raise RecipeError(f"{path} is a float checkpoint (config.json has no {KEY})")
    name, method = saved.get("scheme"), saved.get("quant_method")
    gptq = gptq_format(saved, path) if method == GPTQ else None  # AutoGPTQ/GPTQModel layout
    if gptq is None and (method != "llm_recipes" or name not in SCHEMES):
        raise RecipeError(
            f"{path}: {KEY} quant_method {method!r} scheme {name!r} is not one this project "
            f"reads: quant_method 'llm_recipes' with scheme {', '.join(SCHEMES)}, or {GPTQ!r}"
        )
    scheme_config = {k: v for k, v in saved.items() if k != FUSED}
    model = build_empty(lambda: cls(cls.args_cls.from_hf_config(config)))
    _tie(model, _tied_weights(model))  # a tied pair is one table, saved once
    if saved.get(FUSED):
        fuse_projections(model)
    files, is_pickle = _find_weight_files(path)
    if is_pickle:
        raise RecipeError(f"{path}: a quantized checkpoint must be safetensors, found pickles")
    state: dict[str, torch.Tensor] = {}
    with _open_checkpoint(files, False) as found:
        for key, entry in found.items():
            try:
                value = entry.read()
            except Exception as e:  # a truncated or corrupt file fails here
                raise RecipeError(
                    f"{entry.file}: cannot read tensor {key}: {_first_line(e)}"
                ) from e
            _check_finite(key, entry.file, value, dtype)
            state[key] = value.to(dtype) if value.is_floating_point() else value
    if gptq is not None:
        model = load_gptq(model, state, gptq, dtype)
    else:
        model = get_scheme(name).load_state_dict(model, state, scheme_config)
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise RecipeError(f"quantized checkpoint {path} lacks {', '.join(meta[:5])}")
    model.quantization_config = scheme_config
    return model.to(device).eval()
