"""The kernel ops: C++ functions that the sources in this directory register as torch ops
(namespace llm_recipes, TORCH_LIBRARY_FRAGMENT at the end of each NAME.cpp).

Eager calls and torch.compile'd graphs alike reach a kernel through the dispatcher alone,
~1.5 us per call with no Python in between (a Python implementation behind the dispatcher
cost ~11 us, and a decode step makes ~100 kernel calls), and torch.profiler names each call.
Each op's fake implementation (its outputs' shapes and dtypes, for tracing) lives in Python
beside the op's other implementations; it is registered when the source is loaded, since
torch accepts a fake implementation only for an op it already knows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from common.ops.build import build, builds

NAMESPACE = "llm_recipes"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # holds the fake implementations
_FAKES: dict[str, dict[str, Callable[..., Any]]] = {}  # source -> op name -> fake
_LOADED: set[str] = set()


@functools.cache
def load_ops(source: str) -> None:
    """Build common/ops/SOURCE.cpp against torch, load its ops and register their fakes;
    RecipeError if it does not build here (no g++, or a CPU feature it needs is missing)."""
    torch.ops.load_library(str(build(source)))
    _LOADED.add(source)
    for name, fake in _FAKES.get(source, {}).items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)


@functools.cache
def loads(source: str) -> bool:
    """Whether the ops of SOURCE.cpp run here (loading them if so)."""
    if not builds(source):
        return False
    load_ops(source)
    return True


def kernel_op(source: str, name: str, fake: Callable[..., Any]) -> Callable[..., Any]:
    """The op llm_recipes::NAME, defined in SOURCE.cpp, as a function; `fake` computes its
    outputs' shapes. The first eager call builds and loads the source (the dispatch table
    does so before torch.compile traces a call)."""
    _FAKES.setdefault(source, {})[name] = fake
    if source in _LOADED:  # loaded before this op's module was imported
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)

    def call(*args: Any) -> Any:
        if not torch.compiler.is_compiling():
            load_ops(source)
        return getattr(getattr(torch.ops, NAMESPACE), name).default(*args)

    call.__name__ = call.__qualname__ = name
    call.source = source  # type: ignore[attr-defined]
    return call


def registered(fn: Callable[..., Any]) -> torch._ops.OpOverload:
    """The torch op behind a kernel_op function, loaded (for torch.library.opcheck)."""
    load_ops(fn.source)  # type: ignore[attr-defined]
    return getattr(getattr(torch.ops, NAMESPACE), fn.__name__).default
