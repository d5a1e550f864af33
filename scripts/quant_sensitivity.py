"""Which modules to keep in float: perplexity change when only one module is quantized.

    python scripts/quant_sensitivity.py --model-path DIR [--scheme int4] [--group-size 128]

For each decoder layer's self_attn and mlp, and the LM head (with a tied embedding: one
table), a copy of the float model has only that module quantized with the chosen scheme
(int8, int4, gptq or awq; calibrated schemes calibrate on the default or given text), and its
perplexity on held-out text (the same default split the recipes use, or --eval-path) is
compared with the float model's. Prints a table, most sensitive first, and the
`quant.skip=[...]` that keeps the --top most sensitive in float. Writes
results/quant/sensitivity-<dir name>-<scheme>.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.io.checkpoint import from_pretrained  # noqa: E402
from common.io.presets import load_tokenizer  # noqa: E402
from common.quant.data import load_texts, token_blocks  # noqa: E402
from common.quant.scheme import SCHEMES, configured_scheme  # noqa: E402
from common.quant.skip import skip_filter  # noqa: E402
from common.transforms.calibrate import _Causal, layerwise  # noqa: E402
from common.transforms.registry import encoder  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """exp(mean next-token NLL) over token blocks [n, T], causal within each block."""
    nll, count = 0.0, 0
    for block in blocks.split(4):
        positions = torch.arange(block.shape[1]).expand_as(block)
        logits = model.logits(model(block, positions, _Causal())).float()
        nll += float(
            F.cross_entropy(logits[:, :-1].flatten(0, 1), block[:, 1:].flatten(), reduction="sum")
        )
        count += block[:, 1:].numel()
    return math.exp(nll / count)


def targets(model: torch.nn.Module) -> list[str]:
    return [
        f"layers.{i}.{part}"
        for i in range(len(model.model.layers))
        for part in ("self_attn", "mlp")
    ] + ["lm_head"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--scheme", default="int4", choices=sorted(SCHEMES))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", type=int, default=4, help="gptq: 4 or 8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eval-path", default=None, help="held-out text (.txt/.jsonl/.parquet)")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--calib-path", default=None, help="calibration text for gptq/awq")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top", type=int, default=3, help="modules the suggested skip list keeps")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results/quant")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    model = from_pretrained(LlamaForCausalLM, args.model_path, "cpu", dtype)
    encode = encoder(load_tokenizer(args.model_path), model.args.vocab_size)
    held_out = token_blocks(
        load_texts(args.eval_path, None, "test", "eval"), encode, args.eval_samples, args.seq_len
    )
    calib = token_blocks(
        load_texts(args.calib_path, None, "train", "calib"),
        encode,
        args.calib_samples,
        args.seq_len,
    )
    quant = SimpleNamespace(
        weights=args.scheme, group_size=args.group_size, bits=args.bits, act_order=False,
        damp=0.01, awq_grid=20, clip=True,
    )  # fmt: skip
    scheme = configured_scheme(quant)
    base = perplexity(model, held_out)
    rows = []
    for target in tqdm(targets(model), desc=f"{args.scheme} one module at a time"):
        candidate = copy.deepcopy(model)
        only = skip_filter(candidate, [target])
        keep = lambda name, m, only=only: not only(name, m)  # noqa: E731  every other module
        calibration = layerwise(candidate, calib) if getattr(scheme, "calibrated", False) else None
        candidate = scheme.quantize(candidate, calibration, skip=keep)
        ppl = perplexity(candidate, held_out)
        rows.append({"module": target, "perplexity": ppl, "change": ppl / base - 1})
    rows.sort(key=lambda r: -r["change"])
    skip = [r["module"] for r in rows[: args.top]]
    lines = [
        f"# Quantization sensitivity: {args.model_path.name}, {args.scheme}",
        "",
        f"- command: `{command_line()}`",
        f"- float perplexity: {base:.3f} ({held_out.shape[0]} blocks of {args.seq_len} tokens)",
        f"- suggested: `quant.skip=[{','.join(skip)}]`",
        "",
        "| module quantized alone | perplexity | change |",
        "|---|---:|---:|",
        *(f"| {r['module']} | {r['perplexity']:.3f} | {r['change']:+.2%} |" for r in rows),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = args.results_dir / f"sensitivity-{args.model_path.name}-{args.scheme}"
    result = {"command": command_line(), "scheme": args.scheme, "float_perplexity": base,
              "rows": rows, "suggested_skip": skip}  # fmt: skip
    write_table(stem, result, md)


if __name__ == "__main__":
    main()
