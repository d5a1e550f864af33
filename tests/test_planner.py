"""The memory calculator against measured bytes, and the planner's cost model and ranking:
invariants that must hold whatever the hardware numbers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from common.bench.auto_parallel import resolve_auto_tp
from common.bench.cli import compose_config
from common.core.errors import RecipeError
from common.io.checkpoint import from_seed
from common.kv.rows import make_rows
from common.kv.spec import KVSpec
from common.ops.w4a8_linear import pack as w4a8_pack
from common.ops.w4a8_linear import w4a8_linear
from common.parallel.calculator import Serving, max_batch, max_context, peak_bytes, serving_memory
from common.parallel.calibrate import calibrate
from common.parallel.hardware import Hardware, Link, from_spec
from common.parallel.layout import Layout
from common.parallel.measured import weight_bytes
from common.parallel.simulate import (
    Strategy,
    Workload,
    all_reduce_time,
    forward_cost,
    simulate,
)
from common.parallel.strategy import choose_tp, plan
from common.quant.calibrated import GPTQ
from common.quant.formats import FLOAT, INT8, W8A8, int4, w4a8, weight_format
from common.quant.scheme import configured_scheme, get_scheme
from common.transforms.fusion import fuse_projections
from models.glm import GlmForCausalLM
from models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"llama": (LlamaForCausalLM, "llama65b"), "glm": (GlmForCausalLM, "glm4_9b")}


def preset(config: str, scale: str, cls=LlamaForCausalLM):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/{config}.yaml"))
    return cls.args_cls(**{**cfg["common"], **cfg["presets"][scale]})


def hardware(name: str) -> Hardware:
    cfg = OmegaConf.load(ROOT / f"configs/hardware/{name}.yaml")
    return from_spec(cfg.name, OmegaConf.to_container(cfg.spec))


# --- memory calculator ---------------------------------------------------------------------


# gptq and awq store int4 (or int8) modules: their bytes are int4's, tested below
@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("kv_int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_calculator_matches_built_model_and_kv_storage(
    family: str, dtype: torch.dtype, kv_int8: bool, scheme: str
) -> None:
    """Weights + KV of `batch` x `context` tokens within 2% of the bytes of a built (and
    quantized) model and of the KV storage allocated for them."""
    cls, config = FAMILIES[family]
    args = preset(config, "tiny", cls)
    model = from_seed(cls, args, 0, "cpu", dtype)
    fmt = FLOAT
    if scheme != "none":
        # Bytes do not depend on calibration: schemes that smooth from data run without it.
        quantizer = configured_scheme(SimpleNamespace(weights=scheme, smooth=False, group_size=32))
        fmt = quantizer.weight_format()
        quantizer.quantize(fuse_projections(model))
    batch, context = 3, 40
    kv = make_rows(
        KVSpec("contiguous", kv_int8),
        args.num_hidden_layers,
        args.num_key_value_heads,
        args.kv_head_dim,
        batch,
        context,
        dtype,
        torch.device("cpu"),
    )
    measured = weight_bytes(model) + kv.nbytes()
    (m,) = serving_memory(args, Serving(dtype, fmt, kv_int8), batch, context)
    assert abs((m.weights.total + m.kv) / measured - 1) < 0.02


def test_quantized_formats_match_the_tensors_their_kernels_take() -> None:
    n, k, g = 256, 512, 128
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k)).int(), 2)
    scales_zeros = torch.zeros(k // g, n, 2, dtype=torch.bfloat16)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert torch._weight_int4pack_mm_for_cpu(x, packed, g, scales_zeros).shape == (3, n)
    assert int4(g).matrix_bytes(n, k, torch.bfloat16) == packed.nbytes + scales_zeros.nbytes
    w8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)  # _int_mm takes [K, N]
    scales = torch.ones(n, dtype=torch.bfloat16)  # per output channel, in the model dtype
    assert torch._int_mm(torch.ones(32, k, dtype=torch.int8), w8).shape == (32, n)
    assert W8A8.matrix_bytes(n, k, torch.bfloat16) == w8.nbytes + scales.nbytes
    assert INT8.matrix_bytes(n, k, torch.bfloat16) == n * k + 2 * n
    for g in (32, 128):  # w4a8's packed rows and per-group scales and zeros [N, K/g]
        w4 = w4a8_pack(torch.randint(0, 16, (n, k), dtype=torch.uint8))
        groups = torch.zeros(n, k // g, dtype=torch.bfloat16)
        assert w4a8_linear(x, w4, groups, groups, g).shape == (3, n)
        assert w4a8(g).matrix_bytes(n, k, torch.bfloat16) == w4.nbytes + 2 * groups.nbytes
    with pytest.raises(RecipeError, match="quant.group_size must be one of 32, 64, 128, got 100"):
        int4(100)
    with pytest.raises(RecipeError, match="choose one of none, int8, int4, w8a8, w4a8"):
        weight_format("fp4")


def test_max_batch_and_context_are_the_largest_that_fit() -> None:
    args = preset("llama65b", "small")
    s = Serving(torch.bfloat16, "int8", kv_int8=True, layout=Layout(tp=2))
    budget = 2 * 2**30
    b = max_batch(args, s, 2048, budget)
    assert b > 0
    assert peak_bytes(args, s, b, 2048) <= budget < peak_bytes(args, s, b + 1, 2048)
    c = max_context(args, s, 1, 200 * 2**20, limit=10**6)
    assert peak_bytes(args, s, 1, c) <= 200 * 2**20 < peak_bytes(args, s, 1, c + 1)
    # Weights alone exceed the budget: nothing fits.
    assert max_batch(args, Serving(), 128, 10**6) == 0


def test_vision_tower_sits_on_the_first_stage_split_by_tensor_parallel() -> None:
    args = preset("llama65b", "tiny")
    s = Serving(torch.bfloat16, layout=Layout(tp=2, pp=2), other_params=1000)
    first, last = serving_memory(args, s, 1, 16)
    assert first.weights.other == 500 * 2 and last.weights.other == 0
    assert first.weights.decode_read == first.weights.layers  # a decode step reads neither


# --- cost model ------------------------------------------------------------------------------

LLAMA = preset("llama65b", "full")
A100 = hardware("a100_80g_x8")
W = Workload(batch=8, prompt_len=512, output_len=64)


def strategy(tp=1, pp=1, dp=1, batch=8, fmt=FLOAT, mb=1) -> Strategy:
    return Strategy(tp, pp, dp, batch, fmt, micro_batches=mb)


def test_more_tensor_parallel_lowers_compute_and_adds_all_reduce() -> None:
    costs = [
        forward_cost(LLAMA, torch.bfloat16, strategy(tp), 0, 8, 1, 600, A100) for tp in (1, 2, 4, 8)
    ]
    assert all(a.matmul > b.matmul for a, b in zip(costs, costs[1:]))
    assert all(a.attention > b.attention for a, b in zip(costs, costs[1:]))
    assert costs[0].comm == 0 < costs[1].comm < costs[2].comm < costs[3].comm


def test_all_reduce_ring_cost() -> None:
    link = Link(bandwidth=100e9, latency=5e-6)
    assert all_reduce_time(1e6, 1, link) == 0
    # 2(p-1)/p of the message over the link plus 2(p-1) hops of latency.
    assert all_reduce_time(1e6, 4, link) == pytest.approx(1.5 * 1e6 / 100e9 + 6 * 5e-6)
    assert all_reduce_time(2e6, 4, link) > all_reduce_time(1e6, 4, link)
    # Across nodes the slower link is used.
    assert A100.link(16) is A100.inter and A100.link(8) is A100.intra


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    sim = simulate(LLAMA, torch.bfloat16, strategy(tp=4), W, A100)
    assert sim.decode.memory_bound
    prefill = forward_cost(LLAMA, torch.bfloat16, strategy(tp=4), 0, 8, 512, 512, A100)
    assert not prefill.memory_bound
    # int4 weights read 4x fewer bytes per decode step than bf16: a faster TPOT.
    q = simulate(LLAMA, torch.bfloat16, strategy(tp=4, fmt=int4(128)), W, A100)
    assert q.tpot < sim.tpot


def test_pipeline_bubble_shrinks_with_micro_batches() -> None:
    one = simulate(LLAMA, torch.bfloat16, strategy(tp=2, pp=4, mb=1), W, A100)
    full = simulate(LLAMA, torch.bfloat16, strategy(tp=2, pp=4, mb=4), W, A100)
    assert one.bubble == pytest.approx(0.75) and full.bubble == 0
    assert full.throughput > one.throughput


def test_validation_overhead_is_what_the_narrowed_run_leaves_beyond_its_simulation() -> None:
    spec = importlib.util.spec_from_file_location(
        "plan_validate", ROOT / "scripts/plan_validate.py"
    )
    pv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pv)
    hw, w = A100, W
    for st in (strategy(tp=2), strategy(pp=2, mb=2)):
        ideal = simulate(LLAMA, torch.bfloat16, st, w, hw, kv_passes=pv.KV_PASSES)
        narrowed = {"tpot_ms": 1e3 * ideal.tpot + 5.0, "ttft_ms": 1e3 * ideal.ttft + 20.0}
        decode, prefill = pv.layer_overhead(LLAMA, torch.bfloat16, st, w, hw, narrowed)
        with_it = dataclasses.replace(hw, layer_overhead=decode, prefill_overhead=prefill)
        sim = simulate(LLAMA, torch.bfloat16, st, w, with_it, kv_passes=pv.KV_PASSES)
        assert 0 < decode < prefill
        assert sim.tpot == pytest.approx(ideal.tpot + 5e-3)
        assert sim.ttft == pytest.approx(ideal.ttft + 20e-3)
        # a narrowed run faster than its simulation: no negative overhead
        fast = {"tpot_ms": 1e3 * ideal.tpot / 2, "ttft_ms": 1e3 * ideal.ttft / 2}
        assert pv.layer_overhead(LLAMA, torch.bfloat16, st, w, hw, fast) == (0, 0)


def test_prefill_overhead_applies_to_prefill_only() -> None:
    st = strategy(tp=2)
    base = simulate(LLAMA, torch.bfloat16, st, W, dataclasses.replace(A100, prefill_overhead=0))
    hw = dataclasses.replace(A100, prefill_overhead=1e-3)
    sim = simulate(LLAMA, torch.bfloat16, st, W, hw)
    layers = LLAMA.num_hidden_layers + 1  # the last stage's head counts as one
    assert sim.tpot == base.tpot and sim.ttft == pytest.approx(base.ttft + 1e-3 * layers)


def test_strategies_that_do_not_fit_are_dropped() -> None:
    plans, dropped = plan(LLAMA, torch.bfloat16, A100, W, [FLOAT], [False])
    assert dropped > 0 and plans
    budget = A100.memory * A100.usable_memory
    assert all(p.peak_bytes <= budget for p in plans)
    # 130 GB of bf16 weights: no single-device or two-stage-only-one-rank plan.
    assert all(p.sim.strategy.tp * p.sim.strategy.pp >= 2 for p in plans)


def test_ranking_puts_slo_meeting_plans_first_by_throughput() -> None:
    plans, _ = plan(LLAMA, torch.bfloat16, A100, W, [FLOAT, INT8], [False])
    tpots = sorted(p.sim.tpot for p in plans)
    slo = dataclasses.replace(W, tpot_slo=tpots[len(tpots) // 2])  # half the plans meet it
    ranked, _ = plan(LLAMA, torch.bfloat16, A100, slo, [FLOAT, INT8], [False])
    meets = [p.meets_slo for p in ranked]
    assert any(meets) and not all(meets)
    assert meets == sorted(meets, reverse=True)  # every meeting plan before any other
    ok = [p.sim.throughput for p in ranked if p.meets_slo]
    assert ok == sorted(ok, reverse=True)
    assert all(p.sim.tpot <= slo.tpot_slo for p in ranked if p.meets_slo)
    assert "meets the SLO" in ranked[0].reason


def test_choose_tp_picks_a_layout_that_holds_the_model() -> None:
    tp = choose_tp(LLAMA, torch.bfloat16, A100, W, FLOAT, kv_int8=False)
    assert tp >= 2  # 130 GB of weights do not fit one 80 GB device
    tiny = dataclasses.replace(A100, memory=10**9)
    with pytest.raises(RecipeError, match="parallel.tp=auto"):
        choose_tp(LLAMA, torch.bfloat16, tiny, W, FLOAT, kv_int8=False)


# --- the script ------------------------------------------------------------------------------


def _plan_script():
    spec = importlib.util.spec_from_file_location("plan_script", ROOT / "scripts/plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_plan_script_memory_from_config_json_and_strategy(tmp_path: Path, capsys) -> None:
    script = _plan_script()
    args = preset("llama65b", "tiny")
    config = {**dataclasses.asdict(args), "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "mem"
    script.main(["memory", "--model", str(tmp_path), "--tp", "1", "2", "--quant", "none", "int4",
                 "--kv-dtype", "bf16", "--batch", "2", "--context", "64", "--contexts", "128",
                 "--device-memory-gb", "0.001", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["weights"], r["tp"]) for r in rows] == [
        ("none", 1), ("none", 2), ("int4 g128", 1), ("int4 g128", 2)
    ]  # fmt: skip
    s = Serving(torch.bfloat16, "none")
    assert rows[0]["total_bytes"] == max(m.total for m in serving_memory(args, s, 2, 64))
    assert rows[0]["max_batch"]["128"] == max_batch(args, s, 128, 10**6)
    out = tmp_path / "strategy"
    script.main(["strategy", "--model", "llama65b", "--scale", "small", "--hardware",
                 "a100_80g_x8", "--batch", "4", "--top", "3", "--out", str(out)])  # fmt: skip
    top = json.loads(out.with_suffix(".json").read_text())["top"]
    assert len(top) == 3 and top[0]["tokens_per_s"] >= top[1]["tokens_per_s"]
    with pytest.raises(SystemExit, match="unknown --model 'nope'"):
        script.main(["strategy", "--model", "nope"])
    with pytest.raises(SystemExit, match="no spec to plan with; choose one of a100_80g_x8"):
        script.main(["strategy", "--model", "llama65b", "--hardware", "cpu"])


# --- parallel.tp=auto ------------------------------------------------------------------------


def _auto_cfg(*overrides: str):
    cfg = compose_config("llama65b", list(overrides))
    with open_dict(cfg):  # the runtime's parallel section (the tensor-parallel branch adds it)
        cfg.parallel = {"tp": "auto", "pp": 1}
    return cfg


def test_tp_auto_resolves_to_the_planners_choice() -> None:
    cfg = _auto_cfg("model.scale=full", "hardware=a100_80g_x8", "workload.batch_size=4")
    resolve_auto_tp(cfg, LlamaForCausalLM)
    # What choose_tp picks for the same inputs; 130 GB of bf16 weights need >= 2 devices.
    w = Workload(4, cfg.workload.prompt_len, cfg.workload.max_new_tokens)
    assert cfg.parallel.tp == choose_tp(LLAMA, torch.bfloat16, A100, w, FLOAT, False) >= 2
    # Without a hardware spec: the fewest ranks that hold it (one CPU: 1 for the tiny preset).
    cfg = _auto_cfg("model.scale=tiny", "hardware=cpu")
    resolve_auto_tp(cfg, LlamaForCausalLM)
    assert cfg.parallel.tp == 1
    untouched = compose_config("llama65b", ["model.scale=tiny"])
    resolve_auto_tp(untouched, LlamaForCausalLM)  # no parallel.tp=auto: nothing changes
    assert OmegaConf.select(untouched, "parallel.tp") in (None, 1)


def test_calibrated_schemes_size_as_the_modules_they_store() -> None:
    """gptq/awq produce int4 modules (gptq bits=8: int8 ones), so the planner sizes them so."""
    assert get_scheme("gptq").weight_format() == get_scheme("int4").weight_format()
    assert get_scheme("awq").weight_format() == get_scheme("int4").weight_format()
    assert GPTQ(bits=8).weight_format() == get_scheme("int8").weight_format()


def test_calibration_measures_this_machine_as_two_ranks() -> None:
    """Two gloo ranks: every figure is a measurement (finite, positive), and the all-reduce
    after each segment of work costs time (latency above zero), as in a forward."""
    shapes = [(64, 32), (32, 64)]
    hw = calibrate(2, shapes, torch.float32, 1e-4, [shapes[:1], shapes[1:]], 32, min_bytes=1 << 20)
    assert hw.devices_per_node == 2 and hw.layer_overhead == 1e-4
    assert 0 < hw.mem_bw < float("inf") and 0 < hw.flops["fp32"] < float("inf")
    assert 0 < hw.intra.bandwidth < float("inf") and 0 < hw.intra.latency < 0.1
