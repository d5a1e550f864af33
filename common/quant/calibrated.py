"""Schemes that round with calibration data, layer by layer: GPTQ and AWQ.

Both consume a layer-wise calibration (common/transforms/calibrate.py walks the model): for
each decoder layer in order, the inputs its linears see when the layers before it are already
quantized, and the groups of linears that read one input with what produces it. A scheme
replaces the layer's linears in place before the walk runs the layer to feed the next one.
The walk ends with a step for the LM head (the model itself, its input the final norm's
output): GPTQ rounds the head there too, the most sensitive matrix of a small model, and a
tied embedding shares its table; what no step rounded is rounded to nearest.
Both produce the int4 (or, GPTQ with bits=8, the int8) modules, so they run the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from common.core.errors import RecipeError
from common.quant.awq import search_clip, search_scales
from common.quant.formats import DEFAULT_INT4_GROUP, INT8, WeightFormat, check_group_size
from common.quant.formats import int4 as int4_format
from common.quant.gptq import Hessian, gptq
from common.quant.int4 import (
    Int4Table,
    int4_quantization_config,
    int4_state_dict,
    load_int4_state_dict,
    quantize_int4,
)
from common.quant.int8 import Int8WeightOnly, quantize_int8

Skip = Callable[[str, nn.Module], bool]
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # linears AWQ never clips


@dataclass
class ScaleGroup:
    """Linears (names inside the layer) reading one input, and what produces that input: an
    RMSNorm-like module (rows None: its weight scales each channel) or a linear (`rows` of
    its output, slice(None) for all)."""

    linears: list[str]
    prev: nn.Module
    rows: slice | None = None


@dataclass
class LayerStep:
    """One decoder layer during calibration."""

    module: nn.Module
    prefix: str  # its qualified name in the model
    inputs: dict[str, Tensor]  # linear name inside the layer -> its inputs [tokens, K]
    groups: list[ScaleGroup] = field(default_factory=list)

    def skipped(self, skip: Skip | None, name: str) -> bool:
        full = f"{self.prefix}.{name}" if self.prefix else name
        return skip is not None and skip(full, self.module.get_submodule(name))


def _need(calibration: Iterable[LayerStep] | None, scheme: str) -> Iterable[LayerStep]:
    if calibration is None:
        raise RecipeError(f"quant.weights={scheme} needs calibration data (quant.calib.*)")
    return calibration


def _skipped(step: LayerStep, skip: Skip | None, name: str, module: nn.Module) -> bool:
    return step.skipped(skip, name)


class _SavedAsInt4Or8:
    """Checkpoints of a calibrated scheme: its modules are int4 (or int8) ones, so they are
    saved and loaded as those (common/quant/int4.py, int8.py), without calibrating again."""

    name: str
    bits: int = 4
    group_size: int = DEFAULT_INT4_GROUP

    def weight_format(self) -> WeightFormat:
        return int4_format(self.group_size) if self.bits == 4 else INT8

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return int4_state_dict(model) if self.bits == 4 else Int8WeightOnly().state_dict(model)

    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, object]
    ) -> nn.Module:
        if config.get("scheme") != self.name:
            raise RecipeError(f"checkpoint quantization {config!r} is not the {self.name} scheme")
        if config.get("bits", 4) == 8:
            return Int8WeightOnly().load_state_dict(model, state, {**config, "scheme": "int8"})
        return load_int4_state_dict(model, state, int(config["group_size"]))


class GPTQ(_SavedAsInt4Or8):
    """GPTQ rounding (common/quant/gptq.py): int4 group-wise or int8 per channel."""

    name = "gptq"
    calibrated = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int = DEFAULT_INT4_GROUP,
        act_order: bool = False,
        damp: float = 0.01,
        clip: bool = True,
    ) -> None:
        if bits not in (4, 8):
            raise RecipeError(f"quant.bits must be 4 or 8 for gptq, got {bits!r}")
        check_group_size(group_size)
        self.bits, self.group_size, self.act_order, self.damp = bits, group_size, act_order, damp
        self.clip = clip

    @property
    def kernels(self) -> tuple[str, ...]:
        return ("int4_linear",) if self.bits == 4 else ("int8_linear",)

    def configured(self, quant: Any) -> GPTQ:
        return type(self)(
            quant.bits,
            quant.group_size or DEFAULT_INT4_GROUP,
            quant.act_order,
            quant.damp,
            quant.clip,
        )

    def quantize(
        self,
        model: nn.Module,
        calibration: Iterable[LayerStep] | None = None,
        skip: Skip | None = None,
    ) -> nn.Module:
        for step in _need(calibration, self.name):
            hessians: dict[int, Hessian] = {}  # linears sharing an input share its Hessian
            tables: dict[int, Int4Table | tuple[Tensor, Tensor]] = {}  # id(weight) -> table
            for name, x in step.inputs.items():
                if step.skipped(skip, name):
                    continue
                if id(x) not in hessians:
                    hessians[id(x)] = Hessian(x.shape[-1], x.device)
                    hessians[id(x)].add(x)
                weight = step.module.get_submodule(name).weight
                tables[id(weight)] = self._table(weight, hessians[id(x)].h)
            # Swap the rounded linears in; in the head step (the model) also whatever is left
            # in float, so a tied embedding gets the head's table.
            self._swap(step.module, partial(_skipped, step, skip), tables)
        return self._swap(model, skip, {})

    def _table(self, weight: Tensor, hessian: Tensor) -> Int4Table | tuple[Tensor, Tensor]:
        q, scales, zeros = gptq(
            weight, hessian, self.bits, self.group_size, self.act_order, self.damp, self.clip
        )
        return (q, scales) if self.bits == 8 else Int4Table.build(q, scales, zeros, self.group_size)

    def _swap(self, module: nn.Module, skip: Skip | None, tables: dict) -> nn.Module:
        """Quantize module's float linears and embeddings: GPTQ's tables where it made one,
        round to nearest elsewhere."""
        if self.bits == 8:
            return quantize_int8(module, skip, lambda names, w: tables.get(id(w)))
        return quantize_int4(module, self.group_size, skip, lambda names, w: tables.get(id(w)))

    def quantization_config(self) -> dict[str, object]:
        return {
            "quant_method": "llm_recipes",
            "scheme": self.name,
            "bits": self.bits,
            "group_size": self.group_size if self.bits == 4 else None,
            "desc_act": self.act_order,
            "damp_percent": self.damp,
            "symmetric": self.bits == 8,
        }


class AWQ(_SavedAsInt4Or8):
    """Activation-aware scaling (common/quant/awq.py) folded into the float model, each
    group's weights clipped where that lowers the output error, then int4 round to nearest."""

    name = "awq"
    calibrated = True
    kernels = ("int4_linear",)

    def __init__(
        self, group_size: int = DEFAULT_INT4_GROUP, grid: int = 20, clip: bool = True
    ) -> None:
        check_group_size(group_size)
        if grid < 1:
            raise RecipeError(f"quant.awq_grid must be >= 1, got {grid!r}")
        self.group_size, self.grid, self.clip = group_size, grid, clip

    def configured(self, quant: Any) -> AWQ:
        return type(self)(quant.group_size or DEFAULT_INT4_GROUP, quant.awq_grid, quant.clip)

    @torch.no_grad()
    def quantize(
        self,
        model: nn.Module,
        calibration: Iterable[LayerStep] | None = None,
        skip: Skip | None = None,
    ) -> nn.Module:
        for step in _need(calibration, self.name):
            inputs = dict(step.inputs)  # each linear's input once the scales are folded
            for group in step.groups:
                linears = [step.module.get_submodule(n) for n in group.linears]
                x = step.inputs[group.linears[0]]
                s = search_scales(x, [m.weight for m in linears], self.group_size, self.grid)
                fold_scales(s, linears, group.prev, group.rows)
                inputs.update(dict.fromkeys(group.linears, x / s))
            for name, x in inputs.items():
                # Clipping q and k would shift every attention score: AWQ leaves them be.
                if self.clip and not name.endswith(NO_CLIP) and not step.skipped(skip, name):
                    w = step.module.get_submodule(name).weight
                    w.copy_(search_clip(x, w, self.group_size))
            quantize_int4(step.module, self.group_size, partial(_skipped, step, skip))
        return quantize_int4(model, self.group_size, skip)

    def quantization_config(self) -> dict[str, object]:
        return int4_quantization_config(self.name, self.group_size)


@torch.no_grad()
def fold_scales(s: Tensor, linears: list[nn.Linear], prev: nn.Module, rows: slice | None) -> None:
    """W_i[:, c] *= s[c] for the readers, and the producer's channel c /= s[c]: exact in float."""
    for m in linears:
        m.weight.copy_(m.weight.float() * s)
    if rows is None:  # a norm's per-channel weight
        prev.weight.copy_(prev.weight.float() / s)
        return
    prev.weight[rows] = (prev.weight[rows].float() / s[:, None]).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows] = (prev.bias[rows].float() / s).to(prev.bias.dtype)
