"""The fast_linear opt and its bf16_linear op. The C++ kernel (AVX512-BF16 CPUs only) equals
fp32 math within one bf16 rounding for every row block and tail; the dispatch keeps torch
wherever the kernel cannot run; a tiny LLaMA routed through the op gives the baseline's
greedy tokens (fp32: bit for bit, torch runs; bf16 with the kernel pinned: within rounding),
fused, under the KV and scheduling opts, next to int8, and compiled."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_LLAMA, recipe_config
from torch import nn

from common import ops
from common.core.config import CONFIG_DIR
from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.spec import KVSpec
from common.ops import dispatch
from common.ops.bf16_linear import bf16_linear, bf16_linear_cpp
from common.ops.library import loads, registered
from common.quant.int8 import Int8WeightOnlyLinear
from common.transforms.compile import compile_decode, compile_stats
from common.transforms.fast_linear import FastLinear, route_linears
from common.transforms.fusion import fuse_kernels, fuse_projections
from common.transforms.registry import apply_transforms, check_combination, opt_specs
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
BF16, FP32 = torch.bfloat16, torch.float32
PROMPTS = ([5, 17, 33, 8, 61, 22, 9], [40, 3], [12, 70, 44, 19, 88])
NEW = 6
KV_OPTS = {  # opt -> (KV spec, attention backend, scheduler)
    "none": (KVSpec("contiguous"), "eager", None),
    "flash_attn": (KVSpec("contiguous"), "flash", None),
    "paged_kv": (KVSpec("paged", block_size=4), "sdpa", None),
    "paged_kv+cont_batch": (KVSpec("paged", block_size=4), "flash", SchedulerParams("continuous")),
}


@pytest.fixture(autouse=True)
def _own_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ops.reset(tmp_path / "choices.json")
    yield
    ops.reset()


@pytest.fixture
def cpp() -> None:
    if not loads("bf16dot"):
        pytest.skip("bf16dot.cpp builds only where the CPU has AVX512-BF16 (avx512_bf16 flag)")


def _model(dtype: torch.dtype, tied: bool = False) -> LlamaForCausalLM:
    return from_seed(
        LlamaForCausalLM, replace(TINY_LLAMA, tie_word_embeddings=tied), 0, "cpu", dtype
    )


def _fused(model: nn.Module) -> nn.Module:
    return fuse_kernels(fuse_projections(model), add_norm=True, rotary=True)


def _generate(model: nn.Module, kv: str = "none", static: bool = False) -> list[list[int]]:
    spec, attn, sched = KV_OPTS[kv]
    eng = Engine(model, CPU, replace(spec, static=static), attn, sched)
    return [c.tokens for c in eng.generate([Request(list(p), NEW) for p in PROMPTS])]


def _ran(impl: str) -> bool:
    """Whether every bf16_linear call so far ran `impl`."""
    used = {v for k, v in ops.chosen().items() if k.startswith("bf16_linear[")}
    return bool(used) and all(v.startswith(impl) for v in used)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [13, 64, 77])  # within one 32-wide step, whole steps, a tail
@pytest.mark.parametrize("rows", [*range(1, 17), 19])  # every row block and tail, and past 16
def test_kernel_matches_fp32_math(cpp, rows: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=gen).to(BF16)
    w = torch.randn(37, k, generator=gen).to(BF16)  # 37 channels: a tail of 8- and 4-wide blocks
    b = torch.randn(37, generator=gen).to(BF16) if bias else None
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    out = bf16_linear_cpp(x, w, b)
    assert out.shape == (rows, 37) and out.dtype == BF16
    # Exact products summed in fp32 (error ~K * 2^-24 of the absolute terms), then one
    # rounding to bf16 (2^-8 relative).
    terms = x.double().abs() @ w.double().abs().t()
    assert ((out.double() - exact).abs() <= 2**-8 * exact.abs() + 2**-16 * terms).all()


def test_kernel_op_registration(cpp) -> None:
    x, w, b = torch.randn(3, 40).to(BF16), torch.randn(24, 40).to(BF16), torch.randn(24).to(BF16)
    torch.library.opcheck(registered(bf16_linear_cpp), (x, w, b))
    torch.library.opcheck(registered(bf16_linear_cpp), (x, w, None))
    with pytest.raises(ValueError, match="bf16_linear_cpp needs"):
        bf16_linear_cpp(x, w.t().contiguous().t(), None)


def _eligible(*args) -> set[str]:
    dtype = args[0].dtype
    impls = bf16_linear.impls.values()
    return {i.name for i in impls if i.available("cpu", dtype) and i.allows(args)}


def test_torch_runs_where_the_kernel_cannot(monkeypatch, tmp_path) -> None:
    x, w = torch.randn(2, 64).to(BF16), torch.randn(8, 64).to(BF16)
    cpp = {"cpp_bf16dot"} if loads("bf16dot") else set()
    assert _eligible(x, w, None) == {"torch"} | cpp
    assert _eligible(x.float(), w.float(), None) == {"torch"}  # fp32: torch only
    assert _eligible(x, w.float(), None) == {"torch"}  # weight in another dtype
    assert _eligible(x, w.t().contiguous().t(), None) == {"torch"}  # a transposed view
    monkeypatch.setattr(dispatch, "loads", lambda name: False)  # a CPU without AVX512-BF16
    ops.reset(tmp_path / "other_cpu.json")
    ops.pin({"bf16_linear": "cpp_bf16dot"})  # a pin holds only where its rule does
    assert torch.equal(ops.bf16_linear(x, w, None), F.linear(x, w))
    assert _ran("torch")


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_runs_torch_bit_for_bit(tied: bool) -> None:
    ops.pin({"bf16_linear": "cpp_bf16dot"})  # its rule keeps fp32 on torch: no error
    base, fast = _model(FP32, tied), route_linears(_model(FP32, tied))
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    assert fast.lm_head in linears
    if tied:
        assert fast.lm_head.weight is fast.model.embed_tokens.weight
    hidden = torch.randn(3, TINY_LLAMA.hidden_size)
    assert torch.equal(fast.logits(hidden), base.logits(hidden))
    assert _generate(fast) == _generate(base)
    assert _ran("torch")


def test_bf16_kernel_gives_the_tokens_within_rounding(cpp) -> None:
    ops.pin({"bf16_linear": "cpp_bf16dot"})
    base, fast = _model(BF16, tied=True), route_linears(_model(BF16, tied=True))
    hidden = torch.randn(3, TINY_LLAMA.hidden_size).to(BF16)
    torch.testing.assert_close(fast.logits(hidden), base.logits(hidden), rtol=2e-2, atol=2e-2)
    assert _generate(fast) == _generate(base)
    assert _ran("cpp_bf16dot (pinned)")


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_composes_with_fuse_and_the_kv_opts(dtype: torch.dtype) -> None:
    """Through the registry, as the recipe applies it: the stacked q/k/v and gate/up run
    through the op too; fp32 (torch) bit for bit, bf16 (the kernel, where it builds) within
    rounding."""
    cfg = recipe_config(
        {"fusion": {"projections": True, "add_norm": True, "rotary": True}, "fast_linear": True}
    )
    if dtype == BF16 and loads("bf16dot"):
        ops.pin({"bf16_linear": "cpp_bf16dot"})
    model = apply_transforms(_model(dtype), cfg)
    attn = model.model.layers[0].self_attn
    assert type(attn.qkv_proj) is FastLinear and type(model.lm_head) is FastLinear
    assert type(model.model.layers[0].mlp.gate_up_proj) is FastLinear
    want = _generate(_fused(_model(dtype)))
    for kv in KV_OPTS:
        assert _generate(model, kv) == want, kv


def test_takes_the_linears_int8_left_in_float() -> None:
    cfg = recipe_config({"quant": {"weights": "int8", "skip": ["lm_head"]}, "fast_linear": True})
    model = apply_transforms(_model(FP32), cfg)
    assert type(model.lm_head) is FastLinear
    assert type(model.model.layers[0].self_attn.o_proj) is Int8WeightOnlyLinear
    int8_only = apply_transforms(_model(FP32), recipe_config({**cfg, "fast_linear": False}))
    assert _generate(model) == _generate(int8_only)


def test_opt_declaration_composes() -> None:
    specs = opt_specs(CONFIG_DIR)
    assert specs["fast_linear"].devices == ["cpu"]
    check_combination(
        ["fast_linear", "fuse", "compile", "flash_attn", "paged_kv", "cont_batch"], specs
    )
    for quant in ("int8", "int4", "gptq", "awq", "w8a8", "w4a8"):
        check_combination(["fast_linear", quant], specs)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_compiled_decode_traces_through_the_op(dtype: torch.dtype) -> None:
    """One decode graph holding the kernel's registered op (bf16, where it builds) or
    F.linear; same tokens as the same model eager on the same static storage."""
    kernel = dtype == BF16 and loads("bf16dot")
    if kernel:
        ops.pin({"bf16_linear": "cpp_bf16dot"})
    torch._dynamo.reset()
    calls: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        calls.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    want = _generate(route_linears(_model(dtype)), static=True)
    settings = SimpleNamespace(backend=backend, mode=None, cpp_wrapper=False, freezing=False)
    model = compile_decode(route_linears(_model(dtype)), settings)
    assert _generate(model, static=True) == want
    assert compile_stats(model).graphs == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    op = "llm_recipes.bf16_linear_cpp.default"
    assert (op in calls) == kernel and (kernel or "<built-in function linear>" in calls)
