"""Mixed precision: `quant.skip` names modules every scheme leaves in float.

An entry is a qualified-name prefix at dot boundaries, with or without the model's top-level
"model." (so `layers.0.mlp` and `model.layers.0.mlp` both name layer 0's MLP, `lm_head` the
head). It keeps every quantizable module under it in float. An entry that names no quantizable
module is an error listing some that exist. A skipped LM head keeps a tied embedding in
float too (they share one table).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.core.errors import RecipeError

QUANTIZABLE = (nn.Linear, nn.Embedding)


def _names(name: str) -> tuple[str, ...]:
    return (name, name.removeprefix("model.")) if name.startswith("model.") else (name,)


def _under(name: str, prefix: str) -> bool:
    return any(n == prefix or n.startswith(prefix + ".") for n in _names(name))


def skip_filter(model: nn.Module, entries: list[str]) -> Callable[[str, nn.Module], bool] | None:
    """skip(name, module) for the schemes, after checking every entry names something."""
    if not entries:
        return None
    names = [
        n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QUANTIZABLE)
    ]
    for entry in entries:
        if not any(_under(n, entry) for n in names):
            examples = sorted({n.removeprefix("model.").rsplit(".", 1)[0] for n in names})
            raise RecipeError(
                f"quant.skip entry {entry!r} names no quantizable module; e.g. "
                f"{', '.join([*examples[:4], names[-1]])}"
            )
    # A module shared by several names (a tied table) is skipped if any of them is.
    skipped = {id(m) for n, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, QUANTIZABLE) and any(_under(n, e) for e in entries)}  # fmt: skip
    weights = {id(m.weight) for n, m in model.named_modules() if id(m) in skipped}
    return lambda name, module: id(module) in skipped or id(module.weight) in weights
