"""The compile opt: a compiled decode step (fullgraph, so any graph break fails) gives the
same greedy tokens as eager (fp32 tiny LLaMA), compiles one graph per batch size and never
recompiles across decode steps or runs, composes with flash_attn, int8 (per channel and
group-wise), int4 and fuse, and decodes continuous batches on paged KV in one graph per
padded row count; batch-1 float matmuls lower as the measurement (or a pin) chose.
aot_eager traces exactly what inductor gets; one case runs inductor itself."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny import TINY_LLAMA

from common import ops
from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.runner import ModelRunner
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.spec import KVSpec
from common.quant.int8 import Int8WeightOnly
from common.quant.scheme import get_scheme
from common.transforms.compile import compile_decode, compile_stats
from common.transforms.fusion import fuse_kernels, fuse_projections
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
pytestmark = pytest.mark.usefixtures("fresh_compile")
PROMPTS = ([5, 17, 33, 8, 61, 22, 9], [40, 3])  # one padded static batch of two rows
NEW = 8


def _model(scheme: str | None, fuse: bool) -> LlamaForCausalLM:
    model = from_seed(LlamaForCausalLM, TINY_LLAMA, 0, "cpu", torch.float32)
    if fuse:
        fuse_kernels(fuse_projections(model), add_norm=True, rotary=True)
    if scheme is None:
        return model
    return (Int8WeightOnly(32) if scheme == "int8 g32" else get_scheme(scheme)).quantize(model)


def _generate(model, attn: str, static: bool) -> list[list[int]]:
    eng = Engine(model, CPU, KVSpec("contiguous", static=static), attn)
    return [c.tokens for c in eng.generate([Request(list(p), NEW) for p in PROMPTS])]


def _settings(backend: str = "aot_eager", **kw) -> SimpleNamespace:
    return SimpleNamespace(backend=backend, mode=None, cpp_wrapper=False, freezing=False, **kw)


@pytest.mark.parametrize(
    "attn,scheme,fuse",
    [("eager", None, False), ("flash", "int8", True), ("flash", "int8 g32", True),
     ("flash", "int4", True)],
)  # fmt: skip
def test_compiled_decode_gives_eager_tokens_without_recompiles(
    attn: str, scheme: str | None, fuse: bool
):
    want = _generate(_model(scheme, fuse), attn, static=False)
    model = compile_decode(_model(scheme, fuse), _settings())
    counters = torch._dynamo.utils.counters
    start = counters["stats"]["unique_graphs"]
    assert _generate(model, attn, static=True) == want
    stats = compile_stats(model)
    assert stats.graphs == 1 and stats.seconds > 0  # every decode step of the batch: one graph
    # and none of its LM head: aot_eager generates no matmul, so the head stays eager
    assert counters["stats"]["unique_graphs"] == start + 1
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert _generate(model, attn, static=True) == want  # a second run: same graph, no recompile
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == breaks == 0
    assert compile_stats(model).graphs == 1


def test_paged_continuous_batching_decodes_in_a_graph_per_row_bucket(monkeypatch):
    """Continuous batching on paged KV: the number of running sequences changes from step to
    step (different prompt and output lengths, max batch 5). Each decode step is padded to the
    next power of two up to the max batch, and each of those shapes compiles once."""
    reqs = [([5, 17, 33, 8, 61, 22, 9], 9), ([40, 3], 3), ([12, 70, 44, 19, 88], 5), ([77], 6)]
    reqs += [([8, 9], 2), ([31, 4, 6], 4)]
    sched = SchedulerParams(kind="continuous", max_batch=5)

    def run(model, static: bool) -> list[list[int]]:
        eng = Engine(model, CPU, KVSpec("paged", block_size=4, static=static), "flash", sched)
        return [c.tokens for c in eng.generate([Request(list(p), n) for p, n in reqs])]

    want = run(_model(None, True), static=False)
    padded: set[tuple[int, int]] = set()  # (running rows, rows of the forward)
    pad = ModelRunner._static_decode

    def spy(self, storage, ids, *args):
        out = pad(self, storage, ids, *args)
        padded.add((ids.shape[0], out[0].shape[0]))
        return out

    monkeypatch.setattr(ModelRunner, "_static_decode", spy)
    model = compile_decode(_model(None, True), _settings())
    assert run(model, static=True) == want
    assert {rows for rows, _ in padded} >= {1, 3, 5}  # padded to 1, 4 and 5 (the max)
    assert all(out == min(5, 1 << (rows - 1).bit_length()) for rows, out in padded)
    assert compile_stats(model).graphs == len({out for _, out in padded})


def test_batches_of_many_lengths_share_a_graph():
    """One request per batch, each a different length (a chat workload): the contiguous cache
    is sized in powers of two, so these batches reuse one graph instead of compiling one per
    length until torch.compile's recompile limit fails the run."""
    reqs = [Request([3 + i] * (2 + 5 * i), 4 + i) for i in range(10)]  # final lengths 6..60
    sched = SchedulerParams(kind="static", max_batch=1)
    model = compile_decode(_model(None, False), _settings())
    eng = Engine(model, CPU, KVSpec("contiguous", static=True), "flash", sched)
    eager = Engine(_model(None, False), CPU, KVSpec("contiguous"), "flash", sched)
    assert [c.tokens for c in eng.generate(reqs)] == [c.tokens for c in eager.generate(reqs)]
    assert compile_stats(model).graphs == 1


def test_a_new_decode_shape_runs_eager_once_so_its_kernels_are_measured():
    """A trace cannot measure kernels; the first step of each static shape runs eager, so the
    dispatch table ranks the decode bucket (two rows) before the graph takes its choice."""
    model = compile_decode(_model(None, True), _settings())
    _generate(model, "flash", static=True)
    assert any("rows=2," in label for label in ops.chosen())


def test_static_storage_alone_changes_nothing():
    """Static shapes (full-length reads with lengths) without compiling: same tokens."""
    model = _model(None, False)
    assert _generate(model, "flash", static=True) == _generate(model, "flash", static=False)


def test_inductor_compiles_the_fused_int8_step():
    """Inductor as the recipes run it: C++ wrapper code (compile.cpp_wrapper, the default on
    cpu) calling the kernels through the dispatcher."""
    want = _generate(_model("int8", True), "flash", static=False)
    settings = _settings("inductor")
    settings.cpp_wrapper = True
    model = compile_decode(_model("int8", True), settings)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert _generate(model, "flash", static=True) == want
    assert compile_stats(model).graphs == 1
    # the int8 head, one call of our kernel, stays eager: no graph of its own
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    # No float nn.Linear left (the LM head is int8 too): nothing for compiled_gemv to time.
    assert not any(label.startswith("compiled_gemv[") for label in ops.chosen())


@pytest.mark.parametrize("choice", ["aten", "inductor"])
def test_batch1_float_matmuls_lower_as_chosen(choice: str):
    """kernels.compiled_gemv: inductor turns each one-row matmul of the step into its own
    reduction (decompose_mm_pass, counted: all 7 per layer, the 2304-wide MLP too, past the
    pass's own 2048 cap, and the LM head, compiled on its own for a step's row count), aten
    leaves them to oneDNN; the same tokens either way."""
    args = dataclasses.replace(TINY_LLAMA, intermediate_size=2304)

    def run(model) -> list[int]:
        eng = Engine(model, CPU, KVSpec("contiguous", static=True), "flash")
        return eng.generate([Request(list(PROMPTS[0]), NEW)])[0].tokens

    want = run(from_seed(LlamaForCausalLM, args, 0, "cpu", torch.float32))
    ops.pin({"compiled_gemv": choice})
    counters = torch._dynamo.utils.counters["inductor"]
    model = from_seed(LlamaForCausalLM, args, 0, "cpu", torch.float32)
    model = compile_decode(model, _settings("inductor"))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert run(model) == want
    want_decomposed = 7 * args.num_hidden_layers + 1 if choice == "inductor" else 0
    assert counters["decompose_mm"] == want_decomposed
    # the step's graph, and the head's own where inductor generates its matmul
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1 + (
        choice == "inductor"
    )
    assert _gemv_choice() == f"{choice} (pinned)"


def test_an_unpinned_gemv_choice_is_measured_on_the_models_weights():
    compile_decode(_model(None, False), _settings("inductor"))
    assert _gemv_choice() in ("aten", "inductor")


def _gemv_choice() -> str:
    (choice,) = [v for k, v in ops.chosen().items() if k.startswith("compiled_gemv[cpu,float32,")]
    return choice
