"""Optimizations are config choices plus model transforms `apply(model, cfg) -> model`.

Each configs/opt/NAME.yaml adds `opts.NAME: {devices, requires, conflicts}` (an OptSpec) and
sets only its own keys; choices (attention backend, KV cache kind) are read by the engine,
transforms run here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from common.core.config import OptSpec
from common.core.errors import RecipeError
from common.device.select import Device
from common.quant.data import byte_encoder, load_texts, token_blocks
from common.quant.scheme import configured_scheme
from common.quant.skip import skip_filter
from common.transforms.calibrate import layerwise
from common.transforms.fusion import fuse_projections


def available_opts(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / "opt").glob("*.yaml"))


def opt_specs(config_dir: Path) -> dict[str, OptSpec]:
    """Every opt's declaration, read from its own configs/opt/NAME.yaml."""
    schema = OmegaConf.structured(OptSpec)
    return {
        name: OmegaConf.to_object(
            OmegaConf.merge(schema, OmegaConf.load(config_dir / "opt" / f"{name}.yaml").opts[name])
        )
        for name in available_opts(config_dir)
    }


def check_combination(names: list[str], specs: dict[str, OptSpec]) -> None:
    """One variant's opts: each known, each one's requirements selected, no two in conflict."""
    for name in names:
        if name not in specs:
            raise RecipeError(f"unknown opt {name!r}; available: {', '.join(sorted(specs))}")
    chosen = set(names)
    for name in names:
        if missing := [r for r in specs[name].requires if r not in chosen]:
            valid = ",".join([*missing, *names])
            raise RecipeError(
                f"opt {name!r} requires {', '.join(missing)}; add it, e.g. +opt={valid}"
            )
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if b in specs[a].conflicts or a in specs[b].conflicts:
                raise RecipeError(f"opts {a!r} and {b!r} conflict: choose one of them")


def check_opts_supported(opts: Any, device: Device) -> None:
    """An opt the device cannot run is an error before any model is built."""
    for name, spec in opts.items():
        devices = list(spec.get("devices", []))
        if device.type not in devices:
            raise RecipeError(
                f"opt {name!r} cannot run on {device.type}; it supports {', '.join(devices)}"
            )


def _fuse(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    return fuse_projections(model) if cfg.fusion.projections else model


def encoder(tokenizer: Any, vocab_size: int) -> Callable[[str], list[int]]:
    """Text -> token ids: the checkpoint's tokenizer, or bytes for a seeded preset."""
    if tokenizer is None:
        return byte_encoder(vocab_size)
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _quantize(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    quant = cfg.quant
    if quant.weights == "none":
        return model
    scheme = configured_scheme(quant)
    skip = skip_filter(model, list(quant.skip))
    calibration = None
    if getattr(scheme, "calibrated", False):
        c = quant.calib
        texts = load_texts(c.path, c.dataset, c.split, "calib")
        encode = encoder(tokenizer, model.args.vocab_size)
        calibration = layerwise(model, token_blocks(texts, encode, c.num_samples, c.seq_len))
    return scheme.quantize(model, calibration, skip=skip)


# transform(model, cfg, tokenizer) -> model; the tokenizer (or None) encodes calibration text.
TRANSFORMS: list[Callable[[nn.Module, Any, Any], nn.Module]] = [_fuse, _quantize]


def apply_transforms(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    for transform in TRANSFORMS:
        model = transform(model, cfg, tokenizer)
    return model
