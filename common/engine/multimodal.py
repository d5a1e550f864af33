"""Extra model inputs for prompts with encoded content (images): per-sequence state, the
encoder (with the optional feature cache and a background thread), and the batch tensors
the model takes (`embeds`, `rope_positions`). Nothing here knows a model family: it speaks
to MultimodalLM's `encode` and `rope_table`."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.core.request import MultimodalItem, Request
from common.kv.feature_cache import FeatureCache
from common.nn.causal_lm import CausalLM, MultimodalLM


def content_digest(*tensors: Tensor) -> bytes:
    """A hash of tensors' dtypes, shapes and bytes: equal content, equal key."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


@dataclass(eq=False)
class SeqContent:
    """One sequence's encoded content: its items, their features once encoded, and the
    prompt's rotary positions when the model has its own ([axes, prompt_len] + offset)."""

    items: tuple[MultimodalItem, ...]
    features: list[Tensor | None]
    table: Tensor | None = None
    delta: int = 0
    pending: Future | None = field(default=None, repr=False)  # a background encode

    def needed(self, start: int, n: int) -> list[int]:
        """Items overlapping positions [start, start + n) whose features are missing."""
        return [
            i
            for i, it in enumerate(self.items)
            if self.features[i] is None and it.start < start + n and start < it.start + it.length
        ]


def check_items(model: CausalLM, req: Request) -> None:
    if not req.mm_items:
        return
    if not isinstance(model, MultimodalLM):
        raise RecipeError(f"{type(model).__name__} takes no images; give a text-only workload")
    end = 0
    for it in req.mm_items:
        if it.start < end or it.length <= 0 or it.start + it.length > len(req.prompt):
            raise RecipeError(
                f"image placeholders [{it.start}, {it.start + it.length}) must lie inside the "
                f"{len(req.prompt)}-token prompt, in order, without overlapping"
            )
        end = it.start + it.length


class Encoder:
    """Runs the model's encoder for the items a step needs, through the feature cache when
    there is one; with overlap, encodes waiting sequences' items in a worker thread while
    the language model runs (`prefetch`), and counts how much encode time that hid."""

    def __init__(
        self, model: MultimodalLM, device: torch.device, cache_bytes: int | None, overlap: bool
    ) -> None:
        self.model, self.device = model, device
        self.cache = FeatureCache(cache_bytes) if cache_bytes else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="encoder") if overlap else None
        self.lock = threading.Lock()  # the cache and the counters, shared with the worker
        # encode_s: encoder time; encoded_items; cache_hits / cache_lookups;
        # hidden_s: encode time that finished in the background before it was needed;
        # prefetched: background encodes used; wait_s: time a step waited for one
        self.stats: Counter[str] = Counter()

    def prepare(self, req: Request) -> SeqContent | None:
        if not req.mm_items:
            return None
        content = SeqContent(req.mm_items, [None] * len(req.mm_items))
        table = self.model.rope_table(len(req.prompt), list(req.mm_items))
        if table is not None:
            content.table, content.delta = table[0].to(self.device), table[1]
        return content

    def reset(self) -> None:
        self.stats.clear()
        if self.cache is not None:
            self.cache.clear()

    def _encode(self, content: SeqContent, which: list[int]) -> float:
        """Fill content.features[i] for i in which (cache first); returns encoder seconds."""
        todo = []
        for i in which:
            key = content.items[i].digest
            hit = None
            if self.cache is not None:
                with self.lock:
                    hit = self.cache.get(key)
                    self.stats.update(cache_lookups=1, cache_hits=hit is not None)
            if hit is None:
                todo.append(i)
            else:
                content.features[i] = hit
        if not todo:
            return 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            features = self.model.encode([content.items[i] for i in todo])
        seconds = time.perf_counter() - t0
        for i, f in zip(todo, features):
            content.features[i] = f
            if self.cache is not None:
                with self.lock:
                    self.cache.put(content.items[i].digest, f)
        with self.lock:
            self.stats.update(encode_s=seconds, encoded_items=len(todo))
        return seconds

    def ensure(self, rows: list[tuple[SeqContent | None, int, int]]) -> None:
        """Every item overlapping a row's chunk (content, start, n) has its features."""
        for content, start, n in rows:
            if content is None:
                continue
            if content.pending is not None:
                t0 = time.perf_counter()
                seconds = content.pending.result()
                waited = time.perf_counter() - t0
                content.pending = None
                self.stats.update(prefetched=1, wait_s=waited, hidden_s=max(0.0, seconds - waited))
            if which := content.needed(start, n):
                self._encode(content, which)

    def prefetch(self, contents: list[SeqContent | None]) -> None:
        """Start encoding these sequences' items in the background (overlap only)."""
        if self.pool is None:
            return
        for c in contents:
            if c is not None and c.pending is None and any(f is None for f in c.features):
                c.pending = self.pool.submit(self._encode, c, list(range(len(c.items))))


def model_inputs(
    rows: list[tuple[SeqContent | None, int, int]], positions: Tensor, packed: bool = False
) -> dict:
    """The model's extra inputs for a batch whose row r computes positions[r] (row r's
    chunk starts at rows[r][1]), or, packed, whose one row holds each entry's tokens one
    after another: embeddings for the placeholders in each chunk, and rotary positions from
    each entry's table (past the prompt: position + offset)."""
    if all(c is None for c, _, _ in rows):
        return {}
    flat = positions.flatten()
    t = positions.shape[1]
    # where each entry's tokens begin in the flattened batch
    offsets = (
        itertools.accumulate((n for _, _, n in rows), initial=0)
        if packed
        else itertools.count(0, t)
    )
    index, values, spans = [], [], []
    for (content, start, n), at in zip(rows, offsets):
        if content is None:
            continue
        spans.append((content, at, n))
        for it, feats in zip(content.items, content.features):
            lo, hi = max(start, it.start), min(start + n, it.start + it.length)
            if lo < hi:
                index.append(torch.arange(lo - start, hi - start) + at)
                values.append(feats[lo - it.start : hi - it.start])
    extra = {}
    if index:
        extra["embeds"] = (torch.cat(index).to(positions.device), torch.cat(values))
    tables = [c.table for c, _, _ in spans if c.table is not None]
    if tables:
        rope = flat[None].expand(tables[0].shape[0], -1).clone()
        for content, at, n in spans:
            if content.table is None:
                continue
            pos, size = flat[at : at + n], content.table.shape[1]
            inside = content.table[:, pos.clamp(max=size - 1)]
            rope[:, at : at + n] = torch.where(pos < size, inside, pos + content.delta)
        extra["rope_positions"] = rope.view(-1, *positions.shape)
    return extra
