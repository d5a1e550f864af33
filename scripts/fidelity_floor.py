"""Why greedy-token agreement is low on seeded random weights: the floor set by rounding.

    python scripts/fidelity_floor.py [--scale small]
    python scripts/fidelity_floor.py --model-path DIR [--workload chat]

On a recipe workload (configs/workload/NAME.yaml; default latency), the baseline (bf16,
eager attention) generates greedily; every pair below is then teacher-forced on those tokens
and compared by argmax agreement and logit error. Pairs that differ only in rounding show how
often near-tied logits flip with no change in the math; the int8 pair in fp32 shows int8
weights alone. With --model-path, a real checkpoint (e.g. SmolLM2-135M-Instruct on its chat
prompts) shows the same pairs on a trained model's peaked logits. Writes
results/llama65b/cpu/fidelity_floor.{md,json} (with --model-path,
fidelity_floor-<dir name>.{md,json}) atomically.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.bench.workload import build_requests  # noqa: E402
from common.core.request import SamplingParams  # noqa: E402
from common.device.probe import cpu_info  # noqa: E402
from common.device.select import Device  # noqa: E402
from common.engine.engine import Engine  # noqa: E402
from common.io.checkpoint import from_pretrained, from_seed  # noqa: E402
from common.io.presets import load_tokenizer, preset_args  # noqa: E402
from common.quant.int8 import quantize_int8  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

CPU = Device("cpu")
# (name, what differs from the reference, reference (dtype, int8, attention), candidate)
PAIRS = [
    ("bf16 vs fp32", "rounding only", (torch.float32, False, "eager"), (torch.bfloat16, False, "eager")),
    ("flash_attn vs eager, bf16", "summation order only", (torch.bfloat16, False, "eager"), (torch.bfloat16, False, "flash")),
    ("int8 vs fp32 weights, fp32 math", "int8 weights only", (torch.float32, False, "eager"), (torch.float32, True, "eager")),
    ("flash_attn+int8 vs baseline, bf16", "the recipe's opts", (torch.bfloat16, False, "eager"), (torch.bfloat16, True, "flash")),
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--model-path", type=Path, help="an HF checkpoint instead of seeded weights")
    p.add_argument("--workload", default="latency", help="a configs/workload/ name")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = ROOT / "results/llama65b/cpu"
    mcfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    mcfg.scale = args.scale
    workload = ROOT / "configs/workload" / f"{args.workload}.yaml"
    if not workload.is_file():
        choices = sorted(f.stem for f in workload.parent.glob("*.yaml"))
        p.error(f"unknown workload {args.workload!r}; choose one of {', '.join(choices)}")
    wcfg = OmegaConf.load(workload)
    tokenizer = None
    if args.model_path:
        out = args.out or results / f"fidelity_floor-{args.model_path.name}"
        what = f"checkpoint {args.model_path.name}"
        models = {
            dtype: from_pretrained(LlamaForCausalLM, args.model_path, "cpu", dtype)
            for dtype in (torch.float32, torch.bfloat16)
        }
        if wcfg.kind == "file":
            tokenizer = load_tokenizer(args.model_path)
    else:
        out = args.out or results / "fidelity_floor"
        what = f"preset {args.scale}, seeded random weights (seed {mcfg.seed})"
        margs = preset_args(mcfg, LlamaForCausalLM)
        models = {
            dtype: from_seed(LlamaForCausalLM, margs, mcfg.seed, "cpu", dtype)
            for dtype in (torch.float32, torch.bfloat16)
        }
    quantized = {dtype: quantize_int8(copy.deepcopy(m)) for dtype, m in models.items()}
    requests = build_requests(wcfg, models[torch.float32].args.vocab_size, tokenizer)
    for r in requests:
        r.sampling = SamplingParams(no_repeat_ngram_size=args.no_repeat_ngram_size)
    baseline = Engine(models[torch.bfloat16], CPU)
    outputs = [baseline.generate([r])[0].tokens for r in requests]

    def logits(dtype: torch.dtype, int8: bool, attention: str) -> torch.Tensor:
        engine = Engine((quantized if int8 else models)[dtype], CPU, attention=attention)
        return torch.cat(
            [engine.teacher_forced_logits(r.prompt, o) for r, o in zip(requests, outputs)]
        )

    rows = []
    for name, differs, ref_spec, cand_spec in PAIRS:
        ref, cand = logits(*ref_spec), logits(*cand_spec)
        top2 = ref.topk(2, dim=-1).values
        err = (cand - ref).abs()
        rows.append(
            {
                "pair": name,
                "differs_in": differs,
                "token_agreement": float((cand.argmax(-1) == ref.argmax(-1)).float().mean()),
                "rms_logit_err": float(err.pow(2).mean().sqrt()),
                "max_logit_err": float(err.max()),
                "median_top1_top2_gap": float((top2[:, 0] - top2[:, 1]).median()),
                "logit_std": float(ref.std()),
            }
        )
    head = ["pair", "differs in", "token agree", "rms logit err", "max logit err",
            "median top-1/top-2 gap", "logit std"]  # fmt: skip
    lines = [
        f"# Greedy agreement floor: {what}",
        "",
        f"- command: `{command_line()}`",
        f"- machine: {cpu_info()}",
        f"- model: llama-65b {what}; workload: {args.workload} "
        f"({len(requests)} prompts, {sum(map(len, outputs))} teacher-forced tokens)"
        + (
            f", no_repeat_ngram_size {args.no_repeat_ngram_size}"
            if args.no_repeat_ngram_size
            else ""
        ),
        "- each pair teacher-forces the bf16 baseline's greedy tokens; the gap is the reference's",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
        *(
            f"| {r['pair']} | {r['differs_in']} | {r['token_agreement']:.3f} | "
            f"{r['rms_logit_err']:.4f} | {r['max_logit_err']:.3f} | "
            f"{r['median_top1_top2_gap']:.4f} | {r['logit_std']:.3f} |"
            for r in rows
        ),
        "",
    ]
    print("\n".join(lines))
    result = {"command": command_line(), "model": what, "rows": rows}
    write_table(out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
