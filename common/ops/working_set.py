"""What a linear op's measurement cycles through (an Op's bench_args): the call's arguments
and copies of its weight, so each timed call reads its weight from where a real decode
step does. A model's weights together exceed a small L3 cache (and fit a huge one, where
the copies fit too); timing one weight over and over would time the cache instead."""

from __future__ import annotations

import functools
from pathlib import Path

_CAP = 256 << 20  # bytes of weight copies the measurement cycles through, at most
_MAX_COPIES = 64


@functools.cache
def l3_bytes() -> int:
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 32 << 20
    return int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)


def weight_copies(args: tuple) -> list[tuple]:
    """args, then args with copies of the weight (args[1]) filling twice the L3 cache (up to
    256 MiB); on an accelerator, args alone."""
    x, weight, *rest = args
    if not x.is_cpu:
        return [args]
    copies = min(2 * l3_bytes(), _CAP) // max(weight.nbytes, 1)
    return [args] + [(x, weight.clone(), *rest) for _ in range(min(copies, _MAX_COPIES))]
