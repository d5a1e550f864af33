"""The memory calculator: what one device holds while serving `batch` sequences of `context`
tokens, and the largest batch x context that fits a device (scripts/plan.py memory).

Built on the memory model (common/parallel/memory.py). The forward whose activations and
workspace count is the larger of the two a server runs: a prefill of `prefill_rows` prompts
of `context` tokens (1: one request's prompt at a time, as continuous batching admits them;
the recipes' static batches prefill the whole batch) and a decode step of all `batch` rows
reading `context` keys each. KV holds `batch x context` tokens (contiguous, or paged with
every block full).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.core.errors import RecipeError
from common.parallel.layout import ONE_DEVICE, Layout
from common.parallel.memory import DeviceMemory, Scheme, as_format, device_memory

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs


@dataclass(frozen=True)
class Serving:
    """What is served and how: everything but the batch and context."""

    dtype: torch.dtype = torch.bfloat16
    scheme: Scheme = "none"
    kv_int8: bool = False
    layout: Layout = ONE_DEVICE
    prefill_rows: int = 1
    eager_attention: bool = False  # fused attention does not materialize the score matrix
    other_params: int = 0  # parameters outside the decoder (a vision tower)


def serving_memory(
    args: ModelArgs, serving: Serving, batch: int, context: int
) -> list[DeviceMemory]:
    """Each pipeline stage's device at its peak: weights, KV of batch x context tokens and the
    larger forward (prefill or decode; see the module docstring)."""
    s = serving
    common = dict(
        dtype=s.dtype,
        layout=s.layout,
        scheme=as_format(s.scheme),
        kv_int8=s.kv_int8,
        kv_tokens=batch * context,
        eager_attention=s.eager_attention,
        other_params=s.other_params,
    )
    prefill = device_memory(
        args, batch=min(s.prefill_rows, batch), seq_len=context, context=context, **common
    )
    decode = device_memory(args, batch=batch, seq_len=1, context=context, **common)
    return [max(p, d, key=lambda m: m.activations + m.workspace) for p, d in zip(prefill, decode)]


def peak_bytes(args: ModelArgs, serving: Serving, batch: int, context: int) -> int:
    """The fullest device's bytes (the stage that decides whether a layout fits)."""
    return max(m.total for m in serving_memory(args, serving, batch, context))


def _largest(fits, hi: int) -> int:
    """The largest n in [0, hi] with fits(n), for fits monotone (true up to some n)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_batch(args: ModelArgs, serving: Serving, context: int, device_bytes: int) -> int:
    """The most sequences of `context` tokens one replica serves within device_bytes (0: not
    even one)."""
    _check_budget(device_bytes)
    hi = max(1, device_bytes // max(1, context))  # KV takes at least a byte per token
    return _largest(lambda b: b == 0 or peak_bytes(args, serving, b, context) <= device_bytes, hi)


def max_context(
    args: ModelArgs, serving: Serving, batch: int, device_bytes: int, limit: int | None = None
) -> int:
    """The longest context `batch` sequences can each reach within device_bytes, up to `limit`
    (default: the model's max_position_embeddings)."""
    _check_budget(device_bytes)
    hi = limit or args.max_position_embeddings
    return _largest(lambda c: c == 0 or peak_bytes(args, serving, batch, c) <= device_bytes, hi)


def _check_budget(device_bytes: int) -> None:
    if device_bytes <= 0:
        raise RecipeError(f"device memory must be > 0 bytes, got {device_bytes}")
