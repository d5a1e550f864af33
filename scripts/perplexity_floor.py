"""How much of a quantized model's perplexity change is which way each weight happened to round.

    python scripts/perplexity_floor.py --model-path DIR [--scheme int8] [--seeds 8]

A rounding error δ changes the loss by about g·δ + ½δᵀHδ. The second term is the cost of
quantizing and is positive; the first has either sign, set by how δ lines up with the
gradient on the eval text, and at int8's small errors it is as large as the second. So one
quantized model's perplexity change is one draw. This script quantizes the model with the
scheme (calibrated schemes calibrate on the default or given text), reads back the float
weights each quantized module computes with (its forward on the identity, or on every id for
an embedding table), and evaluates perplexity on held-out text (the recipes' default split
and size, or --eval-path) for: the quantized model itself; its weights in the float model;
and --seeds copies whose rounding errors are shuffled within each group that shares a scale
(a whole row for per-channel int8), which keeps every group's error sizes and scrambles only their
alignment. The shuffled copies' spread is the
floor below which two schemes' perplexity changes cannot be told apart on this text. Writes
results/quant/perplexity_floor-<dir name>-<scheme>.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from quant_sensitivity import perplexity  # noqa: E402  scripts/, next to this file
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.bench.cli import fail  # noqa: E402
from common.bench.report import command_line, git_revision, write_table  # noqa: E402
from common.core.errors import RecipeError  # noqa: E402
from common.device.probe import cpu_info  # noqa: E402
from common.io.checkpoint import from_pretrained  # noqa: E402
from common.io.presets import load_tokenizer  # noqa: E402
from common.quant.data import load_texts, token_blocks  # noqa: E402
from common.quant.scheme import SCHEMES, configured_scheme  # noqa: E402
from common.transforms.calibrate import layerwise  # noqa: E402
from common.transforms.registry import encoder  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

_FLOAT = (nn.Linear, nn.Embedding)


@torch.no_grad()
def effective_errors(model: nn.Module, quantized: nn.Module) -> dict[str, Tensor]:
    """Module name -> (weight the quantized module computes with) - (float weight), in fp32,
    for every float Linear/Embedding the quantized copy replaced."""
    replaced = dict(quantized.named_modules(remove_duplicate=False))
    errors = {}
    for name, module in model.named_modules(remove_duplicate=False):
        new = replaced.get(name)
        if not isinstance(module, _FLOAT) or new is None or isinstance(new, _FLOAT):
            continue
        weight = module.weight
        if isinstance(module, nn.Embedding):
            computed = new(torch.arange(module.num_embeddings))
        else:  # y = x Wᵀ + b: the identity's rows give Wᵀ (+ b, which the zero input removes)
            eye = torch.eye(module.in_features, dtype=weight.dtype)
            computed = (new(eye) - new(torch.zeros_like(eye[:1]))).T
        errors[name] = computed.float() - weight.float()
    return errors


def shuffled_within_groups(error: Tensor, group: int | None, generator: torch.Generator) -> Tensor:
    """Each group's entries (`group` consecutive input channels of a row sharing a scale, the
    last group what is left of the row; the whole row when group is None) in a random order:
    the same error sizes, aligned with nothing."""
    rows, cols = error.shape
    group = min(group or cols, cols)
    full = cols - cols % group
    parts = (error[:, :full].reshape(rows, full // group, group), error[:, None, full:])
    shuffled = []
    for part in parts:
        order = torch.rand(part.shape, generator=generator).argsort(dim=-1)
        shuffled.append(part.gather(-1, order).reshape(rows, -1))
    return torch.cat(shuffled, dim=1)


@torch.no_grad()
def perturbed(model: nn.Module, errors: dict[str, Tensor]) -> nn.Module:
    """A copy of the float model with each named module's weight + its error (rounded to the
    model's dtype). Each module gets its own weight, so a tied pair is untied."""
    copy_ = copy.deepcopy(model)
    for name, error in errors.items():
        module = copy_.get_submodule(name)
        module.weight = nn.Parameter((module.weight.float() + error).to(module.weight.dtype))
    return copy_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--scheme", default="int8", choices=sorted(SCHEMES))
    p.add_argument(
        "--group-size", type=int, default=None, help="default: 128 for int4, per channel for int8"
    )
    p.add_argument("--bits", type=int, default=4, help="gptq: 4 or 8")
    p.add_argument("--seeds", type=int, default=8, help="shuffled copies (at least 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--eval-path", default=None, help="held-out text (.txt/.jsonl/.parquet)")
    p.add_argument("--eval-samples", type=int, default=16, help="the recipes' default")
    p.add_argument("--calib-path", default=None, help="calibration text for gptq/awq/w8a8")
    p.add_argument("--seq-len", type=int, default=512, help="eval block length")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results/quant")
    args = p.parse_args()
    if args.seeds < 2:
        p.error(f"--seeds {args.seeds}: a spread needs at least 2 shuffled copies")
    try:
        floor_table(args)
    except RecipeError as e:
        fail(str(e))


def floor_table(args: argparse.Namespace) -> None:
    model = from_pretrained(LlamaForCausalLM, args.model_path, "cpu", getattr(torch, args.dtype))
    encode = encoder(load_tokenizer(args.model_path), model.args.vocab_size)
    held_out = token_blocks(
        load_texts(args.eval_path, None, "test", "eval"), encode, args.eval_samples, args.seq_len
    )
    quant = OmegaConf.load(ROOT / "configs/recipe_defaults.yaml").quant  # the recipes' options
    quant.merge_with({"weights": args.scheme, "group_size": args.group_size, "bits": args.bits})
    scheme = configured_scheme(quant)
    calibration = None
    if getattr(scheme, "calibrated", False):
        c = quant.calib
        texts = load_texts(args.calib_path, None, c.split, "calib")
        calibration = layerwise(model, token_blocks(texts, encode, c.num_samples, c.seq_len))
    quantized = scheme.quantize(copy.deepcopy(model), calibration)
    errors = effective_errors(model, quantized)

    base = perplexity(model, held_out)
    rows = [("quantized model (its kernels)", perplexity(quantized, held_out))]
    del quantized
    rows.append((f"its weights in {args.dtype}", perplexity(perturbed(model, errors), held_out)))
    group = scheme.weight_format().group_size
    generator = torch.Generator().manual_seed(0)
    for seed in tqdm(range(args.seeds), desc="shuffled rounding errors"):
        shuffled = {n: shuffled_within_groups(e, group, generator) for n, e in errors.items()}
        rows.append(
            (f"errors shuffled, draw {seed}", perplexity(perturbed(model, shuffled), held_out))
        )
    changes = [ppl / base - 1 for _, ppl in rows]
    floor = changes[2:]
    mean, spread = statistics.mean(floor), statistics.stdev(floor)
    lines = [
        f"# Perplexity floor: {args.model_path.name}, {scheme.weight_format().label()}",
        "",
        f"- command: `{command_line()}`",
        f"- hardware: {cpu_info()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
        f" git {git_revision()}",
        f"- float perplexity: {base:.3f} ({held_out.shape[0]} blocks of {held_out.shape[1]}"
        f" tokens, {args.dtype})",
        f"- shuffled errors: mean {mean:+.2%}, standard deviation {spread:.2%}, range"
        f" {min(floor):+.2%} to {max(floor):+.2%} over {len(floor)} draws",
        "",
        "| model | perplexity | change |",
        "|---|---:|---:|",
        *(f"| {label} | {ppl:.3f} | {c:+.2%} |" for (label, ppl), c in zip(rows, changes)),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    result = {
        "command": command_line(), "cpu": cpu_info(), "scheme": args.scheme,
        "group_size": scheme.weight_format().group_size, "float_perplexity": base,
        "rows": [{"model": label, "perplexity": ppl, "change": c}
                 for (label, ppl), c in zip(rows, changes)],
        "shuffled": {"mean": mean, "stdev": spread, "min": min(floor), "max": max(floor)},
    }  # fmt: skip
    suffix = f"-g{args.group_size}" if args.group_size else ""  # the scheme's default: none
    name = f"perplexity_floor-{args.model_path.name}-{args.scheme}{suffix}"
    write_table(args.results_dir / name, result, md)


if __name__ == "__main__":
    main()
