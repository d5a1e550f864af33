"""Weight-only int8 quantization: symmetric int8 weights with one scale per output channel, or
per group of `group_size` input channels (quant.group_size: 32, 64 or 128; llama.cpp's q8_0
is group-wise too), float activations. Groups cost 2 bytes of scale per group_size weights
and round with a smaller step wherever a row has an outlier: on SmolLM2 that is the
difference between per-channel int8's perplexity change and none (docs/quantization.md).

Decode (batch 1) is memory-bound, so halving the bytes read per token is the whole win; the
matmul itself still runs in the activation dtype. Embedding tables are quantized per row
(a row is a tied LM head's output channel, so a tied pair shares one int8 table): decode
reads one row of them, but they are a large share of a small model's bytes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import ops
from common.core.errors import RecipeError
from common.ops.int8_linear import scale_shape
from common.quant.formats import INT8, WeightFormat, check_group_size

_MIN_SCALE = 1e-8  # keeps all-zero rows from dividing by zero
_QUANT_ROWS = 1024  # rows quantized at a time


def _quantize(weight: Tensor, group_size: int = 0) -> tuple[Tensor, Tensor]:
    """[N, K] float -> ([N, K] int8, scales in the weight's dtype: [N], or [N, ceil(K / g)]
    for group_size g, the last group of a row covering what is left of it)."""
    floor = max(_MIN_SCALE, torch.finfo(weight.dtype).tiny)  # fp16 cannot hold 1e-8
    n, k = weight.shape
    g = group_size or max(k, 1)
    groups = -(-k // g)
    weight_int8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, groups, dtype=weight.dtype, device=weight.device)
    for i in range(0, n, _QUANT_ROWS):  # blocks of rows keep the fp32 temporaries small
        w = F.pad(weight[i : i + _QUANT_ROWS].detach().float(), (0, groups * g - k))
        w = w.view(w.shape[0], groups, g)  # zeros pad the last group: no effect on its max
        # Scales are stored in the weight dtype (the CPU kernels read them as the activation
        # dtype), so quantize against the rounded scale: that keeps |w - q * scale| <= scale / 2
        # for the stored value.
        s = (w.abs().amax(dim=2) / 127).clamp(min=floor).to(weight.dtype)
        scales[i : i + _QUANT_ROWS] = s
        q = w.div_(s.float()[..., None]).round_().clamp_(-127, 127)  # divided in place
        weight_int8[i : i + _QUANT_ROWS] = q.view(q.shape[0], -1)[:, :k]
    return weight_int8, scales if group_size else scales.view(n)


def _per_input(scales: Tensor, group_size: int, k: int) -> Tensor:
    """Group-wise scales [..., G] repeated to one per input channel [..., K]."""
    return scales.repeat_interleave(group_size, dim=-1)[..., :k]


class Int8WeightOnlyLinear(nn.Module):
    """Drop-in for nn.Linear holding int8 weights [N, K] and scales per output channel [N] or,
    for group_size g, per group of g input channels [N, ceil(K / g)]."""

    def __init__(
        self,
        weight_int8: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        group_size: int = 0,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.group_size = group_size
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quantized: Table | None = None, group_size: int = 0
    ) -> Int8WeightOnlyLinear:
        weight_int8, scales = quantized or _quantize(linear.weight, group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_int8, scales, bias, group_size)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        dtype = x.dtype
        scales = self.scales if self.scales.dtype == dtype else self.scales.to(dtype)
        # the dispatch table picks the kernel
        out = ops.int8_linear(x2d, self.weight_int8, scales, self.group_size)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}{group}"
        )


class Int8Embedding(nn.Module):
    """Drop-in for nn.Embedding holding int8 rows [V, H] and a scale per row [V] or per group
    of a row [V, ceil(H / g)] (a row is a tied LM head's output channel)."""

    lookup_table = True  # forward reads one row per token (the memory model counts it so)

    def __init__(self, weight_int8: Tensor, scales: Tensor, group_size: int = 0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.group_size = group_size
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, quantized: Table | None = None, group_size: int = 0
    ) -> Int8Embedding:
        return cls(*(quantized or _quantize(embedding.weight, group_size)), group_size)

    def forward(self, ids: Tensor) -> Tensor:
        scales = self.scales[ids]
        if self.group_size:
            scales = _per_input(scales, self.group_size, self.embedding_dim)
        else:
            scales = scales[..., None]
        return self.weight_int8[ids].to(self.scales.dtype) * scales

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def _int8_modules(group_size: int = 0) -> dict[type, Callable[[Any, Any], nn.Module]]:
    """The int8 constructors by float module type, from (module, table)."""
    return {
        nn.Linear: functools.partial(Int8WeightOnlyLinear.from_linear, group_size=group_size),
        nn.Embedding: functools.partial(Int8Embedding.from_embedding, group_size=group_size),
    }


def quantize_int8(
    model: nn.Module,
    skip: Callable[[str, nn.Module], bool] | None = None,
    table_for: Callable[[list[str], Tensor], Table | None] | None = None,
    group_size: int = 0,
) -> nn.Module:
    """Replace every nn.Linear and nn.Embedding (unless skip(name, module)) with its int8
    version (scales per output channel, or per group of group_size inputs), in place. A
    weight shared by several modules (a tied LM head) is quantized once and its int8 table
    shared, so it still counts once. table_for(names, weight) overrides round to nearest
    where it returns a table (GPTQ supplies its own, per channel)."""

    def table(names: list[str], weight: Tensor) -> Table:
        return (table_for and table_for(names, weight)) or _quantize(weight, group_size)

    return _replace(model, skip, table, _int8_modules(group_size))


Table = tuple[Tensor, Tensor]  # (int8 [N, K], scales [N] or [N, ceil(K / group_size)])


def _replace(
    model: nn.Module,
    skip: Callable[[str, nn.Module], bool] | None,
    table_for: Callable[[list[str], Tensor], Any],
    modules: dict[type, Callable[[Any, Any], nn.Module]] | None = None,
) -> nn.Module:
    """Swap modules for their quantized versions (`modules`: float type -> constructor from
    (module, table)), in place; table_for(names of every module that shares the weight, the
    float weight) gives each weight's quantized table, once per weight."""
    modules = modules or _int8_modules()
    # remove_duplicate=False: a module registered under two names must be replaced at both.
    names: dict[int, tuple[nn.Module, list[str]]] = {}  # id(module) -> (module, its names)
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in modules and not (skip is not None and skip(name, module)):
            names.setdefault(id(module), (module, []))[1].append(name)
    sharing: dict[int, list[str]] = {}  # id(float weight) -> names of all its modules
    for module, module_names in names.values():
        sharing.setdefault(id(module.weight), []).extend(module_names)
    # Modules are converted one at a time and dropped from `names`, so each float weight is
    # freed once its last user is replaced: the peak holds one float matrix beyond the int8
    # model, not the whole float model. A weight shared by modules is quantized once.
    users = Counter(id(module.weight) for module, _ in names.values())
    tables: dict[int, Any] = {}  # id(float weight) -> its quantized table
    while names:
        _, (module, module_names) = names.popitem()
        key = id(module.weight)
        table = tables.pop(key, None) or table_for(sharing[key], module.weight)
        users[key] -= 1
        if users[key]:
            tables[key] = table
        new = modules[type(module)](module, table)
        del module
        for name in module_names:
            if not name:  # the model itself is the module: nothing to replace it in
                return new
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
    return model


class Int8WeightOnly:
    """The int8 weight-only scheme (a common.quant.scheme.QuantScheme), scales per output
    channel (group_size 0) or per group of inputs. Checkpoints use Hugging Face-style names:
    NAME.weight (int8) and NAME.weight_scale per quantized module, everything else as in the
    float model; a tied table is stored once."""

    name = "int8"
    kernels = ("int8_linear",)  # Int8Embedding is a row lookup, no kernel

    def __init__(self, group_size: int = 0) -> None:
        if group_size:
            check_group_size(group_size)
        self.group_size = group_size

    def configured(self, quant: Any) -> Int8WeightOnly:
        return type(self)(quant.group_size or 0)  # null: per output channel

    def weight_format(self) -> WeightFormat:
        return replace(INT8, group_size=self.group_size or None)

    def quantize(
        self,
        model: nn.Module,
        calibration: object = None,
        skip: Callable[[str, nn.Module], bool] | None = None,
    ) -> nn.Module:
        return quantize_int8(model, skip, group_size=self.group_size)  # absmax: no calibration

    def quantization_config(self) -> dict[str, object]:
        granularity = {"granularity": "group", "group_size": self.group_size}
        return {
            "quant_method": "llm_recipes",
            "scheme": self.name,
            "bits": 8,
            "symmetric": True,
            **(granularity if self.group_size else {"granularity": "per_output_channel"}),
            "modules": ["Linear", "Embedding"],
        }

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        stored: set[tuple] = set()
        for name, tensor in model.state_dict().items():
            if name.endswith(".weight_int8"):
                name = name.removesuffix("_int8")
            elif name.endswith(".scales"):
                name = name.removesuffix(".scales") + ".weight_scale"
            if _identity(tensor) not in stored:  # a tied table is stored once
                stored.add(_identity(tensor))
                out[name] = tensor
        return out

    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, object]
    ) -> nn.Module:
        """Quantize a float model of the same architecture (in place, no rounding: the int8
        tables come from `state`) and load the other tensors."""
        if config.get("scheme") != self.name:
            raise RecipeError(f"checkpoint quantization {config!r} is not the {self.name} scheme")
        return load_int8(model, state, int(config.get("group_size") or 0))


def load_int8(model: nn.Module, state: dict[str, Tensor], group_size: int = 0) -> nn.Module:
    """Swap in the int8 modules whose tables `state` holds (NAME.weight, NAME.weight_scale:
    scales per output channel, or per group of group_size inputs) and load every other
    tensor, all by assignment (so a model on the meta device works); a name that fits nowhere
    or a tensor left unloaded is an error."""
    scales = {
        k.removesuffix(".weight_scale"): v for k, v in state.items() if k.endswith(".weight_scale")
    }
    if lost := [f"{name}.weight" for name in scales if f"{name}.weight" not in state]:
        raise RecipeError(f"quantized checkpoint has scales without int8 weights: {lost[:5]}")
    tables = {name: (state[f"{name}.weight"], scale) for name, scale in scales.items()}
    unscaled = [k for k, v in state.items() if v.dtype == torch.int8 and k + "_scale" not in state]
    if unscaled:
        raise RecipeError(f"quantized checkpoint has int8 {unscaled[0]} without its weight_scale")

    granularity = f"group_size {group_size}" if group_size else "one scale per output channel"

    def saved(names: list[str], weight: Tensor) -> Table:
        name = next(n for n in names if n in tables)
        table = tables[name]
        if table[0].shape != weight.shape or table[1].shape != scale_shape(
            *weight.shape, group_size
        ):
            raise RecipeError(
                f"quantized checkpoint does not fit the model: {name}.weight "
                f"{tuple(table[0].shape)} / weight_scale {tuple(table[1].shape)} for a "
                f"{tuple(weight.shape)} weight ({granularity})"
            )
        return table

    modules = _int8_modules(group_size)
    sharing: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in modules:
            sharing.setdefault(id(module.weight), set()).add(name)
    quantized = {w for w, names in sharing.items() if names & tables.keys()}
    model = _replace(model, lambda name, m: id(m.weight) not in quantized, saved, modules)
    rest = {k: v for k, v in state.items() if k.removesuffix(".weight") not in tables}
    rest = {k: v for k, v in rest.items() if not k.endswith(".weight_scale")}
    return load_rest(model, rest, state)


def load_rest(
    model: nn.Module, rest: dict[str, Tensor], state: dict[str, Tensor], built: tuple[str, ...] = ()
) -> nn.Module:
    """Load the tensors no quantized table took (`rest`) by assignment, so a model on the meta
    device works; a name that fits nowhere or a tensor left unloaded is an error. A missing
    name is fine when its tensor is one of `state`'s (tied: shared) or ends with one of
    `built` (buffers the quantized modules made from their tables)."""
    try:
        missing, unexpected = model.load_state_dict(_tied(model, rest), strict=False, assign=True)
    except RuntimeError as e:  # a shape mismatch: torch's message lists every one
        lines = [x.strip() for x in str(e).splitlines() if "size mismatch" in x]
        detail = (lines or [x.strip() for x in str(e).splitlines()][1:] or [str(e)])[0]
        raise RecipeError(f"quantized checkpoint does not fit the model: {detail}") from e
    loaded = {_identity(t) for t in state.values()}
    current = model.state_dict()
    unread = [k for k in missing if not k.endswith(built) and _identity(current[k]) not in loaded]
    if unexpected or unread:
        raise RecipeError(
            f"quantized checkpoint does not fit the model: missing {unread[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def _tied(model: nn.Module, rest: dict[str, Tensor]) -> dict[str, Tensor]:
    """`rest` plus, for a parameter registered under several names (a float tied LM head),
    one new Parameter under all of them: assigning it by one name alone would untie them."""
    current = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for name, t in current.items():
        names.setdefault(id(t), []).append(name)
    out = dict(rest)
    for key, value in rest.items():
        aliases = names.get(id(current[key]), []) if key in current else []
        if len(aliases) > 1 and isinstance(current[key], nn.Parameter):
            shared = nn.Parameter(value, requires_grad=current[key].requires_grad)
            out.update({a: shared for a in aliases if a == key or a not in rest})
    return out


def _identity(t: Tensor) -> tuple:
    """Tensors equal under this share their memory (a tied table under two names)."""
    return t.data_ptr(), t.shape, t.dtype
