"""Next-token selection with transformers' logits processors, re-implemented for ragged batches.

Each processor reproduces the transformers class named in its comment (same order, same math, float32), so a
recipe's output can be checked token for token against `model.generate`. Histories are per-row token lists
(prompt + generated, no padding), which is what transformers sees when it runs each sequence unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from common.errors import RecipeError

# Left-pad value for ragged histories; negative so it never equals a real token id (see _history_tensor).
_PAD = -1


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False  # False = greedy (argmax after the logits processors)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> RecipeError:
            return RecipeError(
                f"sampling: {name}={getattr(self, name)!r} is invalid; expected {valid}"
            )

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "True or False")
        # Temperature only matters when sampling; greedy callers often pass 0 to mean "greedy".
        if self.do_sample and not (is_real(self.temperature) and self.temperature > 0):
            raise bad(
                "temperature",
                "a finite float > 0 when do_sample=True (use do_sample=False for greedy)",
            )
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "a float in (0, 1] (1.0 = off)")
        if not (is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a finite float > 0 (1.0 = off)")
        if not (is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0):
            raise bad("no_repeat_ngram_size", "an integer >= 0 (0 = off)")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise bad("seed", "None or an integer in [0, 2**64)")


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


def _select(scores: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample(
    logits: Tensor,
    histories: list[list[int]] | Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row, [B] int64. A sequence of params (one per row) is processed in groups of equal params,
    in order of first appearance, so draws from `generator` are deterministic for a given batch."""
    if isinstance(params, SamplingParams):
        return _select(process_logits(logits, histories, params), params, generator)
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} logits rows")
    groups: dict[SamplingParams, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p, []).append(row)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for p, rows in groups.items():
        sub_histories = (
            histories[rows] if isinstance(histories, Tensor) else [histories[r] for r in rows]
        )
        out[rows] = _select(process_logits(logits[rows], sub_histories, p), p, generator)
    return out
