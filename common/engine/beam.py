"""Beam search with transformers' semantics (GenerationMixin._beam_search, 5.x): the same
tensor operations in the same order, so sequences and scores match `generate(num_beams=...)`.

Each step keeps the top max(2, 1 + #eos) * num_beams continuations of all running beams by
accumulated log-probability; continuations that end (EOS or max length) compete for the
num_beams finished slots with score sum(logprobs) / generated_length ** length_penalty; the
best num_beams unfinished ones run on. `early_stopping` decides when the search ends: True
once num_beams hypotheses are finished, False when a heuristic says the best running beam
cannot beat the worst finished one at its current length, "never" when it cannot at the
best possible length.

KV: the prompt is prefilled once; beams share it. With paged KV a new beam is a fork of the
beam it continues (its blocks shared, the partly filled last block copied on write); with
row storage each beam is a row and the rows are gathered (copied) every step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.core.request import Completion, Request, SamplingParams
from common.engine.plan import ScheduledSeq, StepPlan
from common.engine.runner import ModelRunner
from common.engine.sampler import process_logits
from common.kv.manager import PagedKVManager
from common.kv.ops import KVOps

_NEG = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class BeamConfig:
    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise RecipeError(f"generation.num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in (True, False, "never"):
            raise RecipeError(
                f"generation.early_stopping must be true, false or never, got {self.early_stopping!r}"
            )


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _BeamKV:
    """Where each running beam's KV lives, and the ops that make beam b continue beam src[b]."""

    def __init__(self, runner: ModelRunner, paged: PagedKVManager | None, beams: int) -> None:
        self.runner, self.paged, self.beams = runner, paged, beams
        self.ids = itertools.count()
        self.seqs: list[int] = []  # paged: seq id per running beam
        self.ops = KVOps()

    def prefill(self, prompt: list[int], max_len: int) -> tuple[int, int | list[int]]:
        """Room for the prompt; returns (tokens already cached, where the prompt goes)."""
        if self.paged is None:
            self.ops = KVOps(new_rows=(self.beams, max_len))
            return 0, 0
        seq = next(self.ids)
        cached = self.paged.allocate(seq, prompt, max_len)
        self.paged.grow(seq, len(prompt))
        self.seqs = [seq] * self.beams
        return cached, self.paged.locate(seq)

    def follow(self, src: list[int], length: int) -> list[int | list[int]]:
        """Beam b continues beam src[b] and will hold `length` tokens; returns each beam's KV."""
        if self.paged is None:
            self.ops = KVOps(reorder=src)
            return list(range(self.beams))
        old, self.seqs = self.seqs, []
        for s in src:
            seq = next(self.ids)
            self.paged.fork(old[s], seq)
            self.seqs.append(seq)
        for seq in set(old):
            self.paged.free(seq)
        for seq in self.seqs:
            self.paged.grow(seq, length)
        return [self.paged.locate(s) for s in self.seqs]

    def take_ops(self) -> KVOps:
        if self.paged is not None:
            return self.paged.take_ops()
        ops, self.ops = self.ops, KVOps()
        return ops

    def close(self) -> None:
        if self.paged is not None:
            for seq in set(self.seqs):
                self.paged.free(seq)

    def track(self) -> None:
        self.runner.track(self.paged.usage() if self.paged is not None else None)


def beam_search(
    runner: ModelRunner,
    paged: PagedKVManager | None,
    req: Request,
    limit: int,
    eos_ids: frozenset[int],
    cfg: BeamConfig,
) -> Completion:
    """One request's beam search; limit: max_new_tokens lowered to the model's positions."""
    params = req.sampling or SamplingParams()
    if params.do_sample:
        raise RecipeError(
            "beam search samples nothing here: use do_sample=false with num_beams > 1"
        )
    nb, prompt, p_len = cfg.num_beams, list(req.prompt), len(req.prompt)
    max_length = p_len + limit
    eos = torch.tensor(sorted(eos_ids) if not req.ignore_eos else [], dtype=torch.long)
    keep = max(2, 1 + len(eos)) * nb
    top_mask = torch.cat(
        (torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool))
    )
    fill = int(eos[0]) if len(eos) else -1
    running = torch.full((1, nb, max_length), fill, dtype=torch.long)
    running[:, :, :p_len] = torch.tensor(prompt)
    sequences = running.clone()
    run_scores = torch.zeros(1, nb)
    run_scores[:, 1:] = _NEG
    scores = torch.full((1, nb), _NEG)
    finished = torch.zeros((1, nb), dtype=torch.bool)
    improvable = torch.ones((1, 1), dtype=torch.bool)
    run_index = torch.full((1, nb, max_length - p_len), -1, dtype=torch.int32)
    index = run_index.clone()
    kv = _BeamKV(runner, paged, nb)
    start = time.perf_counter()
    times: list[float] = []

    cached, where = kv.prefill(prompt, max_length)
    entry = ScheduledSeq(0, cached, prompt[cached:], True, False, prompt, params, where)
    _, logits = runner.run(StepPlan([entry], kv.take_ops(), nb))
    logits = logits.expand(nb, -1)  # every beam starts from the prompt
    cur = p_len
    while True:
        kv.track()
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        histories = running[0, :, :cur].tolist()
        log_probs = process_logits(log_probs, histories, params)
        vocab = log_probs.shape[-1]
        flat = (log_probs.view(1, nb, vocab) + run_scores[:, :, None]).reshape(1, -1)
        # the top `keep` continuations of all beams
        topk_lp, topk_idx = torch.topk(flat, k=keep)
        from_beam = topk_idx // vocab
        topk_index = _gather(run_index, from_beam)
        topk_seqs = _gather(running, from_beam)
        topk_seqs[:, :, cur] = topk_idx % vocab
        topk_index[:, :, cur - p_len] = from_beam.to(torch.int32)
        hits = torch.isin(topk_seqs[:, :, cur], eos) | (cur + 1 >= max_length)
        # the best num_beams that did not end run on
        topk_running = topk_lp + hits.to(torch.float32) * _NEG
        nxt = torch.topk(topk_running, k=nb)[1]
        running = _gather(topk_seqs, nxt)
        run_scores = _gather(topk_running, nxt)
        run_index = _gather(topk_index, nxt)
        # finished hypotheses: the ended ones among the top num_beams, length-penalized
        just_done = hits & top_mask[None, :]
        cand = topk_lp / ((cur + 1 - p_len) ** cfg.length_penalty)
        full = torch.all(finished, dim=-1, keepdim=True) & (cfg.early_stopping is True)
        cand = cand + full.to(torch.float32) * _NEG
        cand = cand + (~improvable).to(torch.float32) * _NEG
        cand = cand + (~just_done) * _NEG
        merged = torch.topk(torch.cat((scores, cand), dim=1), k=nb)[1]
        sequences = _gather(torch.cat((sequences, topk_seqs), dim=1), merged)
        scores = _gather(torch.cat((scores, cand), dim=1), merged)
        index = _gather(torch.cat((index, topk_index), dim=1), merged)
        finished = _gather(torch.cat((finished, just_done), dim=1), merged)
        src = run_index[0, :, cur - p_len].tolist()
        cur += 1
        times.append(time.perf_counter() - start)
        # can a running beam still beat the worst finished one?
        best_len = (
            max_length - p_len
            if cfg.early_stopping == "never" and cfg.length_penalty > 0.0
            else cur - p_len
        )
        best_running = run_scores[:, :1] / (best_len**cfg.length_penalty)
        worst = torch.where(finished, torch.min(scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_running > worst, dim=-1, keepdim=True)
        open_beam = ~(torch.all(finished) & (cfg.early_stopping is True))
        if not bool(torch.any(improvable) & open_beam & ~torch.all(hits)):
            break
        wheres = kv.follow(src, cur)
        entries = [
            ScheduledSeq(
                b,
                cur - 1,
                [int(running[0, b, cur - 1])],
                True,
                True,
                running[0, b, :cur].tolist(),
                params,
                wheres[b],
            )  # fmt: skip
            for b in range(nb)
        ]
        _, logits = runner.run(StepPlan(entries, kv.take_ops(), nb))
    kv.close()
    generated = int((index[0, 0] != -1).sum())
    tokens = sequences[0, 0, p_len : p_len + generated].tolist()
    reason = "eos" if tokens and tokens[-1] in eos_ids and not req.ignore_eos else "length"
    return Completion(tokens, reason, times[:generated], score=float(scores[0, 0]))
