"""Storage work a step needs before its forward: what the KV manager (scheduler side) asks
the K/V storage (runner side) to do. Plain data, so the scheduler never touches tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVOps:
    # paged, applied in this order: swap-outs (device block, host block) first, since their
    # device blocks may be handed out again this step; copy-on-write copies (src, dst);
    # swap-ins (host block, device block)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # row storage: a new static batch starts, with (rows, longest sequence)
    new_rows: tuple[int, int] | None = None
    # row storage: (row, tokens kept) after a rejected speculation; applied before the forward
    truncate: list[tuple[int, int]] = field(default_factory=list)
    # row storage: row i takes a copy of row reorder[i] (beam search), before the forward
    reorder: list[int] | None = None

    def __bool__(self) -> bool:
        return bool(
            self.swap_out or self.copies or self.swap_in or self.new_rows or self.truncate
            or self.reorder is not None
        )  # fmt: skip
