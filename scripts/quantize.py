"""Quantize a model once and write the quantized checkpoint (load it with model.path=DIR).

    python scripts/quantize.py +opt=w8a8 model.path=SRC quant.save=DIR [quant.alpha=0.5 ...]
    python scripts/quantize.py --recipe chatglm +opt=int8 model.path=SRC quant.save=DIR

Overrides are the recipe's own (Hydra): the opts choose the scheme and its options, exactly
as a benchmark run would apply them, so `python recipes/<recipe>/run.py +opt=w8a8
model.path=DIR` runs the saved model without quantizing again (and refuses other opts).
Without model.path the recipe's seeded preset (model.scale) is quantized.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.bench.cli import compose_config, fail, rewrite_opt_args  # noqa: E402
from common.core.config import typed  # noqa: E402
from common.core.errors import RecipeError  # noqa: E402
from common.device.select import resolve_dtype, select_device  # noqa: E402
from common.io.presets import build_model  # noqa: E402
from common.io.quantized import save_quantized  # noqa: E402
from common.parallel.measured import weight_bytes  # noqa: E402
from common.quant.scheme import configured_scheme  # noqa: E402
from common.transforms.registry import apply_transforms  # noqa: E402


def model_class(recipe: str) -> type:
    if recipe == "chatglm":
        from models.glm import GlmForCausalLM

        return GlmForCausalLM
    from models.llama import LlamaForCausalLM

    return LlamaForCausalLM


def quantize(recipe: str, overrides: list[str]) -> Path:
    cfg = compose_config(recipe, rewrite_opt_args(overrides))
    config = typed(cfg)
    q = config.quant
    if q.weights == "none" or not q.save:
        raise RecipeError(
            "give a quantization opt and where to write: e.g. +opt=w8a8 quant.save=DIR"
        )
    device = select_device(cfg.hardware.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, _, desc = build_model(cfg.model, model_class(recipe), device.torch, dtype)
    if getattr(model, "quantization_config", None) is not None:
        raise RecipeError(f"{cfg.model.path} is already quantized; give the float checkpoint")
    before = weight_bytes(model)
    model = apply_transforms(model, cfg)
    scheme = configured_scheme(cfg.quant)
    out = save_quantized(model, scheme, q.save, cfg.model.path, cfg.fusion.projections)
    print(
        f"wrote {out}: {q.weights} from {desc}, weights {before / 1e6:.1f} MB -> "
        f"{weight_bytes(model) / 1e6:.1f} MB"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="llama65b", choices=["llama65b", "chatglm"])
    args, overrides = p.parse_known_args()
    try:
        quantize(args.recipe, overrides)
    except RecipeError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
