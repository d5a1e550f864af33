"""A compiled decode step (the compile opt): torch.compile of the model's forward for decode
steps with static shapes; prefill and anything else stays eager.

Static shapes come from the storage (kv_cache static, common/kv): a contiguous cache's
decode step reads the whole preallocated cache and gets each row's length as a tensor
(AttnMeta.lens), and a static batch keeps its row count while it decodes; a paged decode
step is padded to the next power of two up to the scheduler's max batch (padding rows write
a scratch block and see no keys) and its block tables to the model's max length. So a few
graphs (1, 2, 4, ... rows, compiled on first use) serve every decode step of a run,
whatever the number of running sequences.

Custom kernels (common/ops) are registered torch ops: the graph holds them as opaque calls
shaped by their fake implementations, and the dispatch choice is made at trace time, after
one eager step of that shape has let the table measure its bucket (fullgraph=True: a graph
break is an error, not a silent slowdown).

Backends: inductor on cpu (compile.cpp_wrapper, compile.freezing for constant-folded,
prepacked weights), inductor with mode="reduce-overhead" (CUDA graphs) on cuda, torchair on
npu (unverified: no GPU or NPU in CI). The compiled artifacts are cached on disk under
~/.cache/llm-recipes/inductor (inductor's FX graph cache), so a second run skips most of
inductor's work; tracing is redone per process. The seconds spent in calls that compiled are
kept per model (compile_seconds): the bench reports them in their own column, and the
warm-up pass absorbs them, so they never enter TPOT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.kv.quant import kv_parts
from common.ops.build import cache_dir


@dataclass
class CompileStats:
    seconds: float = 0.0  # wall time of the calls that compiled a graph
    graphs: int = 0  # graphs compiled (one per decode batch shape)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compile_kwargs(settings: Any, device_type: str) -> dict[str, Any]:
    """torch.compile's arguments for the compile config section on this device."""
    if device_type == "npu":  # unverified: no NPU in CI
        import torchair

        config = torchair.CompilerConfig()
        return {"backend": torchair.get_npu_backend(compiler_config=config), "dynamic": False}
    kwargs: dict[str, Any] = {"backend": settings.backend, "dynamic": False, "fullgraph": True}
    if settings.backend != "inductor":
        return kwargs
    if device_type == "cuda":  # unverified: no GPU in CI
        kwargs["mode"] = settings.mode or "reduce-overhead"
    elif settings.mode:
        kwargs["mode"] = settings.mode
    else:  # mode and options exclude each other
        kwargs["options"] = {
            "cpp_wrapper": settings.cpp_wrapper,
            "freezing": settings.freezing,
            # No guards on the model's modules: transforms are done before the first call and
            # nothing rebinds a module's attributes after (offload, which does, refuses
            # compile), while checking ~150 parameters' guards costs ~0.3 ms every step.
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        }
    return kwargs


def _use_cache_dir() -> None:
    """Inductor's on-disk caches under ~/.cache/llm-recipes/inductor unless the user chose a
    directory (TORCHINDUCTOR_CACHE_DIR); an earlier inductor import may already have set the
    variable to its per-boot /tmp default, which is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def compile_decode(model: nn.Module, settings: Any) -> nn.Module:
    """Route the model's static-shape decode steps through torch.compile, in place."""
    _use_cache_dir()
    device_type = next(model.parameters()).device.type
    eager = model.forward
    compiled = torch.compile(eager, **compile_kwargs(settings, device_type))
    stats = CompileStats()
    marked: list[object] = [None]  # the storage whose tensors CUDA graphs may keep
    shapes: set[tuple[int, ...]] = set()

    def forward(input_ids, positions, ctx, **extra):
        meta = getattr(ctx, "meta", None)
        if extra or meta is None or not meta.static:
            return eager(input_ids, positions, ctx, **extra)
        if input_ids.shape not in shapes:
            # One eager step first: the dispatch table measures this shape's kernels (a trace
            # takes the ranking so far and cannot measure); it writes the same K/V slots the
            # compiled step then writes again.
            shapes.add(input_ids.shape)
            eager(input_ids, positions, ctx)
        if device_type == "cuda" and ctx.cache is not marked[0]:  # unverified: no GPU in CI
            for store in (*ctx.cache.k, *ctx.cache.v):  # written in place by the graph
                for t in kv_parts(store):
                    torch._dynamo.mark_static_address(t)
            marked[0] = ctx.cache
        before = _graphs()
        t0 = time.perf_counter()
        out = compiled(input_ids, positions, ctx)
        if _graphs() != before:
            stats.seconds += time.perf_counter() - t0
            stats.graphs += _graphs() - before
        return out

    model.forward = forward
    model.compile_stats = stats
    return model


def compile_stats(model: nn.Module) -> CompileStats | None:
    """What compiling cost this model so far (None: not compiled)."""
    return getattr(model, "compile_stats", None)
