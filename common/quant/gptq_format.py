"""GPTQ checkpoints as AutoGPTQ, GPTQModel and transformers (through optimum) write them,
loaded into this project's int4 modules.

The layout, per quantized linear NAME with K inputs, N outputs and groups of g inputs, as
followed from AutoGPTQ (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py: QuantLinear.pack
and its torch forward), GPTQModel (gptqmodel/utils/model.py:
convert_gptq_v1_to_v2_format_module / convert_gptq_v2_to_v1_format_module) and transformers
(utils/quantization_config.py: GPTQConfig, which writes `checkpoint_format` and `format`):
- NAME.qweight int32 [K/8, N]: eight 4-bit q per word along the input dim, low bits first;
- NAME.qzeros int32 [K/g, N/8]: eight 4-bit zeros per word along the output dim, low first;
- NAME.scales fp16 [K/g, N]; NAME.g_idx int32 [K], each input's group; NAME.bias optional;
- W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
checkpoint_format "gptq" (v1, the default) stores zero - 1 (AutoGPTQ's pack: `zeros -= 1`);
GPTQModel writes v1 by subtracting 0x11111111 from each qzeros word and reads it by adding
it back, so a zero of 0 borrows from the next nibble; we read it as GPTQModel does.
"gptq_v2" stores the zero itself.

This project's int4 is W = (q - 8) * scale + zero' per group (common/quant/int4.py), so the
same q and scale with zero' = (8 - zero) * scale give the same W: a GPTQ checkpoint is
rewritten into the project's own int4 checkpoint layout and loaded by load_int4_state_dict,
onto the same dispatched kernels. That needs contiguous groups (g_idx[k] == k // g: what
desc_act=False writes, and act-order with static groups); other g_idx or bits are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.core.errors import RecipeError
from common.quant.formats import GROUP_SIZES
from common.quant.int4 import load_int4_state_dict, pack_nibbles

METHOD = "gptq"  # quantization_config.quant_method
ZERO_OFFSET = {"gptq": 0x11111111, "gptq_v2": 0}  # added to each qzeros word: v1's zero - 1
_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_REDO = "quantize the float checkpoint here instead (+opt=gptq, quant.act_order=true if wanted)"


@dataclass(frozen=True)
class GptqFormat:
    group_size: int
    zero_offset: int


def gptq_format(config: dict[str, Any], path: str | Path) -> GptqFormat:
    """The layout a GPTQ quantization_config describes; what does not map onto the int4
    kernels is one RecipeError line."""
    bits, group = config.get("bits"), config.get("group_size")
    fmt = config.get("checkpoint_format", config.get("format", "gptq"))
    if bits != 4:
        raise RecipeError(
            f"{path}: GPTQ checkpoint with bits={bits!r}: only 4-bit GPTQ checkpoints load "
            f"(onto the int4 kernels); {_REDO}, quant.bits=8 for int8"
        )
    if group not in GROUP_SIZES:
        raise RecipeError(
            f"{path}: GPTQ checkpoint with group_size={group!r}: the int4 kernels take groups "
            f"of {', '.join(map(str, GROUP_SIZES))}; {_REDO}"
        )
    if fmt not in ZERO_OFFSET:
        raise RecipeError(
            f"{path}: GPTQ checkpoint_format {fmt!r}: this loader reads "
            f"{' and '.join(ZERO_OFFSET)}; convert it to one of those with GPTQModel or {_REDO}"
        )
    return GptqFormat(group, ZERO_OFFSET[fmt])


def _nibbles(words: Tensor, dim: int) -> Tensor:
    """Eight 4-bit values per 32-bit word, low bits first, unpacked along `dim` (uint8; one
    shift at a time, so no temporary wider than a byte per weight)."""
    parts = [((words >> shift) & 15).to(torch.uint8) for shift in range(0, 32, 4)]
    return torch.stack(parts, dim + 1).flatten(dim, dim + 1)


def _checked(name: str, state: dict[str, Tensor], shape: torch.Size, g: int) -> list[Tensor]:
    """NAME's four GPTQ tensors, each of the dtype and shape an [N, K] weight needs."""
    n, k = shape
    groups = -(-k // g)
    want = {
        "qweight": (torch.int32, (-(-k // 8), n)),
        "qzeros": (torch.int32, (groups, -(-n // 8))),
        "scales": (None, (groups, n)),  # any float: already cast to the model dtype
        "g_idx": (torch.int32, (k,)),
    }
    out = []
    for leaf, (dtype, dims) in want.items():
        t = state.get(f"{name}.{leaf}")
        if t is None:
            have = ", ".join(f"{name}.{x}" for x in want if f"{name}.{x}" in state)
            raise RecipeError(f"GPTQ checkpoint lacks {name}.{leaf} (it has {have})")
        if tuple(t.shape) != dims or (dtype is not None and t.dtype != dtype):
            raise RecipeError(
                f"GPTQ checkpoint: {name}.{leaf} is {t.dtype} {tuple(t.shape)}; an [{n}, {k}] "
                f"linear in groups of {g} needs {dtype or 'a float'} {dims}"
            )
        out.append(t)
    return out


def to_int4_state(
    state: dict[str, Tensor], fmt: GptqFormat, weights: dict[str, torch.Size], dtype: torch.dtype
) -> dict[str, Tensor]:
    """`state` with every GPTQ linear rewritten into the project's int4 checkpoint layout
    (int4_state_dict's: NAME.qweight, NAME.scales, NAME.zeros); every other tensor (biases,
    float modules) as it is. weights: the model's weight shapes by name (NAME.weight)."""
    g = fmt.group_size
    names = {k.rpartition(".")[0] for k in state if k.rpartition(".")[2] in _LEAVES}
    out = {k: v for k, v in state.items() if k.rpartition(".")[2] not in _LEAVES}
    for name in sorted(names):
        shape = weights.get(f"{name}.weight")
        if shape is None:
            raise RecipeError(f"GPTQ checkpoint has {name}.* tensors, but the model has no {name}")
        qweight, qzeros, scales, g_idx = _checked(name, state, shape, g)
        n, k = shape
        if not torch.equal(g_idx.long(), torch.arange(k) // g):
            raise RecipeError(
                f"GPTQ checkpoint: {name}.g_idx is not contiguous groups of {g} (act-order "
                f"without static groups), which the int4 kernels cannot run; re-quantize with "
                f"desc_act=False or static_groups=True, or {_REDO}"
            )
        q = _nibbles(qweight, 0)[:k].t()  # [N, K]
        words = (qzeros.long() + fmt.zero_offset) & 0xFFFFFFFF  # v1: GPTQModel's v1 -> v2
        zero = _nibbles(words, 1)[:, :n].t().float()  # [N, K/g]
        # The scales were cast to the model dtype on reading: fp16 -> bf16 rounds them (3
        # mantissa bits fewer), fp32 keeps them exactly, and then zero' below is exact too.
        scale = scales.t().contiguous()
        k_pad = scale.shape[1] * g
        out[f"{name}.qweight"] = pack_nibbles(F.pad(q, (0, k_pad - k), value=8))
        out[f"{name}.scales"] = scale
        out[f"{name}.zeros"] = ((8 - zero) * scale.float()).to(dtype)
    return out


def load_gptq(
    model: nn.Module, state: dict[str, Tensor], fmt: GptqFormat, dtype: torch.dtype
) -> nn.Module:
    """Turn a float model (on the meta device or not) into the GPTQ checkpoint's int4 one;
    `state` holds the checkpoint's tensors, floats already cast to `dtype`."""
    weights = {k: t.shape for k, t in model.state_dict().items()}
    return load_int4_state_dict(model, to_int4_state(state, fmt, weights, dtype), fmt.group_size)
