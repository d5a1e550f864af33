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
from common.transforms.compile import compile_decode
from common.transforms.fast_linear import route_linears
from common.transforms.forwards import forwards
from common.transforms.fusion import fuse_kernels, fuse_projections


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
    fusion = cfg.fusion
    # A quantized checkpoint was loaded in the layout it was saved in (common/io/quantized.py).
    loaded_quantized = getattr(model, "quantization_config", None) is not None
    if fusion.projections and not loaded_quantized:
        fuse_projections(model)
    return fuse_kernels(model, fusion.add_norm, fusion.rotary)


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
    # A quantized checkpoint's loader sets quantization_config. Without a quantization opt it
    # runs as saved (a recipe's baseline row); another scheme or other options are an error.
    saved = getattr(model, "quantization_config", None)
    if saved is not None:
        check_saved_quantization(saved, quant)
        return model  # loaded quantized: nothing to round again
    skip = skip_filter(model, list(quant.skip))
    calibration = None
    layer_by_layer = getattr(scheme, "calibrated", False)  # gptq/awq: one layer at a time
    if layer_by_layer or getattr(scheme, "needs_forwards", False):  # w8a8: whole forwards
        c = quant.calib
        texts = load_texts(c.path, c.dataset, c.split, "calib")
        blocks = token_blocks(
            texts, encoder(tokenizer, model.args.vocab_size), c.num_samples, c.seq_len
        )
        calibration = layerwise(model, blocks) if layer_by_layer else forwards(blocks.split(1))
    return scheme.quantize(model, calibration, skip=skip)


def check_saved_quantization(saved: dict, quant: Any) -> None:
    """A quantized checkpoint runs only with the quantization it was made with (or none)."""
    if quant.weights == "none":
        return
    asked = configured_scheme(quant).quantization_config()
    if asked != saved:
        raise RecipeError(
            f"the checkpoint is quantized as {_describe(saved)} but the opts ask for "
            f"{_describe(asked)}; run it with the opts it was made with (none for a checkpoint "
            "quantized by another tool), or load the float checkpoint"
        )


def _describe(config: dict) -> str:
    extra = {k: v for k, v in config.items() if k in ("alpha", "smooth", "group_size", "bits")}
    name = config.get("scheme") or f"{config.get('quant_method')} format"  # another tool's
    return f"{name} ({', '.join(f'{k}={v}' for k, v in extra.items())})"


def _fast_linear(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    return route_linears(model) if cfg.fast_linear else model


def _compile(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    return compile_decode(model, cfg.compile) if cfg.compile.enabled else model


# transform(model, cfg, tokenizer) -> model; the tokenizer (or None) encodes calibration text.
# fast_linear after _quantize: the schemes swap exactly nn.Linear, and it takes what they leave.
TRANSFORMS: list[Callable[[nn.Module, Any, Any], nn.Module]] = [
    _fuse,
    _quantize,
    _fast_linear,
    _compile,
]


def apply_transforms(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    """The opts' transforms target the language model: a multimodal model's encoder
    (`encoder_modules`) is taken out while they run and keeps its own weights."""
    parked = []
    for name in getattr(model, "encoder_modules", ()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        parked.append((owner, leaf, owner._modules.pop(leaf)))
    try:
        for transform in TRANSFORMS:
            model = transform(model, cfg, tokenizer)
    finally:
        for owner, leaf, module in parked:
            owner._modules[leaf] = module
    return model
