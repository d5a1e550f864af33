"""A compiled decode step (the compile opt): torch.compile of the model's forward for decode
steps with static shapes, and of its LM head for as many rows as such a step (a batch whose
rows all sample) where inductor generates the head's matmul (see gemv_options); prefill and
anything else stays eager.

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
prepacked weights; batch-1 float matmuls as inductor's own reductions where that measures
faster than oneDNN's GEMV on this machine, see gemv_options), inductor with
mode="reduce-overhead" (CUDA graphs) on cuda, torchair on npu (unverified: no GPU or NPU in
CI). The compiled artifacts are cached on disk under ~/.cache/llm-recipes/inductor
(inductor's FX graph cache), so a second run skips most of inductor's work; tracing is
redone per process. The seconds spent in calls that compiled are kept per model
(compile_stats): the bench reports them in their own column, and the warm-up pass absorbs
them, so they never enter TPOT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.kv.quant import kv_parts
from common.ops.build import cache_dir
from common.ops.dispatch import choose_variant

# Inductor's decompose_mm_pass: an mm of one row becomes sum(x * W) over K, a reduction that
# inductor generates, vectorizes and fuses instead of calling oneDNN's matrix-vector product
# (whether that is faster depends on the CPU: gemv_options measures).
DECOMPOSE = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


@dataclass
class CompileStats:
    seconds: float = 0.0  # wall time of the calls that compiled a graph, and of gemv_options
    graphs: int = 0  # decode step graphs compiled (one per batch shape; LM heads not counted)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def gemv_options(model: nn.Module) -> dict[str, Any]:
    """Inductor options for the model's float nn.Linear weights in a batch-1 step: DECOMPOSE
    where timing them all both ways (a one-row input each, as a decode step reads them) says
    inductor's reductions beat oneDNN on this machine, else none; measured once per machine
    and size class, pinned with kernels.compiled_gemv=aten|inductor."""
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    weights = [w for w in weights if w.is_floating_point() and w.device.type == "cpu"]
    if not weights:
        return {}
    # torch 2.13 reads the pass's limits from post_grad_fusion_options once, at import, and
    # caps either weight dim at 2048 on cpu (a threshold from other machines): here the
    # measurement decides, so the cap is lifted (it binds only compiles that enable the pass).
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = 1 << 62
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def step() -> list[torch.Tensor]:
        return [F.linear(inputs[w.shape[1]], w) for w in weights]

    def inductor() -> Any:
        compiled = torch.compile(step, fullgraph=True, options=DECOMPOSE)
        compiled()
        return compiled

    variants = {"aten": lambda: step, "inductor": inductor}
    nbytes = sum(w.nbytes for w in weights)
    choice = choose_variant("compiled_gemv", variants, "cpu", weights[0].dtype, 1, nbytes)
    return DECOMPOSE if choice == "inductor" else {}


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
    """Route the model's static-shape decode steps, and LM heads of as many rows as such a
    step where inductor generates their matmul, through torch.compile, in place."""
    _use_cache_dir()
    device_type = next(model.parameters()).device.type
    eager, eager_logits = model.forward, model.logits
    t0 = time.perf_counter()
    kwargs = compile_kwargs(settings, device_type)
    gemv = gemv_options(model) if "options" in kwargs else {}  # inductor on cpu
    if gemv:
        kwargs["options"] |= gemv
    # The head compiles only where inductor generates its matmul (a plain nn.Linear head, with
    # compiled_gemv's reductions). Anything else (oneDNN's call, one of our kernels for int8
    # or fast_linear, a tensor-parallel head) is one opaque call, for which a graph adds
    # nothing but dynamo's entry, ~0.1 ms a step. A pipeline stage without the head has None.
    head = bool(gemv) and type(model.lm_head) is nn.Linear
    compiled = torch.compile(eager, **kwargs)
    stats = CompileStats(seconds=time.perf_counter() - t0)
    marked: list[object] = [None]  # the storage whose tensors CUDA graphs may keep
    shapes: set[tuple[int, ...]] = set()
    step_rows: set[int] = set()  # row counts of compiled decode steps
    head_rows: set[int] = set()  # row counts whose LM head ran eager once

    def timed(fn: Any, *args: Any) -> tuple[Any, int]:
        """fn(*args) and the graphs it compiled, their time added to the stats."""
        before = _graphs()
        t0 = time.perf_counter()
        out = fn(*args)
        if _graphs() != before:
            stats.seconds += time.perf_counter() - t0
        return out, _graphs() - before

    def forward(input_ids, positions, ctx, **extra):
        meta = getattr(ctx, "meta", None)
        if extra or meta is None or not meta.static:
            return eager(input_ids, positions, ctx, **extra)
        if input_ids.shape not in shapes:
            # One eager step first: the dispatch table measures this shape's kernels (a trace
            # takes the ranking so far and cannot measure); it writes the same K/V slots the
            # compiled step then writes again.
            shapes.add(input_ids.shape)
            step_rows.add(input_ids.shape[0])
            eager(input_ids, positions, ctx)
        if device_type == "cuda" and ctx.cache is not marked[0]:  # unverified: no GPU in CI
            for store in (*ctx.cache.k, *ctx.cache.v):  # written in place by the graph
                for t in kv_parts(store):
                    torch._dynamo.mark_static_address(t)
            marked[0] = ctx.cache
        out, graphs = timed(compiled, input_ids, positions, ctx)
        stats.graphs += graphs
        return out

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        # Only row counts of compiled steps (a batch whose rows all sample): a graph each, not
        # one per count of sampled rows; the first call of a count runs eager, as above.
        rows = hidden.shape[0]
        if hidden.dim() != 2 or rows not in step_rows:
            return eager_logits(hidden)
        if rows not in head_rows:
            head_rows.add(rows)
            return eager_logits(hidden)
        return timed(compiled_logits, hidden)[0]

    model.forward = forward
    if head:
        compiled_logits = torch.compile(eager_logits, **kwargs)
        model.logits = logits
    model.compile_stats = stats
    return model


def compile_stats(model: nn.Module) -> CompileStats | None:
    """What compiling cost this model so far (None: not compiled)."""
    return getattr(model, "compile_stats", None)
