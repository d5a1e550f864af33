"""Group-wise asymmetric int4 weight-only quantization (round to nearest).

Every group of `group_size` consecutive input channels of an output channel gets a scale and
a zero: W ≈ (q - 8) * scale + zero with q in 0..15, scale = (max - min) / 15 and
zero = min + 8 * scale. Weights take 4 bits plus 2 x 16 bits per group (0.27x bf16 at group
128). GPTQ and AWQ (common/quant/calibrated.py) choose q (and rescale W) differently but
produce the same modules, so every int4 scheme runs the same kernels (ops.int4_linear).
Embedding tables are quantized the same way (a row is an output channel), so a tied LM head
and its embedding share one int4 table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import ops
from common.core.errors import RecipeError
from common.ops.int4_linear import ROW_ALIGN, dequantize_rows, pack, unpack_rows
from common.quant.formats import DEFAULT_INT4_GROUP, WeightFormat, check_group_size
from common.quant.formats import int4 as int4_format
from common.quant.int8 import _identity, _replace, load_rest

_MIN_RANGE = 1e-6  # a constant group still gets a usable scale


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def group_params(w: Tensor, group_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Asymmetric min/max params of w [N, K] (K a multiple of group_size) per group:
    (scales, zeros) [N, K/g] rounded to dtype (what the kernel reads)."""
    g = w.float().view(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo).clamp(min=_MIN_RANGE) / 15).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)
    return scales, zeros


def round_to_grid(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """q [N, K] (uint8 0..15) nearest to w [N, K] on the grid of per-group (scales, zeros)
    [N, K/g], against the stored (rounded) params."""
    n, k = w.shape
    s = scales.float().repeat_interleave(k // scales.shape[1], dim=1)
    z = zeros.float().repeat_interleave(k // scales.shape[1], dim=1)
    return ((w.float() - z) / s + 8).round_().clamp_(0, 15).to(torch.uint8)


def fake_quantize(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """w rounded to its int4 grid and dequantized (float32): what the int4 weight computes."""
    q = round_to_grid(w, scales, zeros).float()
    rep = w.shape[1] // scales.shape[1]
    return (q - 8) * scales.float().repeat_interleave(rep, 1) + zeros.float().repeat_interleave(
        rep, 1
    )


@dataclass(eq=False)
class Int4Table:
    """A packed int4 weight: rows padded to a multiple of 16, input channels to a multiple of
    the group size (padding is never read: padded inputs are zero, padded outputs dropped)."""

    packed: Tensor  # uint8 [N', K'/2], ops/int4_linear.py's layout
    scales_and_zeros: Tensor  # [K'/g, N', 2]
    group_size: int
    out_features: int
    in_features: int

    @classmethod
    def build(cls, q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Int4Table:
        """From q [N, K] (0..15) and per-group (scales, zeros) [N, ceil(K/g)]."""
        n, k = q.shape
        n_pad, k_pad = _ceil_to(n, ROW_ALIGN), _ceil_to(k, group_size)
        q = F.pad(q, (0, k_pad - k, 0, n_pad - n), value=8)
        sz = torch.stack([scales, zeros], -1)  # [N, G, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad - n))
        sz[n:, :, 0] = 1  # padded rows: a harmless scale
        return cls(pack(q).to(scales.device), sz.transpose(0, 1).contiguous(), group_size, n, k)


def pad_groups(w: Tensor, group_size: int) -> Tensor:
    """w [N, K] widened to a multiple of group_size with each row's last value: it cannot
    widen the last group's range, so a partial group is quantized over its real columns."""
    n, k = w.shape
    pad = _ceil_to(k, group_size) - k
    return torch.cat([w, w[:, -1:].expand(n, pad)], 1) if pad else w


def rtn(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round to nearest, group-wise: (q [N, K] uint8 0..15, scales, zeros [N, ceil(K/g)] in the
    weight's dtype). The last group of a K that group_size does not divide is quantized over
    its real columns only."""
    k = weight.shape[1]
    w = pad_groups(weight.detach().float(), group_size)
    scales, zeros = group_params(w, group_size, weight.dtype)
    return round_to_grid(w, scales, zeros)[:, :k], scales, zeros


def quantize_rtn(weight: Tensor, group_size: int) -> Int4Table:
    return Int4Table.build(*rtn(weight, group_size), group_size)


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear holding a packed int4 weight and per-group scales and zeros."""

    def __init__(self, table: Int4Table, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = table.out_features, table.in_features
        self.group_size = table.group_size
        self.register_buffer("weight_packed", table.packed)
        self.register_buffer("scales_and_zeros", table.scales_and_zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, table: Int4Table) -> Int4Linear:
        return cls(table, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        k_pad = self.weight_packed.shape[1] * 2
        if k_pad != self.in_features:
            x2d = F.pad(x2d, (0, k_pad - self.in_features))
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)
        out = ops.int4_linear(x2d, self.weight_packed, sz, self.group_size)
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class Int4Embedding(nn.Module):
    """Drop-in for nn.Embedding: rows dequantized from a packed int4 table on lookup."""

    lookup_table = True  # forward reads one row per token (the memory model counts it so)

    def __init__(self, table: Int4Table) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.group_size = table.group_size
        self.register_buffer("weight_packed", table.packed)
        self.register_buffer("scales_and_zeros", table.scales_and_zeros)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, table: Int4Table) -> Int4Embedding:
        return cls(table)

    def forward(self, ids: Tensor) -> Tensor:
        sz = self.scales_and_zeros
        rows = dequantize_rows(self.weight_packed, sz, self.group_size, ids.reshape(-1), sz.dtype)
        return rows[:, : self.embedding_dim].view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


INT4_MODULES: dict[type, Callable[[nn.Module, Any], nn.Module]] = {
    nn.Linear: Int4Linear.from_linear,
    nn.Embedding: Int4Embedding.from_embedding,
}


def quantize_int4(
    model: nn.Module,
    group_size: int = DEFAULT_INT4_GROUP,
    skip: Callable[[str, nn.Module], bool] | None = None,
    table_for: Callable[[list[str], Tensor], Int4Table] | None = None,
) -> nn.Module:
    """Replace every nn.Linear and nn.Embedding (unless skip(name, module)) with its int4
    version, in place; a shared weight (tied LM head) gets one table. table_for(names, weight)
    overrides round to nearest where it returns a table (GPTQ supplies its own)."""
    check_group_size(group_size)

    def table(names: list[str], weight: Tensor) -> Int4Table:
        return (table_for and table_for(names, weight)) or quantize_rtn(weight, group_size)

    return _replace(model, skip, table, INT4_MODULES)


def int4_quantization_config(scheme: str, group_size: int) -> dict[str, object]:
    """What a checkpoint of group-wise int4 weights (RTN or calibrated) records of them."""
    return {
        "quant_method": "llm_recipes",
        "scheme": scheme,
        "bits": 4,
        "group_size": group_size,
        "symmetric": False,
        "granularity": "per_group",
        "modules": ["Linear", "Embedding"],
    }


class Int4WeightOnly:
    """The int4 scheme (a common.quant.scheme.QuantScheme): round to nearest, group-wise."""

    name = "int4"
    kernels = ("int4_linear",)  # Int4Embedding dequantizes looked-up rows, no kernel

    def __init__(self, group_size: int = DEFAULT_INT4_GROUP) -> None:
        check_group_size(group_size)
        self.group_size = group_size

    def configured(self, quant: Any) -> Int4WeightOnly:
        return type(self)(quant.group_size or DEFAULT_INT4_GROUP)

    def weight_format(self) -> WeightFormat:
        return int4_format(self.group_size)

    def quantize(
        self,
        model: nn.Module,
        calibration: object = None,
        skip: Callable[[str, nn.Module], bool] | None = None,
    ) -> nn.Module:
        return quantize_int4(model, self.group_size, skip)

    def quantization_config(self) -> dict[str, object]:
        return int4_quantization_config(self.name, self.group_size)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return int4_state_dict(model)

    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, object]
    ) -> nn.Module:
        if config.get("scheme") != self.name:
            raise RecipeError(f"checkpoint quantization {config!r} is not the {self.name} scheme")
        return load_int4_state_dict(model, state, int(config["group_size"]))


_PACKED = (".weight_packed", ".scales_and_zeros")  # an int4 module's buffers
_TABLE = ("qweight", "scales", "zeros")  # its tensors in a checkpoint


def pack_nibbles(q: Tensor) -> Tensor:
    """q [N, K'] (0..15, K' even) -> uint8 [N, K'/2], the checkpoint layout: two values per
    byte, even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def int4_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint tensors in a machine-independent layout: per int4 module NAME.qweight
    (uint8 [N, K'/2], two values per byte, even column in the low nibble), NAME.scales and
    NAME.zeros ([N, K'/g], W = (q - 8) * scale + zero); everything else as in the model; a
    table shared by a tied pair is stored once."""
    out: dict[str, Tensor] = {}
    stored: set[tuple] = set()
    for name, m in model.named_modules():
        if isinstance(m, (Int4Linear, Int4Embedding)) and _identity(m.weight_packed) not in stored:
            stored.add(_identity(m.weight_packed))
            n, k_pad = m.weight_packed.shape[0], m.weight_packed.shape[1] * 2
            rows = torch.arange(getattr(m, "out_features", getattr(m, "num_embeddings", n)))
            q = unpack_rows(m.weight_packed, rows, k_pad)
            sz = m.scales_and_zeros[:, : len(rows)].transpose(0, 1)  # [N, G, 2]
            out[f"{name}.qweight"] = pack_nibbles(q)
            out[f"{name}.scales"], out[f"{name}.zeros"] = (
                sz[..., 0].contiguous(),
                sz[..., 1].contiguous(),
            )
    for key, t in model.state_dict().items():
        if not key.endswith(_PACKED) and _identity(t) not in stored:
            stored.add(_identity(t))
            out[key] = t
    return out


def load_int4_state_dict(model: nn.Module, state: dict[str, Tensor], group_size: int) -> nn.Module:
    """Turn a float model of the same architecture (on the meta device or not) into the saved
    int4 one (no rounding); a table that does not fit its weight is an error."""
    saved = {k.removesuffix(".qweight") for k in state if k.endswith(".qweight")}

    def table(names: list[str], weight: Tensor) -> Int4Table:
        n = next(n for n in names if n in saved)
        rows, cols = weight.shape
        groups = -(-cols // group_size)
        half, grid = (rows, groups * group_size // 2), (rows, groups)
        shapes = {"qweight": half, "scales": grid, "zeros": grid}
        for leaf, shape in shapes.items():
            found = state.get(f"{n}.{leaf}")
            if found is None or tuple(found.shape) != shape:
                raise RecipeError(
                    f"quantized checkpoint does not fit the model: {n}.{leaf} "
                    f"{'absent' if found is None else tuple(found.shape)}, expected {shape} for "
                    f"a {tuple(weight.shape)} weight in groups of {group_size}"
                )
        packed = state[f"{n}.qweight"]
        q = torch.stack([packed & 15, packed >> 4], -1).flatten(1)[:, :cols]
        return Int4Table.build(q, state[f"{n}.scales"], state[f"{n}.zeros"], group_size)

    sharing: dict[int, set[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) in INT4_MODULES:
            sharing.setdefault(id(m.weight), set()).add(name)
    quantized = {w for w, names in sharing.items() if names & saved}
    model = _replace(model, lambda name, m: id(m.weight) not in quantized, table, INT4_MODULES)
    taken = {f"{n}.{leaf}" for n in saved for leaf in _TABLE}
    rest = {k: v for k, v in state.items() if k not in taken}  # biases stay: loaded as saved
    return load_rest(model, rest, state, _PACKED)


CLIP_SHRINK = tuple(i / 25 for i in range(7))  # each end moved in by 0, 4, ..., 24% of the range


@torch.no_grad()
def clip_groups(weight: Tensor, hessian: Tensor, group_size: int) -> Tensor:
    """weight [N, G*g] clamped per group to [min + a·r, max - b·r] (float32; r = max - min),
    a and b chosen per group from CLIP_SHRINK for the least output error of its int4 rounding,
    dᵀ H_g d with d = w - q and H_g [G, g, g] the group's block of the inputs' second moment
    (exact, without forming x·W). a = b = 0 is plain rounding, so no group does worse than it
    on those inputs: a narrower grid rounds the bulk of a group finer at the cost of its few
    extreme weights (AWQ's auto-clip). The two ends move apart because the grid is
    asymmetric: a group's tails are rarely alike, and clipping one alone can pay."""
    n, k = weight.shape
    groups = k // group_size
    w = weight.float().view(n, groups, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    span = hi - lo
    best_err = torch.full((n, groups), float("inf"), device=w.device)
    best = w  # never written in place: each better candidate makes a new tensor
    for a in CLIP_SHRINK:
        for b in CLIP_SHRINK:
            clipped = torch.minimum(torch.maximum(w, lo + a * span), hi - b * span)
            d = w - fake_rtn(clipped.view(n, k), group_size).view(n, groups, group_size)
            err = torch.einsum("ngi,gij,ngj->ng", d, hessian.float(), d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], clipped, best)
    return best.view(n, k)


def fake_rtn(weight: Tensor, group_size: int) -> Tensor:
    """weight [N, K] after round-to-nearest int4 and dequantization (float32), as
    quantize_rtn would store it: for searches that compare rounding choices."""
    k = weight.shape[1]
    w = pad_groups(weight.float(), group_size)
    scales, zeros = group_params(w, group_size, weight.dtype)
    return fake_quantize(w, scales, zeros)[:, :k]
