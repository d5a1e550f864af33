"""What KV storage a variant uses: kind, int8, block size, budget, prefix caching."""

from __future__ import annotations

from dataclasses import dataclass

from common.core.errors import RecipeError

# dynamic: grow by concatenation (the baseline); contiguous: preallocated rows;
# none: keep nothing, recompute; paged: a block pool read through block tables
KV_KINDS = ("dynamic", "contiguous", "none", "paged")


@dataclass(frozen=True)
class KVSpec:
    kind: str = "dynamic"
    int8: bool = False  # int8 K/V with per-token, per-head scales (contiguous and paged)
    block_size: int = 16  # paged
    budget_bytes: int | None = None  # paged pool size; None = room for the whole batch
    prefix_cache: bool = False  # paged: reuse full blocks across requests
    # contiguous: slots reserved per sequence, as a server sized for its longest accepted
    # request (vLLM's max_model_len); None = the batch's own longest sequence
    max_len: int | None = None
    # decode steps keep static shapes (a compiled decode step). contiguous: every step reads
    # the whole preallocated cache with each row's length as data and writes by position;
    # paged: decode rows padded to the batch's slots, block tables to the model's max length
    static: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KV_KINDS:
            raise RecipeError(
                f"unknown kv_cache.kind {self.kind!r}; choose one of {', '.join(KV_KINDS)}"
            )
        if self.int8 and self.kind not in ("contiguous", "paged"):
            raise RecipeError(
                "int8 KV needs kv_cache.kind contiguous or paged (+opt=static_kv or paged_kv)"
            )
        if self.prefix_cache and self.kind != "paged":
            raise RecipeError("prefix_cache needs kv_cache.kind=paged (+opt=paged_kv)")
        if self.static and self.kind not in ("contiguous", "paged"):
            raise RecipeError(
                f"static decode shapes need kv_cache.kind contiguous or paged, not {self.kind}"
            )
        if self.block_size <= 0:
            raise RecipeError(f"kv_cache.block_size must be > 0, got {self.block_size}")
        if self.max_len is not None and self.max_len <= 0:
            raise RecipeError(f"kv_cache.max_len must be > 0, got {self.max_len}")

    @property
    def paged(self) -> bool:
        return self.kind == "paged"
