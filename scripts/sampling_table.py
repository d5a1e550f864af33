"""What each logits processor costs per decode step, and whether it agrees with transformers'.

    python scripts/sampling_table.py [--vocab 49152] [--history 512] [--rounds 30]

For each processor alone (temperature, top_k, top_p, repetition_penalty,
no_repeat_ngram_size) and all together, at batch 1 and 16: the time of one sampling step
(processors + softmax + multinomial draw, common/engine/sampler.py) on random logits of the
vocabulary's size with histories of --history tokens, median (min-max) over interleaved
rounds; and agreement with transformers' LogitsProcessor classes on the same inputs: the
largest |difference| of the processed scores and the share of identical tokens drawn with
the same seeds. Writes results/llama65b/cpu/sampling.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers.generation import logits_process as hf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.core.request import SamplingParams  # noqa: E402
from common.device.probe import cpu_info  # noqa: E402
from common.engine.sampler import process_logits, sample_with_probs  # noqa: E402

PROCESSORS = {  # name -> (our SamplingParams fields, transformers' processors in its order)
    "none (plain sampling)": ({}, []),
    "temperature=0.7": ({"temperature": 0.7}, [hf.TemperatureLogitsWarper(0.7)]),
    "top_k=50": ({"top_k": 50}, [hf.TopKLogitsWarper(50)]),
    "top_p=0.9": ({"top_p": 0.9}, [hf.TopPLogitsWarper(0.9)]),
    "repetition_penalty=1.2": (
        {"repetition_penalty": 1.2},
        [hf.RepetitionPenaltyLogitsProcessor(1.2)],
    ),
    "no_repeat_ngram_size=3": ({"no_repeat_ngram_size": 3}, [hf.NoRepeatNGramLogitsProcessor(3)]),
    "all of them": (
        {
            "temperature": 0.7,
            "top_k": 50,
            "top_p": 0.9,
            "repetition_penalty": 1.2,
            "no_repeat_ngram_size": 3,
        },
        [
            hf.RepetitionPenaltyLogitsProcessor(1.2),
            hf.NoRepeatNGramLogitsProcessor(3),
            hf.TemperatureLogitsWarper(0.7),
            hf.TopKLogitsWarper(50),
            hf.TopPLogitsWarper(0.9),
        ],
    ),  # fmt: skip
}


def agreement(params: SamplingParams, procs: list, logits, histories, draws: int) -> tuple:
    ours = process_logits(logits, histories, params)
    theirs = logits.clone()
    for proc in procs:
        theirs = proc(histories, theirs)
    finite = torch.isfinite(ours) & torch.isfinite(theirs)
    same_mask = bool((torch.isfinite(ours) == torch.isfinite(theirs)).all())
    err = float((ours[finite] - theirs[finite]).abs().max()) if same_mask else float("inf")
    same = 0
    for seed in range(draws):
        a = torch.multinomial(ours.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
        b = torch.multinomial(theirs.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
        same += int(torch.equal(a, b))
    return err, same / draws


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    p.add_argument("--history", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--draws", type=int, default=100, help="seeds compared for agreement")
    p.add_argument("--out", type=Path, default=ROOT / "results/llama65b/cpu/sampling")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        logits = torch.randn(batch, args.vocab, generator=gen) * 3
        # histories drawn from a small id range, so n-grams repeat and penalties bite
        histories = torch.randint(0, 64, (batch, args.history), generator=gen)
        cases = {name: SamplingParams(do_sample=True, **kw) for name, (kw, _) in PROCESSORS.items()}
        times = {name: [] for name in cases}
        for _ in tqdm(range(args.rounds), desc=f"batch {batch}"):
            for name, params in cases.items():
                t = time.perf_counter()
                sample_with_probs(logits, histories, params, gen, with_probs=False)
                times[name].append(time.perf_counter() - t)
        for name, params in cases.items():
            err, same = agreement(params, PROCESSORS[name][1], logits, histories, args.draws)
            ms = [1e3 * t for t in times[name]]
            rows.append({"processor": name, "batch": batch, "ms": statistics.median(ms),
                         "ms_min": min(ms), "ms_max": max(ms), "max_abs_err": err,
                         "same_tokens": same})  # fmt: skip
    base = {r["batch"]: r["ms"] for r in rows if r["processor"].startswith("none")}
    lines = [
        "# Logits processors: cost per sampling step and agreement with transformers",
        "",
        f"- command: `{command_line()}`",
        f"- machine: {cpu_info()}",
        f"- vocabulary {args.vocab}, histories of {args.history} tokens, float32 logits, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.rounds} "
        "interleaved rounds, median (min–max)",
        f"- agreement: transformers' LogitsProcessor classes on the same logits and histories; "
        f"tokens drawn with {args.draws} seeds from each",
        "",
        "| processor | batch | ms per step | extra over plain sampling | max abs score diff "
        "| same tokens |",
        "|---|---:|---|---:|---:|---:|",
        *(
            f"| {r['processor']} | {r['batch']} | {r['ms']:.3f} ({r['ms_min']:.3f}–"
            f"{r['ms_max']:.3f}) | {r['ms'] - base[r['batch']]:+.3f} ms | "
            f"{r['max_abs_err']:.3g} | {r['same_tokens']:.0%} |"
            for r in rows
        ),
        "",
    ]
    print("\n".join(lines))
    write_table(args.out, {"command": command_line(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
