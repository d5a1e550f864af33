"""Output fidelity of a variant against the baseline: teacher-forced logits, greedy agreement, batch invariance."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.bench.runners import Runner
from common.core.request import Request
from common.parallel.launch import share


def fidelity(
    runner: Runner,
    requests: list[Request],
    reference: Path,
    is_baseline: bool,
    outputs: list[list[int]],
    writer: bool = True,
) -> dict:
    """Teacher-force the baseline's output through this variant; compare logits with the
    baseline's teacher-forced logits. The baseline writes the reference. In a parallel run
    every rank runs the same forwards; only rank 0 (the writer) reads and writes files."""
    if is_baseline:
        logits = {
            f"r{i}": _teacher_forced(runner, r, o).contiguous()
            for i, (r, o) in enumerate(zip(requests, outputs))
        }
        if writer:
            save_file(logits, str(reference / "logits.safetensors"))
            torch.save(outputs, reference / "outputs.pt")
        pairs = [(t, t) for t in logits.values()]  # against itself: only non-finite counts
        ref_outputs = outputs
    else:
        ref_outputs = share(
            torch.load(reference / "outputs.pt", weights_only=True) if writer else None
        )
        got = [_teacher_forced(runner, r, o) for r, o in zip(requests, ref_outputs)]
        ref = load_file(str(reference / "logits.safetensors")) if writer else None
        pairs = [(g, ref[f"r{i}"] if ref else g) for i, g in enumerate(got)]
    same = sum(list(o) == list(r) for o, r in zip(outputs, ref_outputs)) / len(ref_outputs)
    return {**compare_logits(pairs), "same_outputs": same}


def _teacher_forced(runner: Runner, r: Request, continuation: list[int]) -> torch.Tensor:
    """Through decode steps, so a variant's decode path (its decode kernels, a compiled
    step) is what is compared. Requests with images hand their content to the runner too."""
    extra = (r.mm_items,) if r.mm_items else ()
    return runner.teacher_forced_logits(r.prompt, continuation, *extra, stepwise=True)


def perplexity(runner: Runner, blocks: torch.Tensor) -> float:
    """exp(mean next-token NLL) over held-out token blocks [n, T], each teacher-forced through
    the variant from its first token (so every variant sees the same text the same way)."""
    nll, count = 0.0, 0
    for block in blocks.tolist():
        logits = runner.teacher_forced_logits(block[:1], block[1:]).float()
        nll += float(F.cross_entropy(logits, torch.tensor(block[1:]), reduction="sum"))
        count += len(block) - 1
    return math.exp(nll / count)


def compare_logits(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Greedy agreement and max |difference| over [tokens, vocab] logit pairs. A position with
    a non-finite logit on either side is the worst case, never a match: it disagrees, and
    makes the error inf (NaN would vanish from max() and read as perfect agreement). A peer
    that gives only greedy token ids ([tokens]) has agreement but no error (NaN: not shown)."""
    agree = total = 0
    err = 0.0
    for got, ref in pairs:
        if got.dim() == 1:  # a peer's greedy token ids only: agreement, no logit error
            agree += int((got == ref.argmax(-1)).sum())
            total += got.numel()
            err = math.nan
            continue
        finite = torch.isfinite(got).all(-1) & torch.isfinite(ref).all(-1)
        agree += int(((got.argmax(-1) == ref.argmax(-1)) & finite).sum())
        total += finite.numel()
        if not finite.all():
            err = math.inf
        elif finite.any():
            err = max(err, float((got - ref).abs().max()))
    return {"token_agreement": agree / total if total else math.nan, "max_logit_err": err}


def same_as_alone(runner: Runner, requests: list[Request], outputs: list[list[int]]) -> dict:
    """Run every request by itself through the same variant: the share whose tokens equal
    what it produced inside the batch (batch invariance; exact in fp32, where batch
    composition cannot change rounding)."""
    alone = [runner.generate([r])[0].tokens for r in requests]
    same = sum(a == list(o) for a, o in zip(alone, outputs)) / len(requests)
    return {"same_as_alone": same}
