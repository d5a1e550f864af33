"""Next-token selection with transformers' logits processors, re-implemented for ragged batches.

Each processor reproduces the transformers class named in its comment (same order, same math, float32), so a
recipe's output can be checked token for token against `model.generate`. Histories are per-row token lists
(prompt + generated, no padding), which is what transformers sees when it runs each sequence unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from common.core.request import SamplingParams

# Left-pad value for ragged histories; negative so it never equals a real token id (see _history_tensor).
_PAD = -1


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on `device`, or None to use torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _history_tensor(histories: list[list[int]] | Tensor, device: torch.device) -> Tensor:
    """[B, L] int64; ragged rows are left-padded with _PAD so every row's suffix ends at column L-1."""
    if isinstance(histories, Tensor):
        return histories.to(device=device, dtype=torch.long)
    width = max((len(h) for h in histories), default=0)
    rows = [[_PAD] * (width - len(h)) + list(h) for h in histories]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(histories), width)


def _spare_column(ids: Tensor, vocab_size: int) -> Tensor:
    """Map padding and ids beyond the logits' vocab to an extra column that gets dropped afterwards."""
    return torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)


def _repetition_penalty(scores: Tensor, ids: Tensor, penalty: float) -> Tensor:
    # RepetitionPenaltyLogitsProcessor: each seen token once, negative scores *penalty, positive /penalty.
    vocab_size = scores.shape[-1]
    ids = _spare_column(ids, vocab_size)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab_size]


def _no_repeat_ngram(scores: Tensor, ids: Tensor, n: int) -> Tensor:
    # NoRepeatNGramLogitsProcessor: ban every token that would complete an n-gram already in the history.
    # Left padding is harmless: _PAD never equals a real token, and for n=1 its windows land in the spare column.
    # Rows shorter than n ban nothing, because no window of real tokens can match their (partly padded) prefix.
    if ids.shape[1] < n:
        return scores
    vocab_size = scores.shape[-1]
    prefix = ids[:, ids.shape[1] + 1 - n :]
    windows = ids.unfold(dimension=1, size=n, step=1)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    targets = torch.where(matches, _spare_column(windows[..., -1], vocab_size), vocab_size)
    banned = scores.new_zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool)
    banned.scatter_(1, targets, True)
    return scores.masked_fill(banned[:, :vocab_size], -math.inf)


def _top_k(scores: Tensor, k: int) -> Tensor:
    # TopKLogitsWarper: ties with the k-th score survive.
    kth = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def _top_p(scores: Tensor, p: float) -> Tensor:
    # TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - p, always keeping the top token.
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def process_logits(
    logits: Tensor, histories: list[list[int]] | Tensor, params: SamplingParams
) -> Tensor:
    """Apply transformers' logits processors (and, if sampling, its warpers) to [B, V] logits; returns float32."""
    if logits.dim() != 2 or len(histories) != logits.shape[0]:
        raise ValueError(
            f"logits must be [B, V] with one history per row; got {tuple(logits.shape)} and {len(histories)} histories"
        )
    scores = logits.float()
    if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0:
        ids = _history_tensor(histories, scores.device)
        if params.repetition_penalty != 1.0:
            scores = _repetition_penalty(scores, ids, params.repetition_penalty)
        if params.no_repeat_ngram_size > 0:
            scores = _no_repeat_ngram(scores, ids, params.no_repeat_ngram_size)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if params.top_k > 0:
            scores = _top_k(scores, params.top_k)
        if params.top_p < 1.0:
            scores = _top_p(scores, params.top_p)
    return scores


def _select(
    scores: Tensor, params: SamplingParams, generator: torch.Generator | None, with_probs: bool
) -> tuple[Tensor, Tensor | None]:
    if not params.do_sample:
        return scores.argmax(dim=-1), scores.softmax(dim=-1) if with_probs else None
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(
        1
    ), probs if with_probs else None


def sample_with_probs(
    logits: Tensor,
    histories: list[list[int]] | Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None | Sequence[torch.Generator | None] = None,
    with_probs: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Next token per row [B] int64 and, with_probs, the distribution it was drawn from
    [B, V] float32 (softmax of the processed scores; greedy: without the sampling warpers),
    which speculative decoding compares. A sequence of params (one per row) is processed in
    groups of equal params (and, given one generator per row, equal generators), in order
    of first appearance, so draws from a generator are deterministic for a given batch."""
    if isinstance(params, SamplingParams):
        return _select(process_logits(logits, histories, params), params, generator, with_probs)
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} logits rows")
    gens = generator if isinstance(generator, Sequence) else [generator] * len(params)
    groups: dict[tuple[SamplingParams, int], list[int]] = {}
    for row, (p, g) in enumerate(zip(params, gens)):
        groups.setdefault((p, id(g)), []).append(row)
    if len(groups) == 1:  # every row alike (the common case): no gather and scatter per step
        return _select(process_logits(logits, histories, params[0]), params[0], gens[0], with_probs)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    probs = logits.new_empty(logits.shape, dtype=torch.float32) if with_probs else None
    for (p, _), rows in groups.items():
        sub_histories = (
            histories[rows] if isinstance(histories, Tensor) else [histories[r] for r in rows]
        )
        scores = process_logits(logits[rows], sub_histories, p)
        out[rows], sub_probs = _select(scores, p, gens[rows[0]], with_probs)
        if probs is not None:
            probs[rows] = sub_probs
    return out, probs


def sample(
    logits: Tensor,
    histories: list[list[int]] | Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row, [B] int64 (sample_with_probs without the probabilities)."""
    return sample_with_probs(logits, histories, params, generator, with_probs=False)[0]
