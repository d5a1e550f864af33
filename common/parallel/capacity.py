"""How many sequences fit in a KV budget, contiguous against paged (the bench's "seqs in
budget" columns; the GQA table)."""

from __future__ import annotations

from dataclasses import dataclass

from common.core.errors import RecipeError


def contiguous_fit(budget_bytes: int, slots: int, per_token: int) -> int:
    """Sequences that fit when each reserves `slots` token slots."""
    return budget_bytes // (slots * per_token)


@dataclass(frozen=True)
class KVCapacity:
    budget_bytes: int
    contiguous: int  # sequences that fit when each reserves max_len slots
    paged: int  # sequences that fit when each takes ceil(length / block_size) blocks


def kv_capacity(
    lengths: list[int],
    per_token: int,
    block_size: int,
    batch: int,
    max_len: int | None = None,
    budget_bytes: int | None = None,
) -> KVCapacity:
    """How many sequences of these lengths (in order, cycling) fit in one KV budget.
    Contiguous gives each max_len slots (default: the longest length); paged gives each
    ceil(length / block_size) blocks of a pool of whole blocks. The default budget is the pool
    a paged cache allocates for `batch` sequences of max_len (batch x ceil(max_len / block)
    blocks, as make_cache does), so both layouts count against whole blocks: a budget of
    batch x max_len slots floored to blocks would not hold one sequence that ends mid-block."""
    if not lengths:
        raise RecipeError("KV capacity needs at least one sequence length")
    slots = max_len or max(lengths)
    block_bytes = block_size * per_token
    budget = (
        budget_bytes if budget_bytes is not None else batch * -(-slots // block_size) * block_bytes
    )
    needs = [-(-n // block_size) for n in lengths]
    cycles, blocks_left = divmod(budget // block_bytes, sum(needs))
    paged = cycles * len(needs)
    for need in needs:
        if need > blocks_left:
            break
        blocks_left -= need
        paged += 1
    return KVCapacity(budget, contiguous_fit(budget, slots, per_token), paged)
