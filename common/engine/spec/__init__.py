"""Speculative decoding: a drafter proposes up to k tokens per sequence, the target model
verifies them in the same forward that computes the sequence's next token, and rejected
tokens' KV is rewound. Greedy output equals non-speculative greedy decoding; sampled output
follows the target's distribution exactly (verify.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from common.core.errors import RecipeError
from common.core.request import SamplingParams

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpecConfig:
    method: str = "ngram"  # ngram (prompt lookup) | draft (a smaller model, same vocabulary)
    k: int = 4  # tokens proposed per sequence and step
    ngram_max: int = 4  # longest suffix n-gram looked up
    ngram_min: int = 1  # shortest
    max_batch: int | None = None  # speculate only while at most this many sequences run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(
                f"unknown spec.method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.k < 1:
            raise RecipeError(f"spec.k must be >= 1, got {self.k}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise RecipeError(
                f"spec.ngram needs 1 <= min <= max, got min={self.ngram_min} max={self.ngram_max}"
            )
        if self.max_batch is not None and self.max_batch < 1:
            raise RecipeError(f"spec.max_batch must be >= 1 or null, got {self.max_batch}")


class Drafter(Protocol):
    # q: the distribution each proposed token was drawn from [n, V], per sequence, for the
    # last proposal (absent: a deterministic proposal, q is a point mass)
    probs: dict[int, Tensor]

    def propose(
        self, seq_id: int, tokens: list[int], k: int, final_len: int, sampling: SamplingParams
    ) -> list[int]:
        """Up to k tokens to follow `tokens` (prompt + output so far)."""

    def reset(self) -> None:
        """Forget every sequence (a new generate call)."""
