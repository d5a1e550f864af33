"""What runs over several ranks: layouts and settings that compose with tensor and pipeline
parallel, checked before any rank starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.core.errors import RecipeError
from common.parallel.layout import Layout, shard

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs

ROW_KV = ("dynamic", "contiguous")  # what a pipeline micro-batch keeps its KV in


def check_parallel(
    par: Any,
    args: ModelArgs,
    kv_kind: str,
    offload: str,
    peer: str | None,
    workload_kind: str,
    batch: int,
    compiled: bool = False,
) -> None:
    """One variant's settings against its parallel layout; a clear line for what does not
    compose."""
    if compiled and (par.tp * par.pp > 1 or offload != "none"):
        raise RecipeError(
            "compile traces one device's whole decode step; it does not compose with "
            "parallel.tp/pp or offload yet: drop one of them"
        )
    shard(args, Layout(par.tp, par.pp))  # tp divides heads and channels, pp <= layers
    if par.tp * par.pp == 1:
        return
    where = " ".join(f"parallel.{k}={n}" for k, n in (("tp", par.tp), ("pp", par.pp)) if n > 1)
    if peer:
        raise RecipeError(
            f"bench.peers runs transformers' generate() on one device; drop it with {where}"
        )
    if workload_kind == "online":
        raise RecipeError(
            f"workload=online times arrivals on each rank's clock, so ranks would schedule "
            f"differently; use an offline workload with {where}"
        )
    if offload != "none":
        raise RecipeError(f"offload={offload} streams one device's layers; drop it with {where}")
    if par.pp > 1:
        if kv_kind not in ROW_KV:
            raise RecipeError(
                f"parallel.pp={par.pp} keeps each micro-batch's KV in rows: kv_cache.kind="
                f"{kv_kind} (+opt=paged_kv, cont_batch, prefix_cache, no_kv_cache) does not "
                "compose with it; use the default KV or +opt=static_kv"
            )
        if par.micro_batches > batch:
            raise RecipeError(
                f"parallel.micro_batches={par.micro_batches} exceeds the static batch "
                f"(scheduler.max_batch={batch}); use at most that many micro-batches"
            )
