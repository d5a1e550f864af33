"""Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the
sequence's last n tokens (n from ngram_max down to ngram_min) in prompt + output, and
propose the k tokens that followed it. No model, no KV: it pays off when the output
copies its input (quoting, summarizing, editing code)."""

from __future__ import annotations

from torch import Tensor

from common.core.request import SamplingParams


def lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n :]
        first = suffix[0]
        # latest start i < size - n whose n tokens equal the suffix (and something follows)
        for i in range(size - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


class NgramDrafter:
    def __init__(self, n_max: int, n_min: int) -> None:
        self.n_max, self.n_min = n_max, n_min
        self.probs: dict[int, Tensor] = {}  # always empty: proposals are deterministic

    def propose(
        self, seq_id: int, tokens: list[int], k: int, final_len: int, sampling: SamplingParams
    ) -> list[int]:
        return lookup(tokens, k, self.n_max, self.n_min)

    def reset(self) -> None:
        return None
