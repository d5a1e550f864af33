"""Optimizations are config choices plus model transforms `apply(model, cfg) -> model`.

Each configs/opt/NAME.yaml adds `opts.NAME: {devices: [...]}` and sets only its own keys;
choices (attention backend, KV cache kind) are read by the engine, transforms run here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from common.core.errors import RecipeError
from common.device.select import Device
from common.quant.int8 import quantize_int8
from common.transforms.fusion import fuse_projections


def available_opts(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / "opt").glob("*.yaml"))


def check_opts_supported(opts: Any, device: Device) -> None:
    """An opt the device cannot run is an error before any model is built."""
    for name, spec in opts.items():
        devices = list(spec.get("devices", []))
        if device.type not in devices:
            raise RecipeError(
                f"opt {name!r} cannot run on {device.type}; it supports {', '.join(devices)}"
            )


def _fuse(model: nn.Module, cfg: Any) -> nn.Module:
    return fuse_projections(model) if cfg.fusion.projections else model


def _quantize(model: nn.Module, cfg: Any) -> nn.Module:
    kind = cfg.quant.weights
    if kind == "none":
        return model
    if kind == "int8":
        return quantize_int8(model)
    raise RecipeError(f"unknown quant.weights {kind!r}; choose none or int8")


TRANSFORMS: list[Callable[[nn.Module, Any], nn.Module]] = [_fuse, _quantize]


def apply_transforms(model: nn.Module, cfg: Any) -> nn.Module:
    for transform in TRANSFORMS:
        model = transform(model, cfg)
    return model
