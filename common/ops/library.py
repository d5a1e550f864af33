"""Register a kernel as a torch op (namespace llm_recipes) so torch.compile traces it.

Eager calls skip the dispatcher and run the Python function directly: going through
torch.ops costs ~10 us per call, and a decode step makes ~120 kernel calls of a few us each.
Under torch.compile the registered op is called, so the graph holds it as one opaque node
whose output shape comes from the fake implementation. profile_kernels(True) names eager
calls in torch.profiler traces too (scripts/decode_profile.py), as the dispatcher would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

NAMESPACE = "llm_recipes"
F = TypeVar("F", bound=Callable[..., torch.Tensor])
_profiled = [False]
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # every kernel op's definition


def profile_kernels(on: bool) -> None:
    """Wrap each eager kernel call in a profiler range named like the op (off: no cost)."""
    _profiled[0] = on


def kernel_op(name: str, fake: Callable[..., torch.Tensor]) -> Callable[[F], F]:
    """Decorator: register fn as llm_recipes::name (no mutation, fake impl `fake`) and return a
    function that calls the op under torch.compile and fn itself in eager mode."""

    def register(fn: F) -> F:
        label = f"{NAMESPACE}::{name}"
        # define + impl rather than torch.library.custom_op: the dispatcher calls fn itself,
        # without custom_op's per-call Python wrappers (autograd, aliasing checks), which a
        # compiled decode step pays on every one of its ~100 kernel calls.
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(label, fake, lib=_LIB)
        op = getattr(getattr(torch.ops, NAMESPACE), name).default

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            if _profiled[0]:
                with torch.profiler.record_function(label):
                    return fn(*args)
            return fn(*args)

        call.op = op  # for torch.library.opcheck
        return call  # type: ignore[return-value]

    return register
