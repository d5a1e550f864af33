"""Encoder-feature cache: what an encoder computed for a piece of content (an image's merged
vision features), keyed by a hash of that content, so a repeated image skips the encoder.
LRU under a byte budget, like the prefix cache's free-block LRU but for encoder outputs."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor


class FeatureCache:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"feature cache budget must be > 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.entries: OrderedDict[bytes, Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: bytes) -> Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: Tensor) -> None:
        """Keep value (evicting the least recently used entries to fit); a value larger than
        the whole budget is not kept."""
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.budget:
            return
        while self.nbytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
            self.evictions += 1
        self.entries[key] = value
        self.nbytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = self.hits = self.misses = self.evictions = 0
