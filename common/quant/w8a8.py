"""W8A8 (SmoothQuant): per-output-channel int8 weights, per-token dynamic int8 activations,
int8 x int8 matmuls accumulated in int32.

Quantizing activations is what makes the matmul itself integer (VNNI's vpdpbusd, AMX, NPU
cube units), but LLM activations have a few channels 10-100x larger than the rest, and one
per-token scale sized for them rounds every other channel to nearly nothing. Smoothing
(common/quant/smooth.py, quant.alpha) moves that range into the weights first.

Embeddings and a LM head tied to them stay weight-only int8 (one shared table, as the int8
scheme does): the head's input feeds the logits directly and a lookup has no matmul to speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from common import ops
from common.core.errors import RecipeError
from common.quant.formats import W8A8 as W8A8_FORMAT
from common.quant.formats import WeightFormat
from common.quant.int8 import (
    Int8WeightOnly,
    Int8WeightOnlyLinear,
    _quantize,
    load_int8,
    quantize_int8,
)
from common.quant.smooth import Calibration, smooth


class W8A8Linear(Int8WeightOnlyLinear):
    """int8 weights [N, K] and scales [N] like the weight-only linear, plus an optional
    per-input-channel multiplier `smooth` [K] applied before the activations are quantized."""

    def __init__(
        self,
        weight_int8: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        smooth: Tensor | None = None,
    ) -> None:
        super().__init__(weight_int8, scales, bias)
        self.register_buffer("smooth", smooth)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        dtype = x.dtype
        scales = self.scales if self.scales.dtype == dtype else self.scales.to(dtype)
        smooth = self.smooth
        if smooth is not None and smooth.dtype != dtype:
            smooth = smooth.to(dtype)
        out = ops.w8a8_linear(x2d, self.weight_int8, scales, smooth)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, smooth={self.smooth is not None}"


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _activation_linears(
    model: nn.Module, skip: Callable[[str, nn.Module], bool] | None = None
) -> list[nn.Linear]:
    """The linears that get int8 activations: all but those sharing an embedding's table
    and those skip(name, module) keeps in float."""
    tied = _embedding_weights(model)
    seen: dict[int, nn.Linear] = {}
    for name, m in model.named_modules():
        kept = skip is not None and skip(name, m)
        if type(m) is nn.Linear and id(m.weight) not in tied and not kept:
            seen[id(m)] = m
    return list(seen.values())


def _swap(model: nn.Module, make: dict[nn.Module, nn.Module]) -> None:
    """Replace each key module by its value wherever it is registered."""
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):  # every name, shared or not
            if child in make:
                setattr(module, child_name, make[child])


class W8A8:
    """The w8a8 scheme (a common.quant.scheme.QuantScheme). Checkpoint names as the int8
    scheme's (NAME.weight int8, NAME.weight_scale) plus NAME.smooth where a linear keeps an
    explicit multiplier; the norms hold their smoothed weights under their own names."""

    name = "w8a8"
    kernels = ("w8a8_linear",)

    def __init__(self, alpha: float = 0.5, smooth: bool = True) -> None:
        self.alpha, self.smooth = float(alpha), bool(smooth)

    needs_forwards = True  # calibration: whole-model forwards (common/transforms/forwards.py)

    def configured(self, quant: Any) -> W8A8:
        """This scheme with quant.alpha and quant.smooth."""
        return W8A8(getattr(quant, "alpha", self.alpha), getattr(quant, "smooth", self.smooth))

    def weight_format(self) -> WeightFormat:
        return W8A8_FORMAT

    def quantization_config(self) -> dict[str, Any]:
        return {
            "quant_method": "llm_recipes",
            "scheme": self.name,
            "bits": 8,
            "symmetric": True,
            "granularity": "per_output_channel",
            "activations": {"bits": 8, "dynamic": True, "granularity": "per_token"},
            "smooth": self.smooth,
            "alpha": self.alpha if self.smooth else None,
            "modules": ["Linear", "Embedding"],
        }

    @torch.no_grad()
    def quantize(
        self,
        model: nn.Module,
        calibration: Calibration | None = None,
        skip: Callable[[str, nn.Module], bool] | None = None,
    ) -> nn.Module:
        """Smooth (from `calibration`), then quantize in place every linear and embedding
        except those skip(name, module) keeps in float."""
        linears = _activation_linears(model, skip)
        explicit: dict[nn.Linear, Tensor] = {}
        if self.smooth:
            if calibration is None:
                raise RecipeError(
                    "w8a8 smoothing needs calibration data; give it or set quant.smooth=false"
                )
            explicit = smooth(model, calibration, linears, self.alpha)
        places: dict[nn.Module, list[tuple[nn.Module, str]]] = {}  # linear -> where it sits
        for parent in model.modules():
            for child_name, child in parent._modules.items():
                if child in explicit or child in linears:
                    places.setdefault(child, []).append((parent, child_name))

        def weight_only_skips(name: str, m: nn.Module) -> bool:  # embeddings, tied head
            return m in places or (skip is not None and skip(name, m))

        model = quantize_int8(model, skip=weight_only_skips)
        del linears
        # One linear at a time, dropping every reference to it: each float weight is freed
        # once replaced, so the peak is the int8 model plus one float matrix.
        while places:
            linear, where = places.popitem()
            weight_int8, scales = _quantize(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach()
            new = W8A8Linear(weight_int8, scales, bias, explicit.pop(linear, None))
            for parent, child_name in where:
                setattr(parent, child_name, new)
            del linear
        return model

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return Int8WeightOnly().state_dict(model)  # same renames; NAME.smooth kept as is

    @torch.no_grad()
    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, Any]
    ) -> nn.Module:
        if config.get("scheme") != self.name:
            raise RecipeError(f"checkpoint quantization {config!r} is not the {self.name} scheme")
        linears = {id(m) for m in _activation_linears(model)}
        names = {n for n, m in model.named_modules(remove_duplicate=False) if id(m) in linears}
        smooths = {k.removesuffix(".smooth"): v for k, v in state.items() if k.endswith(".smooth")}
        model = load_int8(model, {k: v for k, v in state.items() if not k.endswith(".smooth")})
        # load_int8 made every quantized linear weight-only; the ones that were activation
        # linears (by name, found in the float model) become W8A8Linear.
        make: dict[nn.Module, nn.Module] = {}
        for name, module in model.named_modules():
            if name in names and type(module) is Int8WeightOnlyLinear:
                smooth_inv = smooths.pop(name, None)
                if smooth_inv is not None and smooth_inv.shape != (module.in_features,):
                    raise RecipeError(
                        f"quantized checkpoint does not fit the model: {name}.smooth "
                        f"{tuple(smooth_inv.shape)} for {module.in_features} input channels"
                    )
                make[module] = W8A8Linear(
                    module.weight_int8, module.scales, module.bias, smooth_inv
                )
        if smooths:
            raise RecipeError(
                f"quantized checkpoint does not fit the model: unexpected {list(smooths)[:5]}"
            )
        _swap(model, make)
        return model
