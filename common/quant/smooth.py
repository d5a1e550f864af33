"""SmoothQuant's smoothing (Xiao et al., 2023): move activation outliers into the weights.

For a linear y = x W^T and any s > 0 per input channel, y = (x / s)(W * s)^T exactly. With
s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), the few input channels with huge activations
shrink and the weights' matching columns grow, so both are easy to round to int8.

Where x / s goes is found by watching a calibration forward, not from the model's code: a
linear whose input is the very tensor a norm module returned (q/k/v, gate/up in a pre-norm
decoder) gets s folded into that norm's weight, one s shared by every linear the norm feeds
(their max|W| is taken over all of them); any other linear (o_proj, down_proj) keeps 1/s as an
explicit per-input-channel multiplier that the activation quantization applies for free.
A norm is any module whose class name ends in "Norm" with a 1-D weight (and optional bias)
that scales its output per channel, which RMSNorm and LayerNorm do; a norm whose output also
feeds a linear that is not smoothed (a tied LM head) is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from common.core.errors import RecipeError

_MIN = 1e-5  # SmoothQuant's floor for s and for max|W| (a dead channel must not divide by 0)

Calibration = Iterable[Callable[[nn.Module], object]]  # each runs one forward of the model


@dataclass
class Stats:
    """Per linear (by identity): max |x| per input channel over all calibration tokens, and
    the norm whose output was its input on every call (None if any call came from elsewhere)."""

    amax: dict[nn.Linear, Tensor] = field(default_factory=dict)
    feeder: dict[nn.Linear, nn.Module | None] = field(default_factory=dict)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("Norm") and isinstance(weight, Tensor) and weight.dim() == 1
    )


@torch.no_grad()
def collect(model: nn.Module, calibration: Calibration) -> Stats:
    """Run the calibration forwards with hooks recording every linear's input statistics."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    stats = Stats()
    produced: dict[int, tuple[Tensor, nn.Module]] = {}  # id(output) -> (output, norm): one batch

    def norm_hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        produced[id(out)] = (out, module)

    def linear_hook(module: nn.Linear, args: tuple) -> None:
        x = args[0]
        amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        old = stats.amax.get(module)
        stats.amax[module] = amax if old is None else torch.maximum(old, amax)
        hit = produced.get(id(x))
        norm = hit[1] if hit is not None and hit[0] is x else None
        if module not in stats.feeder:
            stats.feeder[module] = norm
        elif stats.feeder[module] is not norm:
            stats.feeder[module] = None

    handles = [m.register_forward_pre_hook(linear_hook) for m in linears]
    handles += [m.register_forward_hook(norm_hook) for m in model.modules() if _is_norm(m)]
    try:
        batches = 0
        for run in calibration:
            run(model)
            produced.clear()
            batches += 1
    finally:
        for h in handles:
            h.remove()
    if not batches:
        raise RecipeError("smoothing needs calibration batches; got none")
    return stats


def _scales(x_amax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    w_amax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = x_amax.pow(alpha) / w_amax.clamp(min=_MIN).pow(1 - alpha)
    return s.clamp(min=_MIN)


@torch.no_grad()
def smooth(
    model: nn.Module, calibration: Calibration, linears: list[nn.Linear], alpha: float
) -> dict[nn.Linear, Tensor]:
    """Smooth `linears` in place (float, no rounding beyond the dtype's); returns the explicit
    input multiplier 1/s (fp32 [K]) of each linear that no norm feeds."""
    if not 0.0 <= alpha <= 1.0:
        raise RecipeError(
            f"quant.alpha={alpha} must be in [0, 1] (SmoothQuant's migration strength)"
        )
    stats = collect(model, calibration)
    chosen = set(linears)
    if unseen := [m for m in linears if m not in stats.amax]:
        raise RecipeError(f"{len(unseen)} linear(s) never ran during calibration: cannot smooth")
    groups: dict[nn.Module, list[nn.Linear]] = {}
    for linear, norm in stats.feeder.items():
        if norm is not None:
            groups.setdefault(norm, []).append(linear)
    explicit: dict[nn.Linear, Tensor] = {}
    for norm, members in groups.items():
        s = _scales(stats.amax[members[0]], [m.weight for m in members], alpha)
        # A norm also feeding a linear left out (a tied LM head) must keep its output.
        if s.shape != norm.weight.shape or not chosen.issuperset(members):
            for m in members:
                stats.feeder[m] = None
            continue
        norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((bias.float() / s).to(bias.dtype))
        for m in members:
            m.weight.copy_((m.weight.float() * s).to(m.weight.dtype))
    for linear in linears:
        if stats.feeder[linear] is None:
            s = _scales(stats.amax[linear], [linear.weight], alpha)
            # The multiplier is stored in the weight's dtype: fold the rounded one, so that
            # (x * inv) (W / inv) is exact up to float rounding.
            inv = (1.0 / s).to(linear.weight.dtype)
            linear.weight.copy_((linear.weight.float() / inv.float()).to(linear.weight.dtype))
            explicit[linear] = inv
    return explicit
